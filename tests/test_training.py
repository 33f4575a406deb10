"""Training behaviour on fixed seeds: warm-up lowers the loss, GRPO raises the reward, the stages
run end to end from an empty out_dir, a stopped run resumes, kl_beta=0 loads no reference."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import unigrpo
from conftest import bias_text_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(tmp_path, *args):
    return unigrpo.get_config(["--out_dir", str(tmp_path), "--log_interval=1", *args])


def test_grpo_step_raises_a_reward_on_both_modalities(tiny):
    """The GRPO machinery climbs a reward that asks for a word in the text and low codes (the codebook's lower
    half) in the images (a sign error anywhere in ratio, advantage or loss would make it fall)."""
    import copy
    torch.manual_seed(0)
    policy = copy.deepcopy(tiny)
    bias_text_logits(policy, boi_id=2.0)  # images appear early, so the image head gets a signal too
    red = policy.tokenizer.convert_tokens_to_ids("red")
    cfg = unigrpo.get_config(["--group_size=4", "--max_new_tokens=40", "--kl_beta=0", "--inner_epochs=2", "--lr=3e-3",
                              "--process_reward=false"])
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
    examples = data.make_examples("story", 4, "rl", seed=0)
    low = policy.janus.config.vq_config.num_embeddings // 2  # the lower half of the codebook

    def score(ro, group):
        live = ro.mask.bool()
        txt, img = live & ~ro.is_image, live & ro.is_image
        r_text = ((ro.ids == red) & txt).sum(1) / txt.sum(1).clamp(min=1)
        r_img = ((ro.ids < low) & img).sum(1) / img.sum(1).clamp(min=1)
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
            "--storyboard_interval=1", "--max_new_tokens=60", "--log_interval=1", "--warmup_lr=3e-3", "--run_eval_prompts=6"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "unigrpo.py"), "--stage=grpo", *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, args, r


def _rows(out, stage, held_out=False):
    """The stage's rows of metrics.jsonl: its steps, or (held_out) GRPO's held-out evaluations."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if row["stage"] == stage and ("eval/reward" in row) == held_out]


def test_held_out_evaluation_during_grpo_and_the_before_after_table(pipeline):
    """GRPO evaluates on held-out prompts at iteration 0 (the warm-up) and at its end, logs eval/* rows, and
    prints the two side by side with their change."""
    out, _, r = pipeline
    evals = _rows(out, "grpo", held_out=True)
    assert [row["iter"] for row in evals] == [0, 2]
    for row in evals:
        for k in ("oracle_step", "oracle_text", "oracle_image", "format", "understanding_acc", "t2i_acc"):
            assert 0 <= row[f"eval/{k}"] <= 1, k
        assert 0 <= row["eval/reward"] <= 3
    lines = r.stdout[r.stdout.index("held-out prompts (6 interleaved"):].splitlines()
    table = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in lines[2:5]}
    cols = ("oracle_step", "oracle_text", "oracle_image", "format", "reward", "understanding_acc", "t2i_acc")
    assert lines[1].split() == list(cols)
    assert table["warm-up"] == pytest.approx([evals[0][f"eval/{c}"] for c in cols], abs=6e-4)
    assert table["GRPO"] == pytest.approx([evals[1][f"eval/{c}"] for c in cols], abs=6e-4)
    assert table["change"] == pytest.approx([b - a for a, b in zip(table["warm-up"], table["GRPO"])], abs=2e-3)
    assert "python eval.py --out_dir" in lines[5]


def test_evaluation_uses_common_random_numbers(tiny, tmp_path):
    """Each prompt draws its own noise: evaluating one model on a prefix of the prompts, or in another batch
    layout, gives those prompts the same answers (so warm-up and GRPO are compared on the same draws)."""
    cfg = unigrpo.get_config([f"--out_dir={tmp_path}", "--max_new_tokens=30"])
    exs = data.make_examples("story", 5, "eval", seed=cfg.seed)
    gens = lambda ids: [torch.Generator().manual_seed(1_000_003 * 7 + i) for i in ids]
    all5 = unigrpo.sample_interleaved(tiny, [e.prompt for e in exs], 1.0, 30, 32, 4, gens(range(5)))
    last2 = unigrpo.sample_interleaved(tiny, [e.prompt for e in exs[3:]], 1.0, 30, 32, 4, gens(range(3, 5)))
    T = last2.ids.shape[1]
    assert torch.equal(all5.ids[3:, :T], last2.ids) and torch.equal(all5.mask[3:, T:], torch.zeros_like(all5.mask[3:, T:]))


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
    with pytest.raises(SystemExit, match="was trained with --lora_rank=4"):
        unigrpo.main([a for a in args if not a.startswith("--lora_rank")] + ["--grpo_iters=4"])
    monkeypatch.undo()
    assert unigrpo.load_model(str(run / "grpo"), "cpu").lora is not None
    # eval.py lists the adapters-only checkpoint (no config.json) and --benchmark picks it as the latest stage
    import eval as E
    assert set(E.main([f"--out_dir={run}", "--eval_prompts=4", "--max_new_tokens=40"])) == {"warmup", "grpo"}
    bench = E.main(["--benchmark=mmie", f"--data_path={os.path.join(ROOT, 'tests', 'fixtures', 'mmie')}", f"--out_dir={run}",
                    "--limit=1", "--max_new_tokens=40"])
    assert bench["checkpoint"] == str(run / "grpo"), bench["checkpoint"]


