"""tests/bench.py on tiny sizes: its rates are real numbers, its forced rollouts hold exactly k images,
and its call counter flags work done twice in a GRPO step."""
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
    assert n["trunk (teacher-forced)"] == 1 + c.inner_epochs and n["sequence_logprobs (no graph)"] == 1
    # a regression that computes the reference log-probs twice must show in the verdict
    once = unigrpo.reference_logprobs
    monkeypatch.setattr(unigrpo, "reference_logprobs", lambda *a: [once(*a) for _ in range(2)][-1])
    n2 = bench.grpo_row(c, policy, ref, critic, scorer, ex, "cpu", repeats=1)[2]
    assert bench.calls_row(n2, c, uses_ref=True)[1].startswith("CHECK: trunk (teacher-forced) 4 (want 3)")
