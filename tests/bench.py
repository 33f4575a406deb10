"""Speed benchmark (not collected by pytest): prints the command, the machine and ONE markdown table.

    python tests/bench.py                  # CPU, one torch thread: a few minutes
    python tests/bench.py --quick          # smoke run of every row on tiny sizes: seconds
    python tests/bench.py --pipeline       # + `python unigrpo.py --stage grpo` from an empty out_dir: minutes
    python tests/bench.py --out_dir out    # + a GRPO step of the trained checkpoint in out/grpo (real rollouts)
    python tests/bench.py --device cuda --repeats 5
    python tests/bench.py --vs_trl --vs_trl_threads 1,2   # only: a GRPO step against TRL's GRPOTrainer (CPU, minutes)

Rows (every time is the median of --repeats runs after one untimed warm-up run; --quick shrinks every size):
- sampler: `sample_interleaved` against transformers' `generate` on the same tiny Janus (random weights), batch
  32, temperature 1, full softmax, timed in alternating pairs in one run, as tokens/s and the median of the
  per-pair ratios (robust to the load of a shared machine). Text-only: 64 tokens a row
  (<begin_of_image> and EOS suppressed in ours, min_new_tokens in HF's). Image-only: one image a row, ours
  opening it itself (<begin_of_image> made certain), HF's generation_mode="image" from the prompt +
  <begin_of_image>; both with CFG 2 (HF's image mode always guides); the image codes are counted.
- GRPO step: `grpo_step` with its own timers (sampling, reward scoring, reference log-probs, policy update), a
  random-weight policy, an untrained toy CLIP and the toy critic, lr 0 and the same rollout seeds in every
  repeat (so every repeat does the same work), 8 prompts (story, how-to, continuation); G = 2, 4, 8 at k = 2
  images per trajectory, k = 1..4 at G = 4, and 16 / 64 tokens per image at G = 4, k = 2.
  Images per trajectory are forced to exactly k: EOS is suppressed, <begin_of_image> gets the logit bias that
  makes it the next text token with probability P_BOI (text segments of ~3 tokens), and max_images=k ends a
  row when it opens image k+1; the token budget k*(N+2) + (k+1)*max_text_tokens never binds.
  Tokens per image N: the default config's grid, and tiny Janus models with image_size 32 and patch 8 (4x4 =
  16) or patch 4 (8x8 = 64); random-weight VQ.
- calls per GRPO step: the functions grpo_step reaches are wrapped and counted for one step, and the verdict
  is "ok" or "CHECK: what differs" against what one step should do: the trunk (sampler forwards vs
  teacher-forced passes), sequence_logprobs without a graph once (the reference; old log-probs come from the
  sampler) and with a graph once per inner epoch, decode_rollout / VQ decode / CLIP once; also the share of
  sampler row-steps still live and of teacher-forced positions that are real tokens rather than padding.
- warm-up step: one step of stage 1 (teacher-forced NLL on the hybrid mix, AdamW), to project the pipeline.
- pipeline (--pipeline): the default `python unigrpo.py --stage grpo --out_dir TMP`, wall time, its split from
  TMP/metrics.jsonl, peak RSS of the child (resource.getrusage(RUSAGE_CHILDREN).ru_maxrss).
- --vs_trl (alone): `grpo_step` against TRL's `GRPOTrainer` (tests/bench_trl.py, run by --trl_python or
  $UNIGRPO_TRL_PYTHON: a venv of its own, trl is no dependency; without it the TRL side is skipped and the
  message says how to make one) on one matched text-only setting: a random-weight Llama trunk 128 x 4 (I 512,
  4 heads, the toy vocabulary) on both sides, 8 prompts of 8 tokens x G = 4, exactly 40 new tokens a
  completion (ours: EOS and <begin_of_image> biased away; TRL: min_new_tokens), temperature 1, full softmax,
  k3 KL 0.04 to a frozen reference, one update pass, AdamW, the same cheap reward of the token ids. Timed in
  alternating pairs {TRL child doing --vs_trl_steps steps, ours the same} with the order swapped every pair, at
  each of --vs_trl_threads; medians per side, the median of per-pair ratios ours/TRL, and each side's phase
  split against that phase's floor: analytic FLOPs (2 x matmul params x tokens a forward, 3x with the backward)
  at the torch.mm rate measured here on the same shapes and thread count.
Peak memory: the highest RSS during the row (Linux: VmHWM, reset per row through /proc/self/clear_refs;
elsewhere the process's ru_maxrss so far); on CUDA also torch.cuda.max_memory_allocated.
"""
import argparse
import collections
import contextlib
import copy
import ctypes
import gc
import inspect
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import rewards  # noqa: E402
import unigrpo  # noqa: E402
from conftest import bias_text_logits  # noqa: E402

P_BOI = 0.25  # forced-image rows: chance that a text token is <begin_of_image> (text segments of ~3 tokens)


