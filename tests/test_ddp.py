"""Scale: a 2-process torchrun (gloo, CPU) run agrees with a 1-process run on the same global batch;
rollouts do not depend on the rank layout; the loss normalisation under sharding; gradient
checkpointing and bf16 autocast wiring; the memory estimate of --dry_run."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import data
import unigrpo
from conftest import bias_text_logits
from unigrpo import grpo_loss, make_batch, sample_interleaved, sequence_logprobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _two_processes_can_start():
    """torchrun --standalone needs torch.distributed with gloo and a local TCP port."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        return False
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
        return True
    except OSError:
        return False


# tiny budgets; 'token' loss because its normalisation is the one that needs a global count
ARGS = ["--stage=grpo", "--vq_steps=1", "--clip_steps=2", "--warmup_iters=3", "--warmup_batch_size=8",
        "--n_understanding=40", "--grpo_iters=2", "--prompts_per_step=4", "--group_size=2", "--max_new_tokens=60",
        "--storyboard_interval=100", "--loss_type=token", "--run_eval_prompts=3"]
# Measured here: the two runs differ by at most 1e-6 in any metric and 2e-6 in any weight (float
# summation order: other batch shapes and paddings, the all-reduce). Skipping the gradient average
# or dividing by each rank's own token count moves grad_norm by 0.4-0.6 and the loss by 0.01-0.14.
TOL = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same stages twice from the same prepared files: torchrun with 2 gloo processes (which also
    runs `prepare`, on the master alone), then 1 process."""
    tmp = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "unigrpo.py", f"--out_dir={tmp / 'two'}", *ARGS],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    shutil.copytree(tmp / "two" / "prepare", tmp / "one" / "prepare")
    one = subprocess.run([sys.executable, "unigrpo.py", f"--out_dir={tmp / 'one'}", *ARGS],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    return tmp / "one", tmp / "two", two


def _rows(out, held_out=False):
    """The step rows of metrics.jsonl, or (held_out) GRPO's held-out evaluations (the master's alone)."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if ("eval/reward" in row) == held_out]


@pytest.mark.skipif(not _two_processes_can_start(), reason="torch.distributed/gloo or a local port is unavailable")
def test_two_processes_agree_with_one_on_the_same_global_batch(runs):
    from safetensors.torch import load_file
    one, two, _ = runs
    a, b = _rows(one), _rows(two)
    assert [(r["stage"], r["iter"]) for r in a] == [(r["stage"], r["iter"]) for r in b]
    assert [r["stage"] for r in a].count("grpo") == 2 and [r["stage"] for r in a].count("warmup") == 3
    assert [r["iter"] for r in _rows(one, True)] == [r["iter"] for r in _rows(two, True)] == [0, 2]  # before and after
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if k not in ("stage", "iter", "sec") and not k.startswith("time/"):
                assert abs(x[k] - y[k]) <= TOL * (1 + abs(x[k])), (x["stage"], x["iter"], k, x[k], y[k])
    assert any(r["stage"] == "grpo" and r["grad_norm"] > 0.1 for r in a), "the check needs a real update"
    for stage in ("warmup", "grpo"):
        wa, wb = load_file(str(one / stage / "model.safetensors")), load_file(str(two / stage / "model.safetensors"))
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < TOL, stage


@pytest.mark.skipif(not _two_processes_can_start(), reason="torch.distributed/gloo or a local port is unavailable")
def test_two_processes_write_one_set_of_outputs(runs):
    one, two, r = runs
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))
    assert sorted(os.listdir(two / "storyboards")) == sorted(os.listdir(one / "storyboards"))
    assert not [d for d in os.listdir(two) if d.endswith((".tmp", ".old"))]
    assert r.stdout.count("prepare: tiny CLIP (clip)") == 1 and r.stdout.count("[grpo] iter 1") == 1  # one voice


@pytest.fixture(scope="module")
def fsdp_runs(runs, tmp_path_factory):
    """The DDP test's stages again with --fsdp over 2 gloo processes, from the same prepared files; then both the
    FSDP run and a copy of the 1-process run resume for one more GRPO iteration."""
    one, two, _ = runs
    tmp = tmp_path_factory.mktemp("fsdp")
    shutil.copytree(two / "prepare", tmp / "fsdp" / "prepare")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "unigrpo.py",
                f"--out_dir={tmp / 'fsdp'}", *ARGS, "--fsdp"]
    r = subprocess.run(torchrun, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.copytree(tmp / "fsdp", tmp / "fsdp_at_2")
    shutil.copytree(one, tmp / "one")
    more = [a for a in ARGS if not a.startswith("--grpo_iters")] + ["--grpo_iters=3"]
    for cmd in ([*torchrun[:-len(ARGS) - 1], *more, "--fsdp"], [sys.executable, "unigrpo.py", f"--out_dir={tmp / 'one'}", *more]):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-3000:]
    return one, tmp / "fsdp_at_2", tmp / "one", tmp / "fsdp"