def _rows_so_far(out, stage):
    """metrics.jsonl of a run in progress: a torn last line is not a row yet."""
    rows = []
    with contextlib.suppress(FileNotFoundError), open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return [row for row in rows if row["stage"] == stage]


def _weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def _killed_resumed_and_uninterrupted(run, ref, stage, args, every, total):
    """SIGKILL `python unigrpo.py ARGS` in run/ once it has logged a row past its first checkpoint (so between
    two checkpoints), resume it with the same command, run it uninterrupted in ref/; both stage checkpoints."""
    cmd = [sys.executable, os.path.join(ROOT, "unigrpo.py"), f"--stage={stage}", *args]
    p = subprocess.Popen(cmd + [f"--out_dir={run}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while p.poll() is None and not any(row["iter"] >= every for row in _rows_so_far(run, stage)):
        time.sleep(0.01)
    p.kill()
    assert p.wait() == -signal.SIGKILL, p.stderr.read().decode()[-3000:]
    at = unigrpo.load_state(os.path.join(run, stage))["iter"]
    logged = [row["iter"] for row in _rows_so_far(run, stage)]
    assert at % every == 0 and 0 < at < total and max(logged) >= at, (at, logged)  # rows a resume must drop
    r = subprocess.run(cmd + [f"--out_dir={run}"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at iter {at}" in r.stdout and "metrics row(s) past iter" in r.stdout, r.stdout
    unigrpo.main([f"--stage={stage}", *args, f"--out_dir={ref}"])
    assert [row["iter"] for row in _rows(run, stage)] == list(range(total))  # one row per iteration
    assert [row["loss"] for row in _rows(run, stage)] == pytest.approx([row["loss"] for row in _rows(ref, stage)], abs=1e-5)
    a, b = _weights(os.path.join(run, stage)), _weights(os.path.join(ref, stage))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"{stage}: killed at iter {max(logged)} (checkpoint {at}), resumed: max |weight difference| {diff:.2e}, "
          f"{len(_rows(run, stage))} rows for {total} iterations")
    assert a.keys() == b.keys() and diff < 1e-5, diff


def test_killed_grpo_run_resumes_to_the_uninterrupted_result(pipeline, monkeypatch, tmp_path):
    """A real SIGKILL between two GRPO checkpoints; the resumed run ends where an uninterrupted one does."""
    run, ref = tmp_path / "killed", tmp_path / "whole"
    _warmed_up_copy(pipeline, run, monkeypatch), _warmed_up_copy(pipeline, ref, monkeypatch)
    args = ["--warmup_iters=40", "--grpo_iters=6", "--ckpt_interval=2", "--prompts_per_step=2", "--group_size=2",
            "--max_new_tokens=40", "--storyboard_interval=100"]
    _killed_resumed_and_uninterrupted(run, ref, "grpo", args, every=2, total=6)


def test_killed_warmup_resumes_to_the_uninterrupted_result(pipeline, tmp_path):
    import shutil
    run, ref = tmp_path / "killed", tmp_path / "whole"
    for d in (run, ref):
        shutil.copytree(os.path.join(pipeline[0], "prepare"), d / "prepare")
    args = ["--warmup_iters=12", "--ckpt_interval=4", "--warmup_batch_size=8", "--n_understanding=40", "--warmup_lr=3e-3",
            "--max_new_tokens=40"]
    _killed_resumed_and_uninterrupted(run, ref, "warmup", args, every=4, total=12)


def test_resume_refuses_a_changed_flag_and_notes_a_safe_one(pipeline, capsys):
    out, args, _ = pipeline
    grpo_args = [a for a in args if not a.startswith("--grpo_iters")]
    with pytest.raises(SystemExit) as err:
        unigrpo.main(["--stage=grpo", *grpo_args, "--grpo_iters=9", "--kl_beta=0.5", "--group_size=3"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert f"--group_size=2, --kl_beta={unigrpo.DEFAULTS['kl_beta']}" in msg and "--group_size=3, --kl_beta=0.5" in msg and "new --out_dir" in msg, msg
    state = unigrpo.load_state(os.path.join(out, "grpo"))
    cfg = unigrpo.get_config([*grpo_args, "--grpo_iters=9", "--lr=1e-4", "--log_interval=5"])
    unigrpo.check_resume(cfg, state, "grpo", "ck")
    printed = capsys.readouterr().out
    assert f"--lr=0.0001 (the checkpoint's run had {unigrpo.DEFAULTS['lr']!r}): applies from iter" in printed and "--grpo_iters=9" in printed
    assert "log_interval" not in printed



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
    flags = [f"--out_dir={run}", *files, "--warmup_iters=3", "--warmup_batch_size=8", "--cfg_dropout=0.5", "--grpo_iters=1",
             "--prompts_per_step=2", "--group_size=2", "--max_new_tokens=40", "--storyboard_interval=1", "--run_eval_prompts=4"]
    unigrpo.main(["--stage=grpo", *flags])
    import eval as E
    E.main(flags)
    assert [r["iter"] for r in _rows(run, "warmup")] == [0, 1, 2] and [r["iter"] for r in _rows(run, "grpo")] == [0]
    assert all("eval/oracle_step" not in r for r in _rows(run, "grpo", held_out=True))
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


def test_micro_batches_give_the_update_of_one_batch(tiny):
    """The update in micro-batches (each cut to its own length, gradients accumulated) moves the weights
    as one forward over the whole batch does, for both loss types."""
    import copy
    for loss_type in ("sequence", "token"):
        out = []
        for micro in (64, 3):
            torch.manual_seed(0)
            policy = copy.deepcopy(tiny)
            bias_text_logits(policy, boi_id=2.0)  # images too
            cfg = unigrpo.get_config(["--group_size=2", "--max_new_tokens=40", "--kl_beta=0.04", "--inner_epochs=2",
                                      "--lr=1e-3", f"--micro_batch={micro}", f"--loss_type={loss_type}", "--process_reward=false"])
            opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
            score = lambda ro, group: {"reward": (ro.ids[:, :5] % 7).float().sum(1)}  # unequal within groups
            gens = [torch.Generator().manual_seed(i) for i in range(4)]
            m = unigrpo.grpo_step(policy, copy.deepcopy(tiny), opt, data.make_examples("story", 4, "rl", seed=0), score, cfg, gens)
            out.append((m, {k: v.detach().clone() for k, v in policy.named_parameters()}))
        (m1, w1), (m3, w3) = out
        assert m1["loss"] == pytest.approx(m3["loss"], abs=1e-5) and m1["kl"] == pytest.approx(m3["kl"], abs=1e-6)
        # Adam divides by sqrt(v): the sums' rounding (other order in micro-batches) reaches the weights at up to
        # ~2.5e-5 (measured, fan-in image paths) of a 2e-3 move
        assert max((w1[k] - w3[k]).abs().max().item() for k in w1) < 5e-5, loss_type
        w0 = dict(tiny.named_parameters())
        assert max((w1[k] - w0[k]).abs().max().item() for k in w1) > 1e-4  # the step did move the weights


def test_length_chunks_pad_least_in_as_many_forwards():
    """The warm-up's chunks: every row once, shortest first, no more chunks than fixed chunks of `rows` would make,
    none over the memory of `rows` longest rows, and the fewest padded tokens (checked against every split)."""
    import itertools
    import random
    rng = random.Random(0)
    for trial in range(200):
        n, rows = rng.randint(1, 9), rng.randint(1, 4)
        lengths = [rng.choice((rng.randint(1, 8), rng.randint(20, 60))) for _ in range(n)]
        chunks = unigrpo.length_chunks(lengths, rows)
        flat = [i for c in chunks for i in c]
        assert sorted(flat) == list(range(n)) and [lengths[i] for i in flat] == sorted(lengths)
        k, cap = -(-n // rows), rows * max(lengths)
        padded = lambda split: sum(max(lengths[i] for i in c) * len(c) for c in split)
        assert len(chunks) <= k and all(padded([c]) <= cap for c in chunks)
        order = sorted(range(n), key=lambda i: lengths[i])
        best = min(padded(split) for m in range(k) for cuts in itertools.combinations(range(1, n), m)
                   for split in [[order[a:b] for a, b in zip((0, *cuts), (*cuts, n))]]
                   if all(padded([c]) <= cap for c in split))
        assert padded(chunks) == best, (lengths, rows)
    # the default warm-up batch's shape: 21 short rows and 3 long ones take 3 forwards, the long ones alone
    assert unigrpo.length_chunks([30] * 21 + [80] * 3)[-1] == [21, 22, 23]


def test_micro_batches_sort_groups_by_their_cost():
    """A group costs its prompt once and its longest answer G times: a long-prompt, short-answer group goes with
    the short ones, not with the long answers."""
    G, T = 2, 10
    prompt_len, answer_len = [2, 9, 2], [8, 8, 1, 1, 9, 9]  # per group and per row: the groups cost 18, 11 and 20
    B = len(answer_len)  # (by prompt + answer: 10, 10 and 11)
    prompt_mask = torch.tensor([[0] * (9 - prompt_len[g // G]) + [1] * prompt_len[g // G] for g in range(B)])
    mask = torch.tensor([[1.0] * answer_len[g] + [0.0] * (T - answer_len[g]) for g in range(B)])
    z = torch.zeros(B, T, dtype=torch.long)
    ro = unigrpo.Trajectories(prompt_mask.clone(), prompt_mask, [[]] * B, z, z.bool(), z, z.float(), mask,
                              torch.ones(B, dtype=torch.bool))
    rows = [r.tolist() for r, _ in unigrpo.micro_batches(ro, 2 * G, G)]
    assert rows == [[2, 3, 0, 1], [4, 5]]