def log(msg):  # progress on stderr: stdout holds only the report
    print(msg, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# timing and memory


def sync(dev):
    if str(dev).startswith("cuda"):
        torch.cuda.synchronize()


def median_run(fn, repeats, dev, first=None):
    """(seconds, result) of the median of `repeats` timed calls, after one untimed warm-up call (run inside
    the context manager `first` when given: the call that is counted)."""
    with first or contextlib.nullcontext():
        fn()  # the first call pays for allocator growth and kernel selection
    runs = []
    for _ in range(max(1, repeats)):
        sync(dev)
        t = time.perf_counter()
        out = fn()
        sync(dev)
        runs.append((time.perf_counter() - t, out))
    return sorted(runs, key=lambda r: r[0])[len(runs) // 2]


def paired_runs(ours, theirs, repeats, dev):
    """Median seconds of two warmed-up functions timed in alternating pairs (order swapped every pair), so that
    both see the same load on a shared machine, and the median of the per-pair ratios theirs/ours."""
    t = {ours: [], theirs: []}
    for i in range(max(1, repeats)):
        for f in ((ours, theirs) if i % 2 == 0 else (theirs, ours)):
            sync(dev)
            t0 = time.perf_counter()
            f()
            sync(dev)
            t[f].append(time.perf_counter() - t0)
    return statistics.median(t[ours]), statistics.median(t[theirs]), statistics.median(b / a for a, b in zip(t[ours], t[theirs]))


def _maxrss_mib(who=resource.RUSAGE_SELF):
    r = resource.getrusage(who).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def current_rss():
    with contextlib.suppress(OSError, AttributeError):
        with open("/proc/self/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024
    return float("nan")


def reset_peak(dev):
    """Start a row's memory peak from what is live now; returns that RSS (MiB)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap mapped; hand it back first
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset VmHWM (the peak RSS) to the current RSS
    if str(dev).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    return current_rss()


def peak_memory(dev, start):
    try:
        with open("/proc/self/status") as f:
            rss = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024
    except (OSError, AttributeError):
        rss = _maxrss_mib()  # the whole process's peak so far
    s = f"RSS {rss:.0f} (row start {start:.0f})"
    if str(dev).startswith("cuda"):
        s += f", CUDA {torch.cuda.max_memory_allocated() / 2**20:.0f}"
    return s


# -----------------------------------------------------------------------------
# models and work


def tiny_model(cfg, dev):
    """The toy world's tiny Janus with random weights (the VQ too): speed does not depend on training."""
    from transformers import JanusVQVAE
    torch.manual_seed(0)
    tok = data.build_text_tokenizer()
    vq = JanusVQVAE(data.make_vq_config(cfg.image_size, cfg.patch_size, cfg.codebook_size, cfg.n_embd))
    return unigrpo.UnifiedModel(unigrpo.tiny_janus(tok, vq, cfg).to(dev), tok).eval()


def grid_note(m, cfg):
    want = (cfg.image_size // cfg.patch_size) ** 2
    n = m.n_image_tokens
    return f"{n} tokens/image" + ("" if n == want else f" (asked {want}: this checkout's tiny_janus builds {n})")


def prompts_mix(n, image_size):
    """n GRPO prompts, taking the three interleaved task families in turn (continuation brings context images)."""
    per_task = [data.make_examples(t, -(-n // 3), "rl", seed=0, image_size=image_size) for t in ("story", "howto", "continuation")]
    return [e for trio in zip(*per_task) for e in trio][:n]


@torch.no_grad()
def sampler_rows(cfg, dev, batch, new_tokens, repeats):
    """Our sampler and HF generate on one model, text-only then image-only:
    [(name, setting, our tokens/s, HF's tokens/s, median per-pair throughput ratio)]."""
    m = tiny_model(cfg, dev)
    prompts = [e.prompt for e in data.make_examples("story", batch, "rl", seed=0, image_size=cfg.image_size)]
    ids, mask, _ = unigrpo.pad_prompts(m, prompts)
    ids, mask = ids.to(dev), mask.to(dev)
    gen = lambda: torch.Generator(dev).manual_seed(0)
    same = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=m.pad_id)  # full softmax at T = 1
    rows = []

    def compare(name, setting, ours, theirs, count_ours, count_theirs):
        n_ours, n_hf = count_ours(ours()), count_theirs(theirs())  # also the warm-up calls
        t_ours, t_hf, ratio = paired_runs(ours, theirs, repeats, dev)
        rows.append((name, setting, n_ours / t_ours, n_hf / t_hf, ratio * n_ours / n_hf))
        return n_ours, n_hf

    # HF's generate reads janus.lm_head directly, so the bias on our text_logits steers our sampler alone
    bias_text_logits(m, boi_id=-1e4, eos_id=-1e4)
    compare("text-only", f"batch {batch} x {new_tokens} tokens, no CFG",
            lambda: unigrpo.sample_interleaved(m, prompts, 1.0, new_tokens, new_tokens + 1, generator=gen()),
            lambda: m.janus.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     eos_token_id=m.eos_id, **same),
            lambda ro: int(ro.mask.sum()), lambda out: (out.shape[1] - ids.shape[1]) * batch)

    N = m.n_image_tokens
    bias_text_logits(m, boi_id=1e4)
    img_ids = torch.cat([ids, torch.full((batch, 1), m.boi_id, device=dev)], 1)
    img_mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=dev)], 1)
    m.janus.generation_config.generation_kwargs = {"boi_token_id": m.boi_id}  # HF's image mode needs it
    counts = compare("image-only", f"batch {batch} x 1 image, {grid_note(m, cfg)}, CFG 2",
                     lambda: unigrpo.sample_interleaved(m, prompts, 1.0, N + 1, max_images=1, generator=gen(), cfg_scale=2.0),
                     lambda: m.janus.generate(input_ids=img_ids, attention_mask=img_mask, generation_mode="image",
                                              guidance_scale=2.0, bos_token_id=m.bos_id, **same),
                     lambda ro: int((ro.is_image & ro.mask.bool()).sum()), lambda out: out.numel())
    if counts != (batch * N, batch * N):
        raise RuntimeError(f"image-only: ours wrote {counts[0]} and HF {counts[1]} image tokens, expected {batch} x {N}")
    del m.text_logits
    return rows


@contextlib.contextmanager
def counting(n):
    """Count (and time) into the Counter n the calls that make up a GRPO step, by wrapping the functions
    grpo_step looks up."""
    sampling = [False]
    orig = dict(trunk=unigrpo.UnifiedModel.trunk, vq_decode=unigrpo.UnifiedModel.vq_decode, score=rewards.ClipScorer.score,
                sample_interleaved=unigrpo.sample_interleaved, sequence_logprobs=unigrpo.sequence_logprobs,
                decode_rollout=unigrpo.decode_rollout)

    def timed(name, f):
        def g(*a, **kw):
            t = time.perf_counter()
            out = f(*a, **kw)
            n[name] += 1
            n[name + " s"] += time.perf_counter() - t
            return out
        return g

    def trunk(self, embeds, attention_mask, *a, **kw):
        n["trunk (sampler)" if sampling[0] else "trunk (teacher-forced)"] += 1
        if not sampling[0]:  # the positions the teacher-forced passes compute (logprobs counts the real ones)
            n["teacher-forced cells"] += embeds.shape[0] * embeds.shape[1]
        return orig["trunk"](self, embeds, attention_mask, *a, **kw)

    def sample(*a, **kw):
        sampling[0] = True
        try:
            ro = orig["sample_interleaved"](*a, **kw)
        finally:
            sampling[0] = False
        n["sample_interleaved"] += 1
        n["sampled positions"] += ro.ids.shape[1]
        n["live row-steps"] += ro.mask.mean().item()  # rows still writing (finished rows ride along in the batch)
        return ro

    def logprobs(*a, **kw):
        n["sequence_logprobs (graph)" if torch.is_grad_enabled() else "sequence_logprobs (no graph)"] += 1
        call = inspect.signature(unigrpo._sequence_logprobs).bind(*a, **kw)
        call.apply_defaults()
        ro, G = call.arguments["ro"], call.arguments["group_size"]  # a group's prompt is computed once
        twins = 2 if call.arguments["cfg_scale"] != 1 and ro.is_image.any() else 1
        n["teacher-forced real"] += twins * (ro.prompt_mask[::G].sum().item() + ro.mask.sum().item())
        return orig["sequence_logprobs"](*a, **kw)

    patches = [(unigrpo.UnifiedModel, "trunk", trunk), (unigrpo, "sample_interleaved", sample),
               (unigrpo, "sequence_logprobs", logprobs), (unigrpo, "decode_rollout", timed("decode_rollout", orig["decode_rollout"])),
               (unigrpo.UnifiedModel, "vq_decode", timed("vq_decode", orig["vq_decode"])),
               (rewards.ClipScorer, "score", timed("CLIP score", orig["score"]))]
    for owner, name, f in patches:
        setattr(owner, name, f)
    try:
        yield n
    finally:
        for owner, name, _ in patches:
            setattr(owner, name, orig[name])


def calls_row(n, cfg, uses_ref):
    """What one step called, against what it should call; the last column flags a difference."""
    L, sampler, tf = n["sampled positions"], n["trunk (sampler)"], n["trunk (teacher-forced)"]
    passes = 2 if unigrpo.shared_prompts(cfg) > 1 else 1  # grouped_states: a prompt pass, then the answers'
    want = {"sample_interleaved": 1, "trunk (teacher-forced)": passes * (cfg.inner_epochs + uses_ref),
            "sequence_logprobs (graph)": cfg.inner_epochs, "sequence_logprobs (no graph)": int(uses_ref),
            "decode_rollout": 1, "vq_decode": min(1, n["vq_decode"]), "CLIP score": min(1, n["CLIP score"])}
    bad = [f"{k} {n[k]} (want {v})" for k, v in want.items() if n[k] != v]
    if sampler not in (L, L + 1):  # 1 prefill + L-1 decode forwards (+1 whose output is unused when the budget ends the loop)
        bad.append(f"trunk (sampler) {sampler} for {L} positions")
    detail = (f"sample_interleaved {n['sample_interleaved']}: trunk {sampler} forwards for {L} positions (1 prefill + "
              f"{L - 1} decode{' + 1 unused' if sampler == L + 1 else ''}; {n['live row-steps']:.0%} of row-steps live) · teacher-forced trunk {tf} over {n['teacher-forced real'] / max(n['teacher-forced cells'], 1):.0%} real tokens (the rest padding) = reference "
              f"{int(uses_ref)} + update {cfg.inner_epochs} (inner_epochs) · sequence_logprobs without graph "
              f"{n['sequence_logprobs (no graph)']} (reference; old log-probs from the sampler), with graph "
              f"{n['sequence_logprobs (graph)']} · decode_rollout {n['decode_rollout']} ({n['decode_rollout s']:.2f} s, "
              f"of it VQ decode {n['vq_decode']}x {n['vq_decode s']:.2f} s) · CLIP score {n['CLIP score']}x {n['CLIP score s']:.2f} s")
    return detail, "ok" if not bad else "CHECK: " + "; ".join(bad)


def grpo_setup(cfg, dev, G, k, n_prompts):
    """A random-weight policy + reference writing exactly k images per trajectory (see the docstring)."""
    c = copy.copy(cfg)
    c.group_size, c.max_images = G, k
    policy = tiny_model(c, dev)
    ref = copy.deepcopy(policy).requires_grad_(False)  # before biasing: the bias closes over its own model
    N, V = policy.n_image_tokens, len(policy.tokenizer)
    c.max_new_tokens = k * (N + 2) + (k + 1) * c.max_text_tokens
    boi = math.log(P_BOI / (1 - P_BOI) * (V - 1))  # near-uniform random-weight text logits: P(<boi>) ~ P_BOI
    for m in (policy, ref):
        bias_text_logits(m, boi_id=boi, eos_id=-1e4)
    tok = policy.tokenizer
    critic = rewards.ToyTextCritic(data.parse)
    scorer = rewards.build_toy_clip(rewards.toy_clip_config(tok, c.image_size, c.patch_size), tok)
    return c, policy, ref, critic, scorer, prompts_mix(n_prompts, c.image_size)


def grpo_row(c, policy, ref, critic, scorer, examples, dev, repeats):
    """The median GRPO step (its split is that run's), and the call counts of the warm-up step."""
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=0.0)  # every repeat: same policy
    score = lambda ro, group: unigrpo.score_rollout(policy, ro, group, critic, scorer, c)
    gens = lambda: [torch.Generator(dev).manual_seed(i) for i in range(len(examples))]  # every repeat: same rollouts
    step = lambda: unigrpo.grpo_step(policy, ref, opt, examples, score, c, gens())
    n = collections.Counter()
    total, m = median_run(step, repeats, dev, first=counting(n))
    return total, m, n


def fmt_step(total, m, c):
    return (f"{total:.2f} s", f"sampling {m['time/sampling']:.2f} · scoring {m['time/scoring']:.2f} · reference "
            f"{m['time/reference']:.2f} · update {m['time/update']:.2f} ({c.inner_epochs} epochs) · tokens/trajectory: "
            f"{m['completions/mean_text_tokens']:.1f} text + {m['completions/mean_image_tokens']:.0f} image")


def grpo_sweep(cfg, dev, Gs, ks, grids, base_G, base_k, n_prompts, repeats):
    """GRPO step rows: G at base_k images, images per trajectory at base_G, tokens per image at (base_G, base_k)."""
    todo = [(G, base_k, None) for G in Gs] + [(base_G, k, None) for k in ks] + [(base_G, base_k, g) for g in grids]
    rows, seen, calls = [], set(), None
    for G, k, grid in todo:
        if (G, k, grid) in seen:
            continue
        seen.add((G, k, grid))
        c0 = copy.copy(cfg)
        if grid is not None:  # 32 px: patch 8 -> 4x4 = 16 tokens, patch 4 -> 8x8 = 64
            c0.image_size, c0.patch_size = 32, 32 // int(math.isqrt(grid))
        log(f"GRPO step G={G} k={k} grid={grid or 'default'}")
        start = reset_peak(dev)
        c, policy, ref, critic, scorer, examples = grpo_setup(c0, dev, G, k, n_prompts)
        total, m, n = grpo_row(c, policy, ref, critic, scorer, examples, dev, repeats)
        head, split = fmt_step(total, m, c)
        rows.append(("GRPO step", f"{len(examples)} prompts x G={G}, {k} image(s)/trajectory, {grid_note(policy, c0)}",
                     head, split, peak_memory(dev, start)))
        if (G, k, grid) == (base_G, base_k, None):
            calls = calls_row(n, c, ref is not None) + (f"G={G}, {k} image(s)/trajectory",)
        del policy, ref, critic, scorer
    return rows, calls


def trained_row(cfg, dev, out_dir, repeats, label):
    """A GRPO step of a finished run (real rollout lengths, the trained CLIP), as grpo() sets it up."""
    c = copy.copy(cfg)
    c.out_dir = out_dir
    start = reset_peak(dev)
    policy = unigrpo.load_model(os.path.join(out_dir, "grpo"), dev).eval()
    ref = unigrpo.load_model(os.path.join(out_dir, "warmup"), dev).requires_grad_(False) if c.kl_beta > 0 else None
    critic, scorer = unigrpo.build_scorers(c, policy.tokenizer, dev)
    examples = random.Random(c.seed).sample(unigrpo.rl_prompts(c), c.prompts_per_step)
    total, m, n = grpo_row(c, policy, ref, critic, scorer, examples, dev, repeats)
    head, split = fmt_step(total, m, c)
    return [("GRPO step, trained", f"{label}: {len(examples)} prompts x G={c.group_size}, default limits, "
             f"{policy.n_image_tokens} tokens/image", head, split, peak_memory(dev, start))], \
        calls_row(n, c, ref is not None) + ("trained checkpoint",)


def warmup_stepper(cfg, dev, batch, n_mix, lr=0.0):
    """(model, step): one stage-1 step (the body of unigrpo.warmup's loop) on a batch drawn from a hybrid mix
    of n_mix examples at cfg's ratio, random weights."""
    m = tiny_model(cfg, dev).train()
    mix = data.warmup_mix(n_mix, seed=0, ratio=(cfg.interleaved_ratio, 1.0, 1.0), image_size=cfg.image_size)
    answers = m.encode_answers([e.answer for e in mix])
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(0)

    def step():  # unigrpo's own step: length-sorted chunks of 8, so little padding
        pick = rng.sample(range(len(mix)), batch)
        unigrpo.warmup_step(m, opt, [mix[i] for i in pick], [answers[i] for i in pick], cfg)
    return m, step


def warmup_row(cfg, dev, batch, repeats):
    """One stage-1 step on a small hybrid mix."""
    start = reset_peak(dev)
    m, step = warmup_stepper(cfg, dev, batch, n_mix=batch)
    t, _ = median_run(step, repeats, dev)
    return ("warm-up step", f"batch {batch}, {grid_note(m, cfg)}", f"{t:.3f} s",
            f"x warmup_iters {cfg.warmup_iters} = {t * cfg.warmup_iters / 60:.1f} min of the pipeline", peak_memory(dev, start))


def pipeline_rows(work, extra=()):
    """The default pipeline from an empty out_dir in a child process; its split from metrics.jsonl.
    `extra`: more unigrpo flags (a shortened pipeline for a smoke check; the report row shows them)."""
    out = os.path.join(work, "out")
    cmd = [sys.executable, os.path.join(ROOT, "unigrpo.py"), "--stage", "grpo", "--out_dir", out, *extra]
    log("pipeline: " + " ".join(cmd[1:]) + " (minutes)")
    t = time.perf_counter()
    with open(os.path.join(work, "pipeline.log"), "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t
    if rc:
        raise SystemExit(f"bench: the pipeline failed with exit code {rc}; its output is in {os.path.join(work, 'pipeline.log')}")
    warm, grpo, n_grpo = 0.0, collections.Counter(), 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for row in map(json.loads, f):
            if row["stage"] == "warmup":
                warm += row.get("sec", 0.0)
            else:
                n_grpo += 1
                grpo.update({k[5:]: v for k, v in row.items() if k.startswith("time/")})
    g = sum(grpo.values())
    split = (f"warm-up iterations {warm / 60:.1f} min · GRPO iterations {g / 60:.1f} min (sampling {grpo['sampling'] / 60:.1f}, "
             f"scoring {grpo['scoring'] / 60:.1f}, reference {grpo['reference'] / 60:.1f}, update {grpo['update'] / 60:.1f}) · "
             f"the rest (prepare: VQ + 2 CLIPs, loading, checkpoints, storyboards) {(wall - warm - g) / 60:.1f} min")
    note = "" if n_grpo else " (GRPO rows not logged: --log_interval?)"
    setting = " ".join(["python unigrpo.py --stage grpo --out_dir TMP", *extra]) + (" (empty out_dir)" if extra else " (empty out_dir, default config)")
    return ("pipeline", setting, f"{wall / 60:.1f} min",
            split + note, f"RSS {_maxrss_mib(resource.RUSAGE_CHILDREN):.0f} (child)"), out


# -----------------------------------------------------------------------------
# --vs_trl: one GRPO step of ours against TRL's GRPOTrainer (tests/bench_trl.py, in TRL's own venv)

TRL_INSTALL = ("TRL is not a dependency of this project; give it a venv of its own, outside the repository:\n"
               "    python3 -m venv ~/trl-venv && ~/trl-venv/bin/pip install torch==2.14.1 transformers==5.23.0 trl\n"
               "then pass --trl_python ~/trl-venv/bin/python (or export UNIGRPO_TRL_PYTHON=~/trl-venv/bin/python)")


def trunk_linears(H, L, I):
    """(in, out) of every matmul weight a token meets in the Llama trunk: q, k, v, o, gate, up, down per layer."""
    return ([(H, H)] * 4 + [(H, I), (H, I), (I, H)]) * L


def grpo_flops(H, L, I, V, B, P, T):
    """Analytic FLOPs of one GRPO step's phases on B rows of P prompt + T completion tokens: a forward is
    2 x matmul params x tokens (attention scores, embedding lookups, norms and the optimizer left out), forward +
    backward 3x that. The trunk runs over all P + T positions, the LM head over the T that predict completion
    tokens, in the sampler's decode forwards (prefill + one per token) as in a teacher-forced pass."""
    trunk = sum(i * o for i, o in trunk_linears(H, L, I))
    forward = 2 * B * ((P + T) * trunk + T * H * V)
    return dict(sampling=forward, scoring=0, reference=forward, update=3 * forward)


def matmul_rate(M, shapes, seconds=0.2):
    """The machine's GFLOP/s for torch.mm of M rows through `shapes` (fresh weights each, as a model's layers are),
    at the current torch thread count: what turns FLOPs into a floor in seconds."""
    pairs = [(torch.randn(M, i), torch.randn(i, o)) for i, o in shapes]
    flops = sum(2 * M * i * o for i, o in shapes)
    for x, w in pairs:
        torch.mm(x, w)  # warm-up
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        for x, w in pairs:
            torch.mm(x, w)
        n += 1
    return flops * n / (time.perf_counter() - t0) / 1e9


def trl_side(python):
    """(versions, "") of a Python that can import trl, or (None, why not)."""
    if not python:
        return None, "no TRL python given (--trl_python or UNIGRPO_TRL_PYTHON)"
    probe = "import json, trl, transformers, torch; print(json.dumps(dict(trl=trl.__version__, " \
            "transformers=transformers.__version__, torch=torch.__version__)))"
    try:
        r = subprocess.run([os.path.expanduser(python), "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"cannot run {python}: {getattr(e, 'strerror', None) or e}"
    if r.returncode:
        return None, f"{python} cannot import trl ({(r.stderr.strip().splitlines() or ['?'])[-1]})"
    return json.loads(r.stdout.strip().splitlines()[-1]), ""


def vs_trl_setup(n_prompts, G, new_tokens, prompt_len, n_embd, n_layer, n_head):
    """Our side of the matched setting: the tiny Janus trunk, a frozen reference, text-only rollouts of exactly
    new_tokens tokens (EOS and <begin_of_image> made impossible), n_prompts prompts of prompt_len tokens
    (<bos> + words + <sep>); also each prompt's tokens as a string that TRL's tokenizer maps to the same ids."""
    T = new_tokens
    cfg = unigrpo.get_config(["--n_embd", str(n_embd), "--n_layer", str(n_layer), "--n_head", str(n_head),
                              "--group_size", str(G), "--inner_epochs", "1", "--max_images", "0", "--process_reward", "False",
                              "--max_new_tokens", str(T), "--max_text_tokens", str(T + 1), "--kl_beta", "0.04", "--lr", "1e-6",
                              "--loss_type", "sequence", "--micro_batch", str(n_prompts * G), "--temperature", "1.0",
                              "--cfg_scale", "1.0", "--clip_eps", "0.2", "--grad_clip", "1.0", "--dtype", "float32"])
    policy = tiny_model(cfg, "cpu")
    ref = copy.deepcopy(policy).requires_grad_(False)
    for m in (policy, ref):  # as TRL's min_new_tokens: no row ends early; no image opens
        bias_text_logits(m, boi_id=-1e4, eos_id=-1e4)
    stories = data.make_examples("story", n_prompts, "rl", seed=0, image_size=cfg.image_size)
    examples = [types.SimpleNamespace(prompt=[("text", " ".join(e.prompt[0][1].split()[:prompt_len - 2]))]) for e in stories]
    tok = policy.tokenizer
    ids = [policy.encode_prompt(e.prompt)[0] for e in examples]
    texts = [" ".join(tok.convert_ids_to_tokens(i)) for i in ids]
    if {len(i) for i in ids} != {prompt_len} or [tok(t, add_special_tokens=False).input_ids for t in texts] != ids:
        raise RuntimeError(f"vs_trl: prompts are not {prompt_len} tokens that round-trip through the tokenizer: {texts}")
    return cfg, policy, ref, examples, texts


def even_fraction(ro, group):
    """The reward of both sides (tests/bench_trl.py has the same): the share of even token ids in a completion."""
    m = ro.mask.cpu()
    return {"reward": ((ro.ids.cpu() % 2 == 0).float() * m).sum(1) / m.sum(1).clamp(min=1)}


def our_steps(policy, ref, opt, examples, cfg, k):
    """k GRPO steps, the same rollout seeds each: [(seconds, grpo_step's metrics)]."""
    out = []
    for _ in range(k):
        gens = [torch.Generator("cpu").manual_seed(i) for i in range(len(examples))]
        t = time.perf_counter()
        m = unigrpo.grpo_step(policy, ref, opt, examples, even_fraction, cfg, gens)
        out.append((time.perf_counter() - t, m))
    return out


def trl_steps(python, tok_dir, texts, sizes, threads, k, warmup, seed):
    """k timed TRL steps after `warmup` untimed ones, in a fresh process: bench_trl.py's JSON."""
    cmd = [os.path.expanduser(python), os.path.join(ROOT, "tests", "bench_trl.py"), "--tokenizer", tok_dir,
           "--prompts", json.dumps(texts), "--threads", str(threads), "--steps", str(k), "--warmup", str(warmup),
           "--seed", str(seed), *[f"--{key}={v}" for key, v in sizes.items()]]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tok_dir)
    if r.returncode:
        raise RuntimeError(f"bench: tests/bench_trl.py failed with exit code {r.returncode}:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def median_step(steps):
    """The (seconds, split) of the median step (the upper one of an even count)."""
    return sorted(steps, key=lambda s: s[0])[len(steps) // 2]


def alternate(ours, theirs, pairs):
    """Run the two sides in `pairs` pairs, TRL first in even pairs and ours first in odd ones, so that both see the
    same load: (our steps, their steps, per-pair ratios of the median steps ours/theirs, their last report)."""
    mine, got, ratios, child = [], [], [], None
    for i in range(max(1, pairs)):
        for side in ("theirs", "ours") if i % 2 == 0 else ("ours", "theirs"):
            if side == "ours":
                a = ours()
                mine += a
            elif theirs:
                child = theirs(i)
                b = list(zip(child["steps"], child["splits"]))
                got += b
        if theirs:
            ratios.append(statistics.median(s for s, _ in a) / statistics.median(s for s, _ in b))
    return mine, got, ratios, child


def vs_trl_rows(trl_python, threads=(1,), pairs=5, steps=3, warmup=1, n_prompts=8, G=4, new_tokens=40, prompt_len=8,
                n_embd=128, n_layer=4, n_head=4, seed=0):
    """Ours against TRL in alternating pairs, per thread count: (header lines, table rows). Without a Python that
    has trl, the TRL side is skipped (how to make one goes to stderr) and ours is still timed."""
    versions, why = trl_side(trl_python)
    if versions is None:
        log(f"bench --vs_trl: the TRL row is skipped: {why}.\n{TRL_INSTALL}")
    P, T, B = prompt_len, new_tokens, n_prompts * G
    cfg, policy, ref, examples, texts = vs_trl_setup(n_prompts, G, T, P, n_embd, n_layer, n_head)
    tc = policy.janus.config.text_config
    H, L, I, V, heads = tc.hidden_size, tc.num_hidden_layers, tc.intermediate_size, tc.vocab_size, tc.num_attention_heads
    ours_params = sum(p.numel() for p in policy.janus.model.language_model.parameters()) + policy.janus.lm_head.weight.numel()
    sizes = dict(hidden=H, layers=L, heads=heads, intermediate=I, group=G, new_tokens=T, beta=cfg.kl_beta, lr=cfg.lr)
    flops, shapes = grpo_flops(H, L, I, V, B, P, T), trunk_linears(H, L, I) + [(H, V)]
    setting = (f"{n_prompts} prompts x G={G}, {P} + {T} tokens, Llama {H}x{L} (I {I}, {heads} heads, V {V}), float32, "
               f"k3 KL {cfg.kl_beta}, 1 update pass, AdamW lr {cfg.lr:g}, grad clip {cfg.grad_clip:g}")
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    rows, child, tok_dir = [], None, tempfile.mkdtemp(prefix="unigrpo_bench_tok_")
    try:
        policy.tokenizer.save_pretrained(tok_dir)
        for t in threads:
            torch.set_num_threads(t)
            log(f"vs_trl: torch threads {t}")
            start = reset_peak("cpu")
            rate = dict(decode=matmul_rate(B, shapes), teacher_forced=matmul_rate(B * (P + T), shapes))
            our_steps(policy, ref, opt, examples, cfg, warmup)
            theirs = (lambda i: trl_steps(trl_python, tok_dir, texts, sizes, t, steps, warmup, seed + i)) if versions else None
            ours, got, ratios, child = alternate(lambda: our_steps(policy, ref, opt, examples, cfg, steps), theirs, pairs)
            mem = peak_memory("cpu", start)
            floor = {k: flops[k] / 1e9 / rate["decode" if k == "sampling" else "teacher_forced"] for k in flops}
            split = lambda s, k: f"{k} {s:.3f}" + (f" (floor {floor[k]:.4f}, {s / floor[k]:.1f}x)" if floor[k] else "")
            where = f"{setting}; torch threads {t}"
            t_ours, m = median_step(ours)
            if child:
                t_trl, sp = median_step(got)
                rows.append(("GRPO step, ours vs TRL", where, f"{statistics.median(ratios):.2f}x",
                             f"time ours/TRL, the median of per-pair ratios (< 1: ours faster) · median steps ours "
                             f"{t_ours:.3f} s vs TRL {t_trl:.3f} s · trunk + LM head params ours {ours_params:,} vs TRL "
                             f"{child['params_trunk_head']:,} (of them embedding {V * H:,} vs {child['params_embedding']:,}) · "
                             f"tokens: ours {m['completions/mean_text_tokens']:.0f} a completion, TRL prompt "
                             f"{child['prompt_lens']} completion {child['completion_lens']} · TRL: threads {child['threads']}, "
                             f"{child['attn_implementation']} attention (ours {tc._attn_implementation}), bf16 {child['bf16']}, "
                             f"checkpointing {child['checkpointing']}, {child['optimizer']}",
                             f"ours: {mem}; TRL: RSS {child['peak_rss_mib']:.0f} (child)"))
            rows.append(("GRPO step, ours", where, f"{t_ours:.3f} s",
                         " · ".join(split(m[f"time/{k}"], k) for k in ("sampling", "scoring", "reference", "update"))
                         + " (grpo_step's timers, the median step; floor: analytic FLOPs at the torch.mm rate)", mem))
            if child:
                rows.append(("GRPO step, TRL GRPOTrainer", where, f"{t_trl:.3f} s",
                             " · ".join(split(sp[k], k) for k in ("sampling", "scoring", "reference", "update"))
                             + f" · other {sp['other']:.3f} (tokenise, decode, pad, advantages, metrics) (the median step; "
                             "update: policy log-probs forward + backward, clip, AdamW)",
                             f"RSS {child['peak_rss_mib']:.0f} (child)"))
            rows.append(("matmul rate", f"torch.mm over the trunk's and LM head's weight shapes; torch threads {t}",
                         f"{rate['decode']:.1f} / {rate['teacher_forced']:.1f} GFLOP/s",
                         f"{B} rows (decode, for sampling) / {B * (P + T)} rows (teacher-forced) · FLOPs a step: sampling "
                         f"{flops['sampling'] / 1e9:.2f} G, reference {flops['reference'] / 1e9:.2f} G, update "
                         f"{flops['update'] / 1e9:.2f} G (2 x matmul params x tokens, 3x with the backward)", ""))
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)
    v = child["versions"] if child else versions
    side = (f"trl {v['trl']}, transformers {v['transformers']}, torch {v['torch']}"
            + (f", accelerate {v['accelerate']}, datasets {v['datasets']}, python {v['python']}" if "python" in v else "")
            if v else f"skipped: {why}")
    header = [f"--vs_trl: ours in this process against TRL's GRPOTrainer in a child process ({side}); {pairs} alternating "
              f"pair(s) of {steps} timed step(s) a side, after {warmup} untimed step(s) a side (TRL: in each child); CPU"]
    return header, rows


# -----------------------------------------------------------------------------


def load_average(when):
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"load average (1, 5, 15 min) at {when}: {load}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: every row, tiny sizes, 1 repeat (seconds)")
    ap.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per row, median reported (default 5; --quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; the pipeline's default is one per core)")
    ap.add_argument("--pipeline", action="store_true", help="also time the default pipeline from an empty out_dir (minutes)")
    ap.add_argument("--out_dir", default="", help="a finished run: adds a GRPO step of its trained checkpoint")
    ap.add_argument("--vs_trl", action="store_true", help="only: one GRPO step of ours against TRL's GRPOTrainer (CPU)")
    ap.add_argument("--trl_python", default=os.environ.get("UNIGRPO_TRL_PYTHON", ""),
                    help="a Python with trl installed (default: $UNIGRPO_TRL_PYTHON); without one the TRL side is skipped")
    ap.add_argument("--vs_trl_threads", default="", help="comma-separated torch thread counts, e.g. 1,2 (default --threads)")
    ap.add_argument("--vs_trl_pairs", type=int, default=None, help="alternating pairs {TRL, ours} (default --repeats; --quick 1)")
    ap.add_argument("--vs_trl_steps", type=int, default=None, help="timed steps per side per pair (default 3; --quick 2)")
    ap.add_argument("--vs_trl_warmup", type=int, default=1, help="untimed steps per side before the timed ones (TRL: per process)")
    args = ap.parse_args(argv)
    if args.vs_trl and (args.device not in ("auto", "cpu") or args.pipeline or args.out_dir):
        raise SystemExit("bench: --vs_trl runs alone, on the CPU (TRL's side has use_cpu=True); drop --device/--pipeline/--out_dir")
    dev = "cpu" if args.vs_trl else ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but torch.cuda.is_available() is False; use --device cpu")
    if args.out_dir and not unigrpo.is_checkpoint(os.path.join(args.out_dir, "grpo")):
        raise SystemExit(f"bench: no finished GRPO checkpoint in {args.out_dir}/grpo; run `python unigrpo.py --stage grpo "
                         f"--out_dir {args.out_dir}` first, or drop --out_dir")
    repeats = args.repeats or (1 if args.quick else 5)
    torch.set_num_threads(args.threads)
    __import__("transformers").logging.set_verbosity_error()  # generate's notes on its own defaults, not ours
    torch.manual_seed(0)
    cfg = unigrpo.get_config([])
    q = args.quick
    header = ["command: python tests/bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
              f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, python {platform.python_version()}, "
              f"device {torch.cuda.get_device_name() if dev.startswith('cuda') else dev + ' (' + (platform.processor() or platform.machine()) + ')'}, "
              f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, median of {repeats} repeat(s) after 1 warm-up",
              load_average("start") + f"; RSS after imports {current_rss():.0f} MiB"]
    if args.vs_trl:
        threads = [int(t) for t in (args.vs_trl_threads or str(args.threads)).split(",")]
        more, rows = vs_trl_rows(args.trl_python, threads, args.vs_trl_pairs or repeats,
                                 args.vs_trl_steps or (2 if q else 3), args.vs_trl_warmup)
        header[1] = header[1].split(", torch threads")[0] + f", CPUs {os.cpu_count()}"
        print_report(header[:2] + more + header[2:], rows)
        return rows
    rows = []
    log("sampler vs generate")
    # the bench's batch, then the default GRPO step's (prompts_per_step x group_size rollouts in one call)
    for batch in (4,) if q else (32, cfg.prompts_per_step * cfg.group_size):
        start = reset_peak(dev)
        sampler = sampler_rows(cfg, dev, batch, 8 if q else 64, repeats)
        mem = peak_memory(dev, start)
        for name, setting, ours, hf, ratio in sampler:
            rows.append((f"sampler, {name}", setting, f"{ratio:.2f}x", f"ours {ours:.0f} tok/s vs HF generate {hf:.0f} "
                         "tok/s (medians; the ratio is the median of paired runs)", mem))
    sweep, calls = grpo_sweep(cfg, dev, Gs=(2,) if q else (2, 4, 8), ks=(1,) if q else (1, 2, 3, 4), grids=(16, 64),
                              base_G=2 if q else 4, base_k=1 if q else 2, n_prompts=2 if q else 8, repeats=repeats)
    rows += sweep
    checks = [calls]
    log("warm-up step")
    rows.append(warmup_row(cfg, dev, 4 if q else cfg.warmup_batch_size, repeats))
    work = tempfile.mkdtemp(prefix="unigrpo_bench_") if args.pipeline else None
    try:
        trained = args.out_dir
        if args.pipeline:
            row, trained = pipeline_rows(work)
            rows.append(row)
        if trained:
            log("GRPO step of the trained checkpoint")
            r, c = trained_row(cfg, dev, trained, repeats, args.out_dir or "the pipeline's out_dir")
            rows += r
            checks.append(c)
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)
    for detail, verdict, where in checks:
        rows.append(("calls per GRPO step", where, verdict, detail, ""))
    print_report(header, rows)
    return rows


def print_report(header, rows):
    print("\n".join(header + [load_average("end"), ""]))
    print("| measurement | setting | result | detail | peak memory MiB |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
