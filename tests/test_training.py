"""Training behaviour on fixed seeds: warm-up lowers the loss, GRPO raises the reward, the stages
run end to end from an empty out_dir, a stopped run resumes, kl_beta=0 loads no reference."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import unigrpo
from conftest import bias_text_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(tmp_path, *args):
    return unigrpo.get_config(["--out_dir", str(tmp_path), "--log_interval=1", *args])


def test_grpo_step_raises_a_reward_on_both_modalities(tiny):
    """The GRPO machinery climbs a reward that asks for a word in the text and low codes in the images
    (a sign error anywhere in ratio, advantage or loss would make it fall)."""
    import copy
    torch.manual_seed(0)
    policy = copy.deepcopy(tiny)
    bias_text_logits(policy, boi_id=2.0)  # images appear early, so the image head gets a signal too
    red = policy.tokenizer.convert_tokens_to_ids("red")
    cfg = unigrpo.get_config(["--group_size=4", "--max_new_tokens=40", "--kl_beta=0", "--inner_epochs=2", "--lr=3e-3",
                              "--process_reward=false"])
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
    examples = data.make_examples("story", 4, "rl", seed=0)

    def score(ro, group):
        live = ro.mask.bool()
        txt, img = live & ~ro.is_image, live & ro.is_image
        r_text = ((ro.ids == red) & txt).sum(1) / txt.sum(1).clamp(min=1)
        r_img = ((ro.ids < 32) & img).sum(1) / img.sum(1).clamp(min=1)
        return {"reward": r_text + r_img, "text": r_text, "visual": r_img}

    hist = [unigrpo.grpo_step(policy, None, opt, examples, score, cfg) for _ in range(25)]
    first = sum(h["reward"] for h in hist[:3]) / 3
    last = sum(h["reward"] for h in hist[-3:]) / 3
    assert last > first + 0.3, (first, last)
    assert sum(h["rewards/text/mean"] for h in hist[-3:]) / 3 > 0.15
    assert sum(h["rewards/visual/mean"] for h in hist[-3:]) / 3 > sum(h["rewards/visual/mean"] for h in hist[:3]) / 3 + 0.1


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """prepare -> warm-up -> GRPO from an empty out_dir with tiny budgets, through the real CLI."""
    out = tmp_path_factory.mktemp("run")
    args = [f"--out_dir={out}", "--vq_steps=3", "--clip_steps=20", "--warmup_iters=40", "--warmup_batch_size=16",
            "--n_understanding=150", "--grpo_iters=2", "--prompts_per_step=2", "--group_size=2", "--ckpt_interval=1",
            "--storyboard_interval=1", "--max_new_tokens=60", "--log_interval=1", "--warmup_lr=3e-3"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "unigrpo.py"), "--stage=grpo", *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, args, r


def _rows(out, stage):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if row["stage"] == stage]


def test_pipeline_runs_missing_stages_and_writes_outputs(pipeline):
    out, _, r = pipeline
    assert "no finished prepare stage" in r.stdout and "no finished warmup stage" in r.stdout
    for d in ("prepare/tokenizer", "prepare/vq", "prepare/clip", "warmup", "grpo"):
        assert os.path.isdir(os.path.join(out, d)), d
    assert os.path.exists(os.path.join(out, "grpo", "model.safetensors"))
    boards = os.listdir(os.path.join(out, "storyboards"))
    assert "grpo_00002.html" in boards and "grpo_00002.png" in boards and "warmup_00040.html" in boards
    html = open(os.path.join(out, "storyboards", "grpo_00002.html")).read()
    assert "data:image/png;base64," in html
    g = _rows(out, "grpo")
    for key in ("reward", "reward_std", "rewards/format/mean", "rewards/text/mean", "rewards/visual/mean", "kl",
                "clip_ratio", "entropy", "loss", "grad_norm", "frac_reward_zero_std", "completions/mean_text_tokens",
                "completions/mean_image_tokens", "time/sampling", "time/scoring", "time/update"):
        assert key in g[0], key
    assert [row["iter"] for row in g] == [0, 1]


def test_warmup_lowers_the_loss(pipeline):
    out, _, _ = pipeline
    w = [row["loss"] for row in _rows(out, "warmup")]
    assert len(w) == 40
    assert sum(w[-5:]) / 5 < 0.85 * sum(w[:5]) / 5, w  # measured: about 0.77 after 40 steps


def test_stopped_run_resumes_from_its_checkpoint(pipeline):
    out, args, _ = pipeline
    # the run above stopped at grpo iter 2; asking for 3 continues from the checkpoint, not from scratch
    args = [a for a in args if not a.startswith("--grpo_iters")] + ["--grpo_iters=3"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "unigrpo.py"), "--stage=grpo", *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "at iter 2" in r.stdout
    assert "running it first" not in r.stdout  # earlier stages are complete and are not redone
    assert [row["iter"] for row in _rows(out, "grpo")] == [0, 1, 2]
    assert unigrpo.load_state(os.path.join(out, "grpo"))["iter"] == 3


def _warmed_up_copy(pipeline, run, monkeypatch):
    """The pipeline's prepare + warm-up copied to `run`; returns the list of paths load_model is called with."""
    import shutil
    shutil.copytree(os.path.join(pipeline[0], "prepare"), run / "prepare")
    shutil.copytree(os.path.join(pipeline[0], "warmup"), run / "warmup")
    loads, real = [], unigrpo.load_model
    monkeypatch.setattr(unigrpo, "load_model", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    return loads


def test_kl_beta_zero_loads_no_reference(pipeline, monkeypatch, tmp_path):
    import shutil
    run = tmp_path / "nokl"
    loads = _warmed_up_copy(pipeline, run, monkeypatch)
    for beta, n in (("0", 1), ("0.04", 2)):
        loads.clear()
        shutil.rmtree(run / "grpo", ignore_errors=True)
        unigrpo.main([f"--out_dir={run}", "--stage=grpo", f"--kl_beta={beta}", "--grpo_iters=1", "--prompts_per_step=1",
                      "--group_size=2", "--max_new_tokens=30", "--storyboard_interval=100", "--warmup_iters=40",
                      "--dtype=bfloat16"])
        assert len(loads) == n, (beta, loads)
    assert _rows(run, "grpo")[-1]["kl"] == 0.0  # the reference grpo() loads follows the policy's dtypes (bf16: no rounding gap)


def test_nan_reward_updates_nothing_and_is_reported(tiny):
    """A NaN in the loss must not reach the weights; grpo() turns it into a clear error (before any checkpoint)."""
    import copy
    policy = copy.deepcopy(tiny)
    before = [p.detach().clone() for p in policy.parameters()]
    cfg = unigrpo.get_config(["--group_size=2", "--max_new_tokens=20", "--kl_beta=0", "--process_reward=false"])
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    score = lambda ro, group: {"reward": torch.tensor([float("nan"), 1.0] * (len(group) // 2))}
    m = unigrpo.grpo_step(policy, None, opt, data.make_examples("story", 2, "rl", seed=0), score, cfg)
    assert m["loss"] != m["loss"]  # NaN, reported to the caller
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_lora_grpo_run_keeps_one_model_resumes_and_loads(pipeline, monkeypatch, tmp_path, capsys):
    """--lora_rank through the CLI, with CFG: one model in memory (the reference is its base), an adapters-only
    checkpoint that a later run resumes and load_model (eval, the next stage) reads like any other."""
    run = tmp_path / "lora"
    loads = _warmed_up_copy(pipeline, run, monkeypatch)
    args = [f"--out_dir={run}", "--stage=grpo", "--lora_rank=4", "--lora_alpha=8", "--lr=1e-2", "--cfg_scale=3",
            "--prompts_per_step=2", "--group_size=2", "--max_new_tokens=40", "--storyboard_interval=100", "--warmup_iters=40"]
    unigrpo.main(args + ["--grpo_iters=2"])
    assert loads == [os.path.join(str(run), "warmup")], loads  # no reference copy
    files = os.listdir(run / "grpo")
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    # precondition: some group had unequal rewards, so the adapters moved (all-equal rewards give zero advantage)
    assert any(row["reward_std"] > 0 for row in _rows(run, "grpo")), _rows(run, "grpo")
    unigrpo.main(args + ["--grpo_iters=3"])
    assert "resuming from" in capsys.readouterr().out and unigrpo.load_state(str(run / "grpo"))["iter"] == 3
    kl = [row["kl"] for row in _rows(run, "grpo")]
    assert kl[0] == 0.0 and kl[2] > 0, kl  # the resumed adapters differ from the base they were reloaded on
    with pytest.raises(SystemExit, match="trained with LoRA"):
        unigrpo.main([a for a in args if not a.startswith("--lora_rank")] + ["--grpo_iters=4"])
    monkeypatch.undo()
    assert unigrpo.load_model(str(run / "grpo"), "cpu").lora is not None



def test_bf16_first_step_has_ratio_one_and_zero_kl(tiny, monkeypatch):
    """bf16 autocast: the KV-cache decode and the teacher-forced forward round differently, so pi_old is the
    update's own first forward (detached) and the reference a float32 copy under the same autocast. With
    advantages that are not 0 and a clip range far below the rounding gap, no token is clipped and KL is 0;
    the old rules (sampler log-probs as pi_old, a bf16 reference) clip and show KL > 0 on the same rollouts."""
    import copy
    policy, ref, ref_bf16 = (copy.deepcopy(tiny).requires_grad_(i == 0) for i in range(3))
    ref_bf16.to(torch.bfloat16)
    for m in (policy, ref, ref_bf16):
        bias_text_logits(m, boi_id=2.0)  # images too
    cfg = unigrpo.get_config(["--dtype=bfloat16", "--inner_epochs=1", "--clip_eps=1e-3", "--group_size=2",
                              "--max_new_tokens=40", "--process_reward=false", "--lr=1e-3"])
    examples = data.make_examples("story", 3, "rl", seed=0)
    score = lambda ro, group: {"reward": torch.arange(len(group), dtype=torch.float) % 3}  # unequal within groups
    seen, real = {}, unigrpo.sample_interleaved
    monkeypatch.setattr(unigrpo, "sample_interleaved", lambda *a, **k: seen.setdefault("ro", real(*a, **k)))
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
    m = unigrpo.grpo_step(policy, ref, opt, examples, score, cfg, torch.Generator().manual_seed(0))
    assert m["clip_ratio"] == 0.0 and m["kl"] == 0.0, m
    ro = seen["ro"]  # the old rules on the same rollouts, with the weights before the update (ref's)
    with unigrpo.autocast(cfg, "cpu"):
        tf, _ = unigrpo.sequence_logprobs(ref, ro)
        tf_bf16, _ = unigrpo.sequence_logprobs(ref_bf16, ro)
    adv = unigrpo.group_advantages(score(ro, ro.ids)["reward"], 2)[:, None].expand_as(tf)
    _, old = unigrpo.grpo_loss(tf, ro.logp, tf_bf16, adv, ro.mask, cfg.clip_eps, cfg.kl_beta)
    gap = (tf - ro.logp)[ro.mask.bool()].abs().max().item()
    print(f"bf16: max |sampler - teacher-forced logp| {gap:.2e}; old rules: clip_ratio {old['clip_ratio']:.3f}, "
          f"kl {old['kl']:.2e}; now: clip_ratio {m['clip_ratio']}, kl {m['kl']}")
    assert old["clip_ratio"] > 0 and old["kl"] > 0



REAL = os.path.join(ROOT, "tests", "fixtures", "realdata")


def test_every_stage_runs_on_data_files(pipeline, monkeypatch, tmp_path):
    """--warmup_data, --rl_data and --eval_data (tests/fixtures/realdata, toy-world content so the toy critic
    reads it) through warm-up with CFG prompt dropout, GRPO and evaluation: no toy prompt is drawn."""
    run = tmp_path / "real"
    _warmed_up_copy(pipeline, run, monkeypatch)
    import shutil
    shutil.rmtree(run / "warmup")
    monkeypatch.setattr(data, "make_examples", lambda *a, **k: pytest.fail("a toy prompt was drawn"))
    monkeypatch.setattr(data, "warmup_mix", lambda *a, **k: pytest.fail("the toy warm-up mix was built"))
    files = [f"--{k}_data={REAL}/{f}.jsonl" for k, f in (("warmup", "warmup"), ("rl", "rl"), ("eval", "eval"))]
    results = unigrpo.main([f"--out_dir={run}", "--stage=eval", *files, "--warmup_iters=3", "--warmup_batch_size=8",
                            "--cfg_dropout=0.5", "--grpo_iters=1", "--prompts_per_step=2", "--group_size=2",
                            "--max_new_tokens=40", "--storyboard_interval=1"])
    assert [r["iter"] for r in _rows(run, "warmup")] == [0, 1, 2] and len(_rows(run, "grpo")) == 1
    res = json.load(open(run / "eval.json"))
    assert set(res) == {"warmup", "grpo"} and "format" in res["grpo"] and "oracle_step" not in res["grpo"]
    assert os.path.exists(run / "storyboards" / "grpo_00001.html")


def test_preset_requires_its_data_files_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match=r"--preset janus-pro-1b runs the warmup stage on real data: pass --warmup_data"):
        unigrpo.main([f"--out_dir={tmp_path}/o", "--preset=janus-pro-1b", "--stage=grpo"])
    with pytest.raises(SystemExit, match=r"pass --rl_data"):
        unigrpo.main([f"--out_dir={tmp_path}/o", "--preset=janus-pro-1b", "--stage=grpo", f"--warmup_data={REAL}/warmup.jsonl"])
    bad = tmp_path / "rl.jsonl"
    bad.write_text('{"task": "story", "prompt": [{"text": "a"}]}\n')
    with pytest.raises(ValueError, match=r"rl.jsonl:1: missing key \"n_steps\""):
        unigrpo.main([f"--out_dir={tmp_path}/o", "--stage=grpo", f"--rl_data={bad}"])
    assert not os.path.exists(tmp_path / "o")