def _max_gaps(a, b):
    """Largest metric gap (relative above 1) and largest weight gap of two out_dirs, per stage."""
    from safetensors.torch import load_file
    x, y = _rows(a), _rows(b)
    assert [(r["stage"], r["iter"]) for r in x] == [(r["stage"], r["iter"]) for r in y]
    metric = max(abs(p[k] - q[k]) / (1 + abs(p[k])) for p, q in zip(x, y) for k in p
                 if k not in ("stage", "iter", "sec") and not k.startswith("time/"))
    weights = {}
    for stage in ("warmup", "grpo"):
        wa, wb = load_file(str(a / stage / "model.safetensors")), load_file(str(b / stage / "model.safetensors"))
        assert sorted(wa) == sorted(wb), stage  # an ordinary save_pretrained folder: the same tensors, whole
        weights[stage] = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    return metric, weights


@pytest.mark.skipif(not _two_processes_can_start(), reason="torch.distributed/gloo or a local port is unavailable")
def test_fsdp_two_processes_agree_with_one_and_resume(fsdp_runs):
    """FSDP2 (fully_shard over the decoder layers, then the root) on 2 gloo processes: the same metrics and
    gathered checkpoints as one unsharded process, and after both resume for one more GRPO iteration too."""
    one, fsdp, one_resumed, fsdp_resumed = fsdp_runs
    for a, b, what in ((one, fsdp, "run"), (one_resumed, fsdp_resumed, "resumed")):
        metric, weights = _max_gaps(a, b)
        print(f"FSDP vs 1 process ({what}): max metric gap {metric:.1e}, max weight gap {weights}")
        assert metric <= TOL and max(weights.values()) < TOL, (what, metric, weights)
    assert [r["iter"] for r in _rows(fsdp_resumed) if r["stage"] == "grpo"] == [0, 1, 2]
    state = torch.load(fsdp_resumed / "grpo" / "trainer_state.pt", weights_only=False)
    assert state["iter"] == 3 and all(isinstance(k, str) for k in state["optimizer"]["state"])  # gathered by name: sharded
    from safetensors.torch import load_file
    w2, w3 = (load_file(str(d / "grpo" / "model.safetensors")) for d in (fsdp, fsdp_resumed))
    assert max((w2[k] - w3[k]).abs().max().item() for k in w2) > 1e-5  # the resumed iteration trained (measured 6e-5)


