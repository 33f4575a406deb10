"""tests/bench.py on tiny sizes: its rates are real numbers, its forced rollouts hold exactly k images,
its call counter flags work done twice in a GRPO step, and --vs_trl's FLOP floors and its run without TRL."""
import importlib.util
import sys

import torch

import bench
import unigrpo


def test_sampler_rows_compare_like_with_like():
    rows = bench.sampler_rows(unigrpo.get_config([]), "cpu", batch=2, new_tokens=4, repeats=1)
    assert [r[0] for r in rows] == ["text-only", "image-only"]
    assert all(r[2] > 0 and r[3] > 0 and r[4] > 0 for r in rows), rows  # tokens/s, ours and HF's, their ratio


def test_grpo_step_counts_catch_double_work(monkeypatch):
    c, policy, ref, critic, scorer, ex = bench.grpo_setup(unigrpo.get_config([]), "cpu", G=2, k=2, n_prompts=1)
    total, m, n = bench.grpo_row(c, policy, ref, critic, scorer, ex, "cpu", repeats=1)
    assert total > 0 and m["time/sampling"] > 0 and m["time/update"] > 0
    assert m["completions/mean_image_tokens"] == 2 * policy.n_image_tokens  # forced: exactly k images each
    detail, verdict = bench.calls_row(n, c, uses_ref=True)
    assert verdict == "ok", detail
    # the reference and each inner epoch: a group's prompt once, then its answers
    assert n["trunk (teacher-forced)"] == 2 * (1 + c.inner_epochs) and n["sequence_logprobs (no graph)"] == 1
    # a regression that computes the reference log-probs twice must show in the verdict
    once = unigrpo.reference_logprobs
    monkeypatch.setattr(unigrpo, "reference_logprobs", lambda *a: [once(*a) for _ in range(2)][-1])
    n2 = bench.grpo_row(c, policy, ref, critic, scorer, ex, "cpu", repeats=1)[2]
    assert bench.calls_row(n2, c, uses_ref=True)[1].startswith("CHECK: trunk (teacher-forced) 8 (want 6)")


def test_grpo_flops_count_the_models_matmuls():
    # 8 prompts x G=4, 8 + 40 tokens on Llama 128 x 4 (I 512, V 50): the trunk's matmul weights 4 x (4 H^2 + 3 H I)
    trunk = 4 * (4 * 128**2 + 3 * 128 * 512)
    assert trunk == 1_048_576
    f = bench.grpo_flops(128, 4, 512, 50, B=32, P=8, T=40)
    assert f["sampling"] == f["reference"] == 2 * 32 * (48 * trunk + 40 * 128 * 50) == 3_237_609_472
    assert f["update"] == 3 * f["reference"] and f["scoring"] == 0
    # the shapes are the model's: every Linear of the trunk, once
    _, policy, _, _, texts = bench.vs_trl_setup(n_prompts=2, G=2, new_tokens=4, prompt_len=5, n_embd=32, n_layer=2, n_head=2)
    lm = policy.janus.model.language_model
    linears = sum(m.weight.numel() for m in lm.modules() if isinstance(m, torch.nn.Linear))
    assert linears == sum(i * o for i, o in bench.trunk_linears(32, 2, 128))
    assert all(t.startswith("<bos> ") and t.endswith(" <sep>") and len(t.split()) == 5 for t in texts)


def test_vs_trl_without_trl_explains_and_still_times_ours(capsys):
    header, rows = bench.vs_trl_rows("", threads=(1,), pairs=1, steps=1, warmup=0, n_prompts=2, G=2, new_tokens=4,
                                     prompt_len=4, n_embd=32, n_layer=1, n_head=2)
    err = capsys.readouterr().err
    assert "TRL row is skipped" in err and "pip install torch==2.14.1 transformers==5.23.0 trl" in err
    assert "skipped" in header[0]
    assert [r[0] for r in rows] == ["GRPO step, ours", "matmul rate"]
    assert float(rows[0][2].split()[0]) > 0 and "sampling" in rows[0][3] and "floor" in rows[0][3]
    assert bench.trl_side("/nonexistent/python")[0] is None
    if importlib.util.find_spec("trl") is None:  # this venv: the interpreter runs but has no trl
        assert "cannot import trl" in bench.trl_side(sys.executable)[1]