def test_prompts_per_step_must_split_into_whole_groups(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(unigrpo, "world_size", lambda: 2)  # as under torchrun --nproc_per_node=2, before any work
    with pytest.raises(SystemExit, match=r"--prompts_per_step=3 must be divisible by the number of processes \(2\)"):
        unigrpo.main([f"--out_dir={tmp_path}", "--stage=grpo", "--prompts_per_step=3"])
    assert os.listdir(tmp_path) == []


def _rows_of(tiny, n_prompts, G):
    ex = data.make_examples("continuation", n_prompts // 2, "rl", seed=3) + data.make_examples("story", n_prompts // 2, "rl", seed=3)
    return [e.prompt for e in ex for _ in range(G)]


def test_rollouts_do_not_depend_on_the_rank_layout(tiny):
    """Per-group generators: a group samples the same tokens in a batch of 4 groups or of 2 (the halves
    two ranks would hold), so N processes sample what one does."""
    bias_text_logits(tiny, boi_id=2.5)  # images too
    try:
        rows = _rows_of(tiny, 4, 2)
        gens = lambda groups: [torch.Generator().manual_seed(100 + p) for p in groups]
        whole = sample_interleaved(tiny, rows, max_new_tokens=50, generator=gens(range(4)))
        assert (whole.is_image & whole.mask.bool()).sum() > 10
        for h in (0, 1):
            half = sample_interleaved(tiny, rows[4 * h:4 * h + 4], max_new_tokens=50, generator=gens(range(2 * h, 2 * h + 2)))
            T = half.ids.shape[1]
            assert torch.equal(whole.ids[4 * h:4 * h + 4, :T], half.ids)
            assert not whole.mask[4 * h:4 * h + 4, T:].any()  # nothing sampled after the half stopped
            torch.testing.assert_close(whole.logp[4 * h:4 * h + 4, :T], half.logp, atol=1e-5, rtol=0)
    finally:
        del tiny.text_logits


@pytest.mark.parametrize("loss_type", ["sequence", "token"])
def test_rank_averaged_sharded_loss_equals_the_global_loss(loss_type):
    """Two 'ranks' with whole groups and unequal token counts: averaging their losses and gradients, as
    DDP does, equals the loss and gradient on the whole batch when 'token' divides by global count / 2."""
    torch.manual_seed(0)
    B, T = 8, 9
    logp = torch.randn(B, T, requires_grad=True)
    old, ref = logp.detach() + 0.1 * torch.randn(B, T), logp.detach() + 0.1 * torch.randn(B, T)
    adv = torch.randn(B, 1).expand(B, T)
    mask = (torch.rand(B, T) > 0.2).float()
    mask[:4, 4:] = 0  # rank 0 holds far fewer tokens
    full = grpo_loss(logp, old, ref, adv, mask, loss_type=loss_type)[0]
    shards = (slice(0, 4), slice(4, 8))
    avg = sum(grpo_loss(logp[s], old[s], ref[s], adv[s], mask[s], loss_type=loss_type, n_tokens=mask.sum() / 2)[0]
              for s in shards) / 2
    torch.testing.assert_close(avg, full)
    torch.testing.assert_close(torch.autograd.grad(avg, logp)[0], torch.autograd.grad(full, logp)[0])
    naive = sum(grpo_loss(logp[s], old[s], ref[s], adv[s], mask[s], loss_type=loss_type)[0] for s in shards) / 2
    assert (abs(naive.item() - full.item()) > 1e-3) == (loss_type == "token")  # per-rank token means would be wrong


def test_grad_checkpointing_gives_the_same_gradients(tiny):
    import copy
    batch = make_batch(tiny, data.make_examples("story", 2, "rl", seed=0))
    grads = []
    for on in (False, True):
        m = unigrpo.for_training(copy.deepcopy(tiny), unigrpo.get_config([f"--grad_checkpointing={on}"])).train()
        assert m.janus.is_activation_checkpointing == on
        logp, _ = sequence_logprobs(m, batch)
        (-(logp * batch.mask).sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_bf16_autocast_computes_in_bf16_and_keeps_float32_weights(tiny):
    import copy
    m = copy.deepcopy(tiny).train()
    batch = make_batch(m, data.make_examples("story", 2, "rl", seed=0))
    fp32, _ = sequence_logprobs(m, batch)
    with unigrpo.autocast(unigrpo.get_config(["--dtype=bfloat16"]), "cpu"):
        h = m.trunk(m.embed(batch.ids, batch.is_image), torch.ones_like(batch.ids), torch.arange(batch.ids.shape[1])[None])
        logits = m.text_logits(h)
        bf16, _ = sequence_logprobs(m, batch)
    assert logits.dtype == torch.bfloat16 and bf16.dtype == torch.float32  # matmuls in bf16, log-softmax in float32
    live = batch.mask.bool()
    assert 0 < (bf16 - fp32)[live].abs().max() < 0.3  # bf16 rounding, not a different model
    (-(bf16 * batch.mask).sum()).backward()
    assert all(p.grad.dtype == torch.float32 for p in m.parameters() if p.grad is not None)


def test_memory_estimate_rows_follow_the_config(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    est = lambda *a: unigrpo.memory_estimate(unigrpo.get_config(["--preset=janus-pro-7b", *a]))
    full = est()
    assert 7.3e9 < full["params"] < 7.5e9 and 2.0e9 < est("--preset=janus-pro-1b")["params"] < 2.2e9
    w, g, adam, ref = (full["table"][k] for k in ("weights", "gradients", "AdamW states", "reference model"))
    assert w[0] == 4 * full["params"] and adam[0] == 2 * g[0] < 8 * full["params"]  # the VQ is frozen
    assert ref == (4 * full["params"], w[1], 0)  # float32, as the policy; LoRA reuses the base with adapters off
    assert est("--kl_beta=0")["table"]["reference model"] == (0, 0, 0)
    assert full["peak"][2] < full["peak"][0] / 2
    assert est("--grad_checkpointing=false")["table"]["activations"][0] > 5 * full["table"]["activations"][0]
    monkeypatch.setenv("WORLD_SIZE", "4")
    split = est()
    assert split["rows"] * 4 == full["rows"] and split["table"]["weights"][0] == w[0]  # DDP replicates
    assert split["table"]["AdamW states"][1] == adam[0] / 4 and split["peak"][1] < split["peak"][0] / 2  # FSDP splits
    assert "--fsdp splits them over the 4 GPU(s)" in unigrpo.format_memory(split)
