"""
Evaluation: the toy benchmark with its oracle, retained abilities, the paper's ablation table, and MMIE /
InterleavedBench from local copies (what their official scorers need: docs/benchmarks.md).

    python eval.py --out_dir out                    # every stage checkpoint in out/ on the same held-out prompts
    python eval.py --ablations --out_dir out        # the paper's ablation table in the toy world (--seeds, --rows)
    python eval.py --benchmark mmie --data_path DIR # generate, write the official scorer's input, print a PROXY score
    python eval.py --benchmark interleavedbench --data_path DIR

eval.py's own flags: --benchmark mmie|interleavedbench, --data_path DIR (or the JSON file), --checkpoint PATH
(default: the latest stage in --out_dir, grpo/ then warmup/), --limit N (first N records), --skip_bad (skip and
list malformed records instead of stopping), --ablations, --seeds N (default 3), --rows KEY,KEY (a subset of the
ablation rows: base, warmup, rf, rt, rv, full, nokl_g2, kl_g2, weak_rv). Every other flag is a unigrpo.py config
key (python unigrpo.py --help) and applies to every stage and ablation row, e.g. the budget: --grpo_iters,
--warmup_iters, --prompts_per_step, --eval_prompts.

The ORACLE is the honest number (no reward model): per expected answer step it parses the text and reads the
image back (data.parse_image). text: the text states the true next scene; image: the image shows the scene its
own text describes; step: both, and the image shows the true scene. A CLIP reward that rises while the oracle
stays flat is reward hacking. Retained abilities (the paper's MME-P / GenEval analogs): understanding and
text-to-image accuracy, both read by the oracle.
"""
import argparse
import gc
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import rewards
import unigrpo

# -----------------------------------------------------------------------------
# The toy evaluation: every stage checkpoint on the same held-out prompts, scored by the oracle

EVAL_COLUMNS = unigrpo.EVAL_METRICS


def evaluate_checkpoint(path, cfg, n=None, critic_scorer=None, seed=0):
    """unigrpo.evaluate on one checkpoint; `seed` picks the sampling noise (the held-out prompts follow cfg.seed)."""
    model = unigrpo.load_model(path, unigrpo.resolve_device(cfg)).eval()
    critic, scorer = critic_scorer or unigrpo.build_scorers(cfg, model.tokenizer, model.device)
    return unigrpo.evaluate(model, critic, scorer, cfg, n or cfg.eval_prompts, seed)


def stage_checkpoints(out_dir):
    """{stage: path} of the stage checkpoints in out_dir, in training order (warmup, grpo); none is an error."""
    paths = {name: os.path.join(out_dir, name) for name in ("warmup", "grpo")}
    stages = {name: p for name, p in paths.items() if unigrpo.is_checkpoint(p)}  # a LoRA run holds adapters only
    if not stages:
        raise SystemExit(f"error: no checkpoint in {out_dir} (looked for grpo/ and warmup/); train one with python "
                         f"unigrpo.py --stage grpo --out_dir {out_dir}, or (--benchmark) pass --checkpoint PATH")
    return stages


def latest_checkpoint(out_dir):
    """out_dir/grpo, else out_dir/warmup."""
    return list(stage_checkpoints(out_dir).values())[-1]  # in training order: the last is the latest


def markdown_table(results):
    """{checkpoint: evaluate's metrics} -> one markdown table; "-" where a checkpoint lacks a metric."""
    head = "| checkpoint | " + " | ".join(EVAL_COLUMNS) + " |\n|---|" + "---|" * len(EVAL_COLUMNS)
    body = [f"| {name} | " + " | ".join(f"{r[c]:.3f}" if c in r else "-" for c in EVAL_COLUMNS) + " |"
            for name, r in results.items()]
    return "\n".join([head] + body)


@torch.no_grad()
def sample_answers(model, prompts, cfg, generator, batch=32, desc=None):
    """One sampled answer per prompt, as segments (images PIL; None for a grid cut short by a limit).
    Prompt images may be paths, loaded one batch at a time (a whole benchmark's images need not fit in memory)."""
    out = []
    for i in tqdm(range(0, len(prompts), batch), desc=desc, disable=True if desc is None else None):
        ro = unigrpo.sample_interleaved(model, [load_segment_images(p) for p in prompts[i:i + batch]],
                                        cfg.temperature, cfg.max_new_tokens, cfg.max_text_tokens, cfg.max_images,
                                        generator=generator, cfg_scale=cfg.cfg_scale)
        out += [segs for segs, _ in unigrpo.decode_rollout(model, ro)]
    return out


def load_segment_images(segments, image_size=None):
    """Segments with image paths -> the same with RGB PIL images (resized if image_size), for the model."""
    out = []
    for kind, x in segments:
        if kind == "image" and isinstance(x, str):
            with Image.open(x) as im:
                x = im.convert("RGB")
            if image_size is not None and x.size != (image_size, image_size):
                x = x.resize((image_size, image_size), Image.BICUBIC)
        out.append((kind, x))
    return out


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _dump_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)  # a crash never leaves a half-written file where a reader would find it
    return path

# -----------------------------------------------------------------------------
# The paper's ablation table, reproduced in the toy world


@dataclass(frozen=True)
class AblationRow:
    """One row of the paper's ablation table, and how the toy world reruns it."""
    key: str                  # its --rows name
    setting: str              # the paper's setting
    flags: dict | None        # unigrpo flags on top of FULL_METHOD; None: no GRPO (the base model, the warm-up)
    versus: str | None        # the key of the row it is compared with; None: the reference row
    paper_mmie: float | None  # the paper's MMIE AVG (%); None: no valid interleaved output
    paper_ib: float           # the paper's InterleavedBench AVG (0..5)


# Each GRPO row is the full method with the paper's changes for that row; the paper's CLIP-instead-of-
# ImageReward row becomes the tiny CLIP trained 1/10 as long (clip_weak) instead of the default one.
ABLATIONS = {row.key: row for row in (
    AblationRow("base", "base model, no warm-up, no GRPO", None, None, None, 0.51),
    AblationRow("warmup", "warm-up only", None, "base", 53.31, 1.97),
    AblationRow("rf", "warm-up + GRPO, r_f only",
                dict(use_text_reward=False, use_visual_reward=False, process_reward=False), "warmup", 53.56, 2.05),
    AblationRow("rt", "+ r_t", dict(use_visual_reward=False, process_reward=False), "rf", 54.62, 2.30),
    AblationRow("rv", "+ r_v", dict(process_reward=False), "rt", 57.83, 2.79),
    AblationRow("full", "+ process reward (full method)", {}, "rv", 59.50, 3.13),
    AblationRow("nokl_g2", "no KL, G = 2", dict(kl_beta=0.0, group_size=2), "kl_g2", 53.04, 1.72),
    AblationRow("kl_g2", "KL, G = 2", dict(group_size=2), "full", 55.14, 2.27),
    AblationRow("weak_rv", "KL, G = 4, weaker r_v scorer (paper: CLIP score)", dict(visual_scorer="clip_weak"),
                "full", 56.94, 2.58),
)}
FULL_METHOD = dict(use_format_reward=True, use_text_reward=True, use_visual_reward=True, process_reward=True,
                   group_size=4)
ABLATION_COLUMNS = unigrpo.HEADLINE_METRICS
NOT_SETTINGS = ("out_dir", "stage", "dry_run", "log_interval", "ckpt_interval", "storyboard_interval")  # no effect


def _mean(v):
    return sum(v) / len(v) if v else None


def _mean_sd(v):
    """Mean and sample standard deviation (None for fewer than two values)."""
    m = _mean(v)
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None)


def t_cdf(t, df):
    """Student's t distribution function, by Simpson's rule over the density (exact to ~1e-9 here)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    pdf = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)
    n, h = 2000, abs(t) / 2000
    area = h / 3 * sum(pdf(i * h) * (1 if i in (0, n) else 4 if i % 2 else 2) for i in range(n + 1))
    return 0.5 + math.copysign(area, t)


def t_quantile(p, df):
    """The p quantile of Student's t, by bisection on t_cdf."""
    lo, hi = -1e3, 1e3
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired_interval(diffs, level=0.95):
    """Mean of paired (same seed) differences, the half-width of its t interval at n - 1 degrees of
    freedom, and the two-sided p-value of 'no difference'. Half-width and p are None for one pair."""
    n, (m, sd) = len(diffs), _mean_sd(diffs)
    if sd is None:  # one pair
        return m, None, None
    if sd == 0:
        return m, 0.0, 0.0 if m != 0 else 1.0
    se = sd / math.sqrt(n)
    return m, t_quantile(0.5 + level / 2, n - 1) * se, 2 * (1 - t_cdf(abs(m) / se, n - 1))


def ablation_trend(results, key, seeds, metric="oracle_step"):
    """One line: does this row move the headline metric against its comparison row as in the paper? Ours is the
    mean paired (same seed) difference with its 95% t interval and p; "within noise" when the interval holds 0."""
    row = ABLATIONS[key]
    if row.versus is None:
        return "reference row"
    ref = ABLATIONS[row.versus]
    pairs = [(results.get(f"{key}/seed{k}"), results.get(f"{ref.key}/seed{k}")) for k in seeds]
    d = [a[metric] - b[metric] for a, b in pairs if a is not None and b is not None]
    if not d:
        return f"vs {ref.setting}: not run"
    arrow = lambda x: "↑" if x > 0 else "↓" if x < 0 else "="
    papers = (("MMIE", ref.paper_mmie, row.paper_mmie), ("IB", ref.paper_ib, row.paper_ib))
    paper = ", ".join(f"{name} {b - a:+.2f}" for name, a, b in papers if a is not None and b is not None)
    m, half, p = paired_interval(d)
    ours = f"{m:+.3f}" + (f", 95% CI [{m - half:+.3f}, {m + half:+.3f}], p = {p:.2g} ({len(d)} seeds)"
                          if half is not None else " (1 seed)")
    rules = ((all(x == 0 for x in d), "flat: not reproduced"), (half is not None and abs(m) <= half, "within noise"),
             ((m > 0) != (row.paper_ib > ref.paper_ib), "disagrees"),
             (half is None, "agrees in sign (1 seed, no spread)"))
    verdict = next((v for holds, v in rules if holds), "agrees")  # the first rule that holds
    return f"vs {ref.setting}: paper {arrow(row.paper_ib - ref.paper_ib)} ({paper}); ours {arrow(m)} {ours}: {verdict}"


def ablation_table(results, keys, seeds):
    """ONE markdown table: per row the paper's numbers, our metrics (mean ± sample std over seeds) and the trend."""
    cols = ["setting", "paper MMIE", "paper IB"] + list(ABLATION_COLUMNS) + ["trend of oracle_step vs the paper"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in (row for row in ABLATIONS.values() if row.key in keys):
        runs = [results[f"{row.key}/seed{k}"] for k in seeds if f"{row.key}/seed{k}" in results]
        stats = [_mean_sd([r[c] for r in runs]) for c in ABLATION_COLUMNS]
        cells = ["–" if m is None else f"{m:.3f}" + (f" ± {sd:.3f}" if sd is not None else "") for m, sd in stats]
        paper_mmie = "no valid interleaved output" if row.paper_mmie is None else f"{row.paper_mmie:.2f}"
        lines.append(f"| {row.setting} | {paper_mmie} | {row.paper_ib:.2f} | " + " | ".join(cells)
                     + f" | {ablation_trend(results, row.key, seeds)} |")
    return "\n".join(lines)


def _share(run, **targets):
    """A run's out_dir sees stages made elsewhere through links (name -> folder): nothing is copied or retrained."""
    os.makedirs(run, exist_ok=True)
    for name, target in targets.items():
        link = os.path.join(run, name)
        if not os.path.lexists(link):
            os.symlink(os.path.relpath(target, run), link, target_is_directory=True)


def run_ablations(cfg, argv, n_seeds=3, only=""):
    """Every ablation row x seed through unigrpo.main (one prepared world, one warm-up per seed shared by the rows,
    each GRPO row in OUT_DIR/ablations/ROW/seedK) -> ablations.md and ablations.json. A rerun skips finished
    (row, seed) results, runners with disjoint --rows may share the out_dir, a killed GRPO run resumes."""
    chosen = [k.strip() for k in only.split(",") if k.strip()] or list(ABLATIONS)
    if [k for k in chosen if k not in ABLATIONS] or n_seeds < 1:
        unigrpo.fail(f"--rows takes a comma-separated subset of {', '.join(ABLATIONS)} (got {only!r}) and "
                     f"--seeds a positive number (got {n_seeds})")
    if cfg.kl_beta <= 0:
        raise SystemExit("error: the ablations need --kl_beta > 0 (the KL rows use it; the no-KL row sets 0 itself)")
    root = os.path.join(cfg.out_dir, "ablations")
    path = os.path.join(root, "ablations.json")
    settings = {k: v for k, v in vars(cfg).items() if k not in NOT_SETTINGS}
    saved = {"settings": settings, "results": {}}
    if os.path.exists(path):
        saved = _read_json(path)
        diff = sorted(k for k in settings.keys() | saved["settings"].keys()
                      if settings.get(k) != saved["settings"].get(k))
        if diff:
            raise SystemExit(f"error: {path} holds results made with other settings ("
                             + ", ".join(f"--{k}={saved['settings'].get(k)!r}" for k in diff)
                             + "); pass the same settings to continue it, or use another --out_dir")
    print(f"[ablations] common start: the prepared world in {cfg.out_dir}; one warm-up per seed in {root}/warmup")
    unigrpo.main([*argv, f"--out_dir={cfg.out_dir}", "--stage=prepare"])
    base = cfg.model or os.path.join(root, "base_model")  # an untrained start: the paper's "base model" row
    if not cfg.model and not unigrpo.is_checkpoint(base):
        tok, vq, _ = unigrpo.load_prepared(cfg)
        torch.manual_seed(cfg.seed)
        unigrpo.save_checkpoint(unigrpo.UnifiedModel(unigrpo.tiny_janus(tok, vq, cfg), tok), base, {"iter": 0})
    seeds = range(n_seeds)
    todo = [(key, k) for key in chosen for k in seeds]
    for i, (key, k) in enumerate(todo, 1):
        result_key, tag = f"{key}/seed{k}", f"[ablations {i}/{len(todo)}] {key} seed {k}"
        if result_key in saved["results"]:
            print(f"{tag}: finished earlier, skipped")
            continue
        flags = ABLATIONS[key].flags
        t0 = time.time()
        # this seed's warm-up, so that every row's spread holds training noise (the warm-up row's too)
        warm = os.path.join(root, "warmup", f"seed{k}")
        _share(warm, prepare=os.path.join(cfg.out_dir, "prepare"))
        unigrpo.main([*argv, f"--out_dir={warm}", "--stage=warmup", f"--seed={cfg.seed + k}"])
        if flags is None:  # no GRPO: evaluate the untrained model or this seed's warm-up
            ckpt = base if key == "base" else os.path.join(warm, "warmup")
        else:
            run = os.path.join(root, key, f"seed{k}")
            _share(run, prepare=os.path.join(cfg.out_dir, "prepare"), warmup=os.path.join(warm, "warmup"))
            grpo_argv = [*argv, f"--out_dir={run}", "--stage=grpo"] + [
                f"--{a}={v}" for a, v in {**FULL_METHOD, **flags, "seed": cfg.seed + k}.items()]
            print(f"{tag}: GRPO, {cfg.grpo_iters} iters, as python unigrpo.py {' '.join(grpo_argv)}")
            unigrpo.main(grpo_argv)
            ckpt = os.path.join(run, "grpo")
        print(f"{tag}: evaluating {ckpt} on {cfg.eval_prompts} held-out prompts")
        res = evaluate_checkpoint(ckpt, SimpleNamespace(**{**vars(cfg), "seed": cfg.seed + k}), seed=cfg.seed + k)
        if os.path.exists(path):  # re-read: another runner with other --rows may share this out_dir
            saved["results"] = {**_read_json(path)["results"], **saved["results"]}
        saved["results"][result_key] = res
        _dump_json(saved, path)  # after every row: a killed run loses at most the row in progress
        print(f"{tag}: oracle_step {res['oracle_step']:.3f}, reward {res['reward']:.3f} ({time.time() - t0:.0f} s)")
    table = ablation_table(saved["results"], chosen, seeds)
    cmd = " ".join(["python eval.py --ablations", f"--seeds={n_seeds}"] + ([f"--rows={only}"] if only else []) + argv)
    md = (f"# Ablations in the toy world\n\n`{cmd}`\n\n"
          f"GRPO iterations per row: {cfg.grpo_iters}; warm-up: {cfg.warmup_iters} iterations, one per seed, "
          f"shared by the rows; {cfg.eval_prompts} held-out prompts per evaluation; "
          f"seeds {cfg.seed}..{cfg.seed + n_seeds - 1}.\n"
          "Our cells: mean ± sample std over seeds; the paper's columns are another metric on other data: compare "
          "trends, not values. How to read this table: docs/benchmarks.md, Ablations.\n\n" + table + "\n")
    with open(os.path.join(root, "ablations.md"), "w", encoding="utf-8") as f:
        f.write(md)
    print(table)
    print(f"[ablations] wrote {path} and {os.path.join(root, 'ablations.md')}")
    return saved

# -----------------------------------------------------------------------------
# The command line


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        raise SystemExit(0)
    # eval.py's own flags (the module docstring); everything else goes to unigrpo.get_config, type-checked there
    p = argparse.ArgumentParser(prog="eval.py", add_help=False, allow_abbrev=False)  # --seed is not --seeds
    for flag in ("--benchmark", "--data_path", "--checkpoint", "--rows"):
        p.add_argument(flag, default="")
    for flag in ("--skip_bad", "--ablations"):
        p.add_argument(flag, action="store_true")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--seeds", type=int, default=3)
    args, rest = p.parse_known_args(argv)
    cfg = unigrpo.get_config(rest)
    unigrpo.use_cpu_threads(cfg)
    if args.benchmark or args.data_path:
        if args.benchmark not in BENCHMARKS:
            what = f"unknown --benchmark {args.benchmark!r}" if args.benchmark else "--data_path needs --benchmark"
            unigrpo.fail(f"{what}; choose one of {', '.join(BENCHMARKS)}")
        if not args.data_path:
            unigrpo.fail(f"--benchmark {args.benchmark} needs --data_path DIR, the folder holding "
                         f"{BENCHMARKS[args.benchmark][1]} and its images (or the JSON file itself)")
        if args.ablations:
            unigrpo.fail("--ablations and --benchmark are separate runs; pass one of them")
        return run_benchmark(cfg, args.benchmark, args.data_path, args.checkpoint, args.limit, args.skip_bad)
    if args.ablations:
        return run_ablations(cfg, rest, args.seeds, args.rows)
    results = {}
    for name, path in stage_checkpoints(cfg.out_dir).items():
        results[name] = evaluate_checkpoint(path, cfg)
        print(f"{name}: {json.dumps(results[name])}")
    print(markdown_table(results))
    _dump_json(results, os.path.join(cfg.out_dir, "eval.json"))
    return results

# =============================================================================
# Benchmarks: MMIE and InterleavedBench (a first reading may stop here)
#
# Neither official judge runs offline (MMIE-Score is a gated 4B model, InterleavedBench's is GPT-4o), so this section
# writes generations as the official scorers read them, to score officially (docs/benchmarks.md), and scores them
# with our own reward models, labelled "proxy": the official aggregation of another metric, not comparable.
# A record is a plain dict; a segment is ("text", str) or ("image", absolute path, or a PIL image to write).

MMIE_CATEGORIES = ("SA", "PBL", "MSR")  # tested as substrings of the id, in this order (as the official scorer does)
MMIE_MAX_IMAGES = 4      # the official scorer drops samples with more images than this (of those it read)
MMIE_IMAGE_CUTOFF = 3    # ... and stops reading the answer once this many images were read in total
IB_ASPECTS = ("text_quality", "perceptual_quality", "image_coherence", "text_image_coherence", "helpfulness")
IB_TEXT_ASPECTS = ("text_quality", "text_image_coherence")  # not scored on editing / composition tasks
UNSAFE_IN_NAMES = re.compile(r"[^A-Za-z0-9_.-]")  # an id's characters that may not stand in a file name
BENCHMARKS_DOC = "docs/benchmarks.md"  # the learner's reference: what each official scorer needs, how to run it


class BenchmarkFormatError(ValueError):
    """A record the loader cannot read; the loaders add the file, record index and id to the message."""


def _bad(msg):
    raise BenchmarkFormatError(msg)


def _read_json_list(data_path, default_name, bench):
    """DIR (holding default_name) or the JSON file itself -> (file, folder, list of records)."""
    path = os.path.abspath(data_path)
    file = os.path.join(path, default_name) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{bench}: {file} not found; pass the folder that holds {default_name}, or the file")
    try:
        obj = _read_json(file)
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: invalid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    obj = obj["data"] if isinstance(obj, dict) and isinstance(obj.get("data"), list) else obj
    if not isinstance(obj, list):
        keys = f" with keys {sorted(obj)[:10]}" if isinstance(obj, dict) else ""
        raise ValueError(f'{file}: expected a JSON list of records (or {{"data": [...]}}), '
                         f"got {type(obj).__name__}{keys}")
    return file, os.path.dirname(file), obj


def _find_image(folder, rel, subdirs, where=""):
    """A record's image path -> an existing absolute file, or a BenchmarkFormatError naming what was tried.
    Where the archives unpack relative to the JSON is not documented, so a few roots are tried."""
    if not isinstance(rel, str) or not rel:
        _bad(f"{where}image path must be a non-empty string, got {rel!r:.60}")
    tried = [rel] if os.path.isabs(rel) else [os.path.join(folder, d, rel) for d in ("",) + subdirs]
    for p in tried:
        if os.path.isfile(p):
            return os.path.normpath(p)
    _bad(f"{where}missing image file {rel!r} (tried {', '.join(tried)})")


def _context_images(item, n, where, folder, subdirs):
    """The record's "image" (or "images", one path, none) as found files, which its n "<image>" take in order."""
    images = item.get("image", item.get("images"))
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        _bad(f'"image" must be a list of paths, got {images!r:.80}')
    if n != len(images):
        _bad(f'{n} <image> placeholders in {where} but {len(images)} paths in "image"; '
             "they are paired in order, so the counts must agree")
    return [_find_image(folder, p, subdirs) for p in images]


def _split_placeholders(text, paths):
    """'a <image> b' + [p] -> [("text", "a"), ("image", p), ("text", "b")]; blank text parts dropped."""
    parts, segs = text.split("<image>"), []
    for k, part in enumerate(parts):
        if part.strip():
            segs.append(("text", part.strip()))
        if k < len(parts) - 1:
            segs.append(("image", paths[k]))
    return segs


def _string_field(item, key, why=""):
    """item[key], a non-empty string; every benchmark record is a JSON object."""
    if not isinstance(item, dict):
        _bad(f"expected a JSON object, got {type(item).__name__}")
    value = item.get(key)
    if not isinstance(value, str) or not value.strip():
        _bad(f'missing {key}: a non-empty string "{key}" is needed{why}, got {value!r:.40}')
    return value


def _turns(item, humans, gpts, human_is, gpt_after_human=True):
    """A record's "conversations" -> (turns, index of the first human turn, of the first gpt turn or None,
    notes on the turns ignored). humans / gpts: the role names accepted for each."""
    convs = item.get("conversations")
    if not isinstance(convs, list):
        _bad(f'"conversations" must be a list of {{"from", "value"}} turns, got {type(convs).__name__}')
    for j, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            _bad(f'conversations[{j}] must be an object with "from" and a string "value", got {turn!r:.80}')
    roles = [turn["from"] for turn in convs]
    human = next((j for j, role in enumerate(roles) if role in humans), None)
    if human is None:
        _bad(f"no human turn (the {human_is}); the turns are from {roles}")
    gpt = next((j for j, role in enumerate(roles) if role in gpts and (j > human or not gpt_after_human)), None)
    notes = [f"conversations[{j}] (from {role!r}) ignored" for j, role in enumerate(roles) if j not in (human, gpt)]
    return convs, human, gpt, notes


def _load_records(data_path, default_name, bench, parse_one, strict):
    """Parse every record and check ids are unique -> (records, skipped). strict: the first bad record raises,
    naming file, index, id and problem; else it is skipped. skipped names every part not read."""
    file, folder, items = _read_json_list(data_path, default_name, bench)
    records, skipped, first = [], [], {}
    for i, item in enumerate(items):
        rid = item.get("id") if isinstance(item, dict) else None
        where = f"record {i} (id {rid!r})" if rid is not None else f"record {i} (no id)"
        try:
            rec, notes = parse_one(item, folder)
            if rec["id"] in first:
                _bad(f"duplicate id (also record {first[rec['id']]}); scores are keyed by id")
        except BenchmarkFormatError as err:
            if strict:
                raise BenchmarkFormatError(f"{file}: {where}: {err}") from None
            skipped.append(f"{where}: record skipped: {err}")
            continue
        first[rec["id"]] = rec["index"] = i
        records.append(rec)
        skipped += [f"{where}: {n}" for n in notes]
    return records, skipped


def _put_image(x, out_dir, stem):
    """Save a PIL image as PNG, or copy an image file keeping its extension, as out_dir/images/stem.*; returns the
    path relative to out_dir (with "/"), as the scorers want."""
    if not isinstance(x, (str, Image.Image)):
        raise TypeError(f"an image segment must hold a PIL image or a path, got {type(x).__name__}")
    rel = f"images/{stem}" + ((os.path.splitext(x)[1].lower() or ".png") if isinstance(x, str) else ".png")
    if isinstance(x, str):
        shutil.copyfile(x, os.path.join(out_dir, rel))
    else:
        x.save(os.path.join(out_dir, rel), format="PNG")
    return rel


def _answer_segments(answer):
    return [("text", answer)] if isinstance(answer, str) else list(answer)


def _write_segments(segments, out_dir, stem, where, part=""):
    """Segments -> the written [{"text", "image"}, ...] list, images saved as images/STEM<k>.* (k counts
    from 0). A None image (a grid cut short by a limit) has nothing to show a judge and is left out."""
    out, k = [], 0
    for kind, x in segments:
        if kind == "text":
            out.append({"text": x, "image": None})
        elif kind == "image" and x is not None:
            out.append({"text": None, "image": _put_image(x, out_dir, f"{stem}{k}")})
            k += 1
        elif kind != "image":
            raise ValueError(f"{where}: unknown segment kind {kind!r}" + (f" in the {part}" if part else ""))
    return out

# --- MMIE


def mmie_category(record_id):
    """'SA' / 'PBL' / 'MSR' by substring of the id, tested in the official scorer's order; None if none."""
    return next((c for c in MMIE_CATEGORIES if c in record_id), None)


def _mmie_scorer_segments(value, name, folder):
    """The scorer-input layout's [{"text", "image"}, ...] -> segments (text before image, as it reads them)."""
    if not isinstance(value, list):
        _bad(f'"{name}" must be a list of {{"text", "image"}} objects (or, for "answer", a string), '
             f"got {type(value).__name__}")
    segs = []
    for k, seg in enumerate(value):
        if not isinstance(seg, dict) or not isinstance(seg.get("text"), (str, type(None))):
            _bad(f'{name}[{k}] must be an object with a "text" (string or null) and/or an "image", got {seg!r:.60}')
        if seg.get("text") is not None:
            segs.append(("text", seg["text"]))
        if seg.get("image") is not None:
            segs.append(("image", _find_image(folder, seg["image"], ("images",), f"{name}[{k}]: ")))
    return segs


def _mmie_record(item, folder):
    """One MMIE record in either layout -> (record, notes on what was not read)."""
    rid = _string_field(item, "id", " (category and scores are keyed by it)")
    category = mmie_category(rid)
    if category is None:
        _bad(f"unknown category: the id contains none of {', '.join(MMIE_CATEGORIES)}")
    if "conversations" in item:  # the release: the human turn asks, the first gpt turn after it is the reference
        layout, model, gt = "conversation", "gt", None
        convs, human, gpt, notes = _turns(item, ("human", "user"), ("gpt", "assistant"), "question")
        counts = [turn["value"].count("<image>") for turn in convs]
        paths = _context_images(item, sum(counts), "the conversation", folder, ("images",))
        start = lambda j: sum(counts[:j])  # placeholders take the images in order over all turns
        seg = lambda j: _split_placeholders(convs[j]["value"], paths[start(j):start(j + 1)])
        question, answer = seg(human), seg(gpt) if gpt is not None else []
        notes += [] if gpt is not None else ["no gpt turn: no reference answer"]
    elif "question" in item:  # the official scorer's input (what write_mmie_outputs writes)
        layout, model = "scorer", item.get("model")
        question = _mmie_scorer_segments(item["question"], "question", folder)
        answer = item.get("answer")
        answer = [] if answer is None else [("text", answer)] if isinstance(answer, str) else \
            _mmie_scorer_segments(answer, "answer", folder)
        notes = [] if "gt_answer" in item else ['no "gt_answer"']
        ga = item.get("gt_answer", [{"text": None}])  # the official reader takes gt_answer[0]["text"]: it must exist
        if not (isinstance(ga, list) and ga and isinstance(ga[0], dict) and "text" in ga[0]
                and isinstance(ga[0]["text"], (str, type(None)))):
            _bad(f'"gt_answer" must be a list whose first item has a "text" (string or null), got {ga!r:.80}')
        gt = ga[0]["text"]
    else:
        _bad(f"unknown record layout, keys {sorted(item)}: expected \"conversations\" (the release's turns) "
             "or \"question\"/\"answer\"/\"gt_answer\" (the official scorer's input)")
    if gt is None and model == "gt":  # the release's own answers: the answer is the reference
        gt = "\n".join(x for k, x in answer if k == "text") or None
    if not question:
        _bad("empty question")
    if category == "MSR" and not gt:
        _bad("MSR record without reference answer text (gpt turn, or gt_answer[0].text): the MSR judge needs it")
    return dict(id=rid, category=category, question=question, answer=answer, gt=gt, model=model, layout=layout), notes


def load_mmie(data_path, strict=True):
    """MMIE records from DIR/data.json or the file, in the release's or the official scorer's layout (both in
    docs/benchmarks.md): id, category, question, answer (segments), gt (reference or None), model, layout, index."""
    return _load_records(data_path, "data.json", "MMIE", _mmie_record, strict)


def write_mmie_outputs(records, answers, model_name, out_dir):
    """Write OUT/data.json exactly as the official MMIE scorer reads it, images under OUT/images; returns its path.
    answers[i], segments or a string, answers records[i]. Only MSR's judge reads the reference (gt_answer)."""
    if len(records) != len(answers):
        raise ValueError(f"{len(records)} records but {len(answers)} answers")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    entries = []
    for i, (rec, ans) in enumerate(zip(records, answers)):
        stem, where = f"{i}_{UNSAFE_IN_NAMES.sub('_', rec['id'])}", f"record {i} (id {rec['id']!r})"  # i: unique names
        category = rec.get("category") or mmie_category(rec["id"])
        if category == "MSR" and not rec.get("gt"):
            raise ValueError(f"{where}: MSR needs the reference answer text (gt)")
        entries.append({"id": rec["id"],
                        "question": _write_segments(rec["question"], out_dir, f"{stem}_q", where, "question"),
                        "answer": _write_segments(_answer_segments(ans), out_dir, f"{stem}_a", where, "answer"),
                        "model": model_name,
                        "gt_answer": [{"text": rec["gt"] if category == "MSR" else None, "image": None}]})
    return _dump_json(entries, os.path.join(out_dir, "data.json"))


def _scorer_pairs(segments):
    """Either segment form (or a plain string answer) -> the official reader's (text, image) pairs."""
    if isinstance(segments, str):
        return [(segments, None)]
    return [(s.get("text"), s.get("image")) if isinstance(s, dict)  # the scorer-input layout
            else (s[1], None) if s[0] == "text" else (None, s[1]) for s in segments]  # (kind, x) segments


def mmie_scorer_view(record, input_dir=None):
    """(question_text, answer_text, images) as the official MMIE scorer reads them; see _mmie_read."""
    return _mmie_read(record, input_dir)[:3]


def _mmie_read(record, input_dir=None):
    """What dataset.py of github.com/Lillianwei-h/MMIE builds from a scorer-input dict or a loaded record: per segment
    the text and a newline, per image "Image-k: <image>" (with input_dir: only if that file exists, joined to it);
    the answer stops once 3 images were read, checked after each text and image. Also the answer segments read."""
    resolve = (lambda p: p) if input_dir is None else (lambda p: os.path.join(input_dir, p))
    images, texts, read = [], ["", ""], []
    for part, segs in enumerate((record["question"], record.get("answer") or [])):
        for text, image in _scorer_pairs(segs):
            if text is not None:
                texts[part] += text + "\n"
                read += [("text", text)] if part else []
            if part == 1 and len(images) >= MMIE_IMAGE_CUTOFF:
                break
            if image is not None and (input_dir is None or os.path.exists(resolve(image))):
                texts[part] += f"Image-{len(images)}: <image>\n"
                images.append(resolve(image))
                read += [("image", images[-1])] if part else []
            if part == 1 and len(images) >= MMIE_IMAGE_CUTOFF:
                break
    return texts[0], texts[1], images, read


def mmie_dropped(record, input_dir=None):
    """True if the official scorer drops this sample: more than 4 images among those it READ."""
    return len(mmie_scorer_view(record, input_dir)[2]) > MMIE_MAX_IMAGES


def parse_mmie_score(text):
    """The official parse of an MMIE-Score reply: the first number after '### Score', rounded (Python's
    round, so 2.5 -> 2), kept only if 0 <= s <= 6; else None (unparsable)."""
    m = re.search(r"### Score.*?(-?\d+(\.\d+)?)", text, re.DOTALL) if isinstance(text, str) else None
    if m is None:
        return None
    s = round(float(m.group(1)))
    return s if 0 <= s <= 6 else None


def aggregate_mmie(scores_by_id, categories_by_id, label="proxy"):
    """MMIE aggregation: per-category means and AVG = the mean over ALL valid samples (weighted by category size),
    percent = mean / 6 * 100. A score is a judge reply, a number on 0..6 or None (invalid, counted)."""
    groups, invalid = {c: [] for c in MMIE_CATEGORIES}, []
    for rid, s in scores_by_id.items():
        cat = categories_by_id.get(rid)
        if cat not in groups:
            raise ValueError(f"id {rid!r}: category {cat!r} is not one of {MMIE_CATEGORIES}")
        s = parse_mmie_score(s) if isinstance(s, str) else s
        if s is None or isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s <= 6:  # NaN fails too
            invalid.append(rid)
        else:
            groups[cat].append(float(s))
    summary = lambda v: {"n": len(v), "mean": _mean(v), "percent": None if not v else _mean(v) / 6 * 100}
    out = {"label": label, **{c: summary(v) for c, v in groups.items()}, "AVG": summary(sum(groups.values(), []))}
    out.update(n_valid=out["AVG"]["n"], n_invalid=len(invalid), invalid_ids=invalid)
    return out

# --- InterleavedBench


def ib_text_aspects_scored(task_name):
    """False on image editing and multi-concept composition, whose text aspects the judge does not score;
    their task names are not published, so "edit" or "composition" in the name marks them."""
    return not any(word in task_name.lower() for word in ("edit", "composition"))


def _ib_record(item, folder):
    rid, task = _string_field(item, "id"), _string_field(item, "task_name")
    convs, human, gpt, notes = _turns(item, ("human",), ("gpt",), "instruction", gpt_after_human=False)
    instruction = convs[human]["value"].replace("<BEGIN>", "")
    paths = _context_images(item, instruction.count("<image>"), "the human turn", folder, ("images", "zipped_images"))
    prompt = _split_placeholders(instruction, paths)
    if not prompt:
        _bad("empty instruction")
    return dict(id=rid, task_name=task, prompt=prompt, reference=None if gpt is None else convs[gpt]["value"],
                goal=item.get("goal"), category=item.get("category"), dataset_id=item.get("dataset_id")), notes


def load_interleavedbench(data_path, strict=True):
    """InterleavedBench records from DIR/interleaved_bench.json or the file (layout: docs/benchmarks.md): id, task_name,
    prompt (segments), reference (the gpt turn; the judge is reference-free), goal, category, dataset_id, index."""
    return _load_records(data_path, "interleaved_bench.json", "InterleavedBench", _ib_record, strict)


def write_interleavedbench_outputs(records, answers, out_dir):
    """Write OUT/predictions.json, [{"id", "task_name", "output": [{"text", "image"}, ...]}], and
    OUT/images/<id>_<k>.png; returns its path. OUR layout (the judge's input is not known), to convert from."""
    if len(records) != len(answers):
        raise ValueError(f"{len(records)} records but {len(answers)} answers")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    entries, stems = [], set()
    for i, (rec, ans) in enumerate(zip(records, answers)):
        stem, where = UNSAFE_IN_NAMES.sub("_", rec["id"]), f"record {i} (id {rec['id']!r})"
        if stem in stems:
            raise ValueError(f"{where}: its image names collide with another record's")
        stems.add(stem)
        out = _write_segments(_answer_segments(ans), out_dir, f"{stem}_", where)
        entries.append({"id": rec["id"], "task_name": rec["task_name"], "output": out})
    return _dump_json(entries, os.path.join(out_dir, "predictions.json"))


def load_interleavedbench_outputs(out_dir):
    """Read back OUT/predictions.json: list of {"id", "task_name", "output": segments with absolute paths}."""
    _, folder, entries = _read_json_list(out_dir, "predictions.json", "InterleavedBench outputs")
    return [{"id": r["id"], "task_name": r["task_name"],
             "output": [("text", s["text"]) if s.get("image") is None else ("image", os.path.join(folder, s["image"]))
                        for s in r["output"]]} for r in entries]


def aggregate_interleavedbench(aspect_scores_by_id, task_by_id, label="proxy"):
    """InterleavedBench aggregation of per-sample aspect scores on 0..5: per sample, the mean of its scored
    aspects (ib_text_aspects_scored); per aspect, the mean over the samples that score it; AVG, the mean of
    the per-sample means (the paper does not say which). A sample missing a scored aspect is invalid."""
    per_aspect, avgs, invalid = {a: [] for a in IB_ASPECTS}, [], []
    for rid, scores in aspect_scores_by_id.items():
        if rid not in task_by_id:
            raise ValueError(f"id {rid!r}: no task_name given")
        aspects = IB_ASPECTS if ib_text_aspects_scored(task_by_id[rid]) else \
            tuple(a for a in IB_ASPECTS if a not in IB_TEXT_ASPECTS)
        vals = [scores.get(a) for a in aspects]
        if any(v is None for v in vals):
            invalid.append(rid)
            continue
        for a, v in zip(aspects, vals):
            if not 0 <= v <= 5:
                raise ValueError(f"id {rid!r}: {a} = {v} is outside 0..5")
            per_aspect[a].append(float(v))
        avgs.append(sum(vals) / len(vals))
    return {"label": label, **{a: _mean(v) for a, v in per_aspect.items()}, "AVG": _mean(avgs),
            "n_valid": len(avgs), "n_invalid": len(invalid), "invalid_ids": invalid}

# --- proxy scores: our own reward models in place of the judges


def _image_coherence(images, scorer):
    """Mean pairwise similarity of the images on [0, 1]: cosine of CLIP image embeddings (clamped at 0) if
    the scorer has a CLIP, else 1 - mean absolute pixel difference at 32x32. One image: 1; none: 0."""
    if len(images) < 2:
        return float(len(images))
    enc = getattr(getattr(scorer, "model", None), "encode_image", None)
    if enc is not None and hasattr(scorer, "preprocess"):
        with torch.no_grad():
            dev = next(scorer.model.parameters()).device
            e = enc(torch.stack([scorer.preprocess(im) for im in images]).to(dev), normalize=True).float().cpu()
        sim = e @ e.T
    else:
        x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((32, 32)), np.float32)).flatten() / 255
                         for im in images])
        sim = 1 - (x[:, None] - x[None]).abs().mean(-1)
    iu = torch.triu_indices(len(images), len(images), 1)
    return float(sim[iu[0], iu[1]].clamp(0, 1).mean())


def proxy_aspects(segments, prompt_text, scorer, text_ok=None, image_ok=None):
    """A PROXY for InterleavedBench's five aspects on 0..5 from our own signals, blank texts dropped (what each one
    measures: docs/benchmarks.md). scorer: .score(images, texts) -> [B] in [0, 1]; text_ok / image_ok: accept one."""
    text_ok = text_ok or rewards.has_words
    content = [(k, x) for k, x in segments if not (k == "text" and not rewards.has_words(x))]
    texts = [x for k, x in content if k == "text"]
    images = [x for k, x in content if k == "image"]
    complete = [x for x in images if x is not None]
    # text_image_coherence scores each image against the text before it, else the prompt
    before = [content[j - 1][1] if j and content[j - 1][0] == "text" else prompt_text for j in range(len(content))]
    pairs = [(x, b) for (k, x), b in zip(content, before) if k == "image" and x is not None and rewards.has_words(b)]
    tic = [float(s) for s in scorer.score([p[0] for p in pairs], [p[1] for p in pairs])] if pairs else []
    switches = sum(a[0] != b[0] for a, b in zip(content, content[1:]))
    structure = switches / (len(content) - 1) if texts and images else 0.0
    return {"text_quality": 5 * sum(bool(text_ok(t)) for t in texts) / len(texts) if texts else 0.0,
            "perceptual_quality": 5 * sum(image_ok is None or bool(image_ok(x)) for x in complete) / len(images)
            if images else 0.0,
            "image_coherence": 5 * _image_coherence(complete, scorer),
            "text_image_coherence": 5 * sum(tic) / len(images) if images else 0.0,  # None images count 0
            "helpfulness": 5 * structure}


def proxy_mmie_score(aspects):
    """A PROXY MMIE score on 0..6 (continuous): the mean of the five proxy aspects rescaled from 0..5.
    MMIE-Score's rubrics differ per category; this does not model them. Label it "proxy"."""
    return 6 * sum(aspects[a] for a in IB_ASPECTS) / (5 * len(IB_ASPECTS))


def proxy_mmie(folder, scorer):
    """PROXY scores of a written MMIE scorer-input folder, on exactly what the official judge reads (answer cut off
    after 3 images, >4-image samples dropped), aggregated by the official rules -> (aggregate, per id, a summary)."""
    scores, cats, dropped = {}, {}, []
    for entry in _read_json(os.path.join(folder, "data.json")):
        _, _, images, answer = _mmie_read(entry, folder)
        if len(images) > MMIE_MAX_IMAGES:
            dropped.append(entry["id"])
            continue
        question = " ".join(t for t, _ in _scorer_pairs(entry["question"]) if t)
        scores[entry["id"]] = proxy_mmie_score(proxy_aspects(load_segment_images(answer), question, scorer))
        cats[entry["id"]] = mmie_category(entry["id"])
    agg = aggregate_mmie(scores, cats, label="proxy")
    agg.update(n_dropped=len(dropped), dropped_ids=dropped)
    cell = lambda c: "n/a" if agg[c]["percent"] is None else f"{agg[c]['percent']:.1f}%"
    parts = [f"{c} {cell(c)} (n {agg[c]['n']})" for c in MMIE_CATEGORIES + ("AVG",)]
    return agg, scores, ("PROXY MMIE (our own reward models, NOT MMIE-Score: not comparable with published numbers): "
                         + " | ".join(parts) + f"; AVG weighted by category size; {len(dropped)} dropped by the "
                         f"official >{MMIE_MAX_IMAGES}-image rule, {agg['n_invalid']} invalid")


def proxy_interleavedbench(folder, records, scorer):
    """PROXY aspects of a written predictions folder, by the official rules -> (aggregate, per id, a summary)."""
    prompt = {r["id"]: " ".join(x for k, x in r["prompt"] if k == "text") for r in records}
    aspects, tasks = {}, {}
    for entry in load_interleavedbench_outputs(folder):
        aspects[entry["id"]] = proxy_aspects(load_segment_images(entry["output"]), prompt[entry["id"]], scorer)
        tasks[entry["id"]] = entry["task_name"]
    agg = aggregate_interleavedbench(aspects, tasks, label="proxy")
    cell = lambda v: "n/a" if v is None else f"{v:.2f}"
    cells = " | ".join(f"{a} {cell(agg[a])}" for a in IB_ASPECTS + ("AVG",))
    return agg, aspects, ("PROXY InterleavedBench (our own reward models, NOT the GPT-4o judge: not comparable with "
                          f"published numbers), 0..5: {cells} (n {agg['n_valid']}; text aspects left out on editing / "
                          "composition)")

# --- the benchmark command: generate, write the official scorer's input, proxy score

# name -> (its loader, the file it reads in --data_path DIR, how to score officially in short: see BENCHMARKS_DOC)
BENCHMARKS = {
    "mmie": (load_mmie, "data.json", "To score officially with the MMIE-Eval judge (MMIE-Score, a fine-tuned "
             "InternVL2-4B; one GPU),\nfrom a clone of github.com/Lillianwei-h/MMIE:\n"
             "    python main.py --model_path PATH_TO_MMIE-Eval --input_dir {folder} --input_name data.json"),
    "interleavedbench": (load_interleavedbench, "interleaved_bench.json", "To score officially with the GPT-4o judge "
                         "(an API key): convert {folder}/predictions.json\nto the input of the script released with "
                         "the benchmark (mqliu/InterleavedBench)."),
}


def run_benchmark(cfg, name, data_path, checkpoint="", limit=0, skip_bad=False):
    """Answer every record of a benchmark's local copy with one checkpoint (context images through the understanding
    path), write OUT_DIR/bench/NAME as the official scorer reads it, and print and save a PROXY score of what was
    written (OUT_DIR/bench/NAME_proxy.json)."""
    loader, _, official = BENCHMARKS[name]
    try:
        records, skipped = loader(data_path, strict=not skip_bad)
    except (ValueError, FileNotFoundError) as err:  # a BenchmarkFormatError names one record: say how to get past it
        fix = (f"\nfix that record (the layouts: {BENCHMARKS_DOC}), or pass --skip_bad to skip malformed records "
               "and list them") if isinstance(err, BenchmarkFormatError) else ""
        raise SystemExit(f"error: {err}{fix}") from None
    for note in skipped:
        print(f"{name}: {note}")
    records = records[:limit] if limit > 0 else records
    if not records:
        raise SystemExit(f"error: no readable records in {data_path}")
    ckpt = checkpoint or latest_checkpoint(cfg.out_dir)
    dev = unigrpo.resolve_device(cfg)
    model = unigrpo.load_model(ckpt, dev, getattr(torch, cfg.dtype)).eval()
    clip_dir = os.path.join(cfg.out_dir, "prepare", cfg.visual_scorer)
    if cfg.visual_scorer in ("clip", "clip_weak") and not os.path.isdir(clip_dir):
        raise SystemExit(f"error: the proxy needs the visual scorer {clip_dir}; pass the --out_dir of the run that "
                         "trained the checkpoint, or --visual_scorer openclip:ARCH/PRETRAINED")
    # only the visual scorer is used: the toy critic stands in so that a VLM critic is never loaded for nothing
    _, scorer = unigrpo.build_scorers(SimpleNamespace(**{**vars(cfg), "text_critic": "toy"}), model.tokenizer, dev)
    prompts = [r["question"] if name == "mmie" else r["prompt"] for r in records]
    tok = model.tokenizer
    ids = [i for p in prompts for k, x in p if k == "text" for i in tok(x, add_special_tokens=False).input_ids]
    unk_frac = sum(i == tok.unk_token_id for i in ids) / max(1, len(ids)) if tok.unk_token_id is not None else 0.0
    if unk_frac > 0:  # the toy world's tokenizer knows its own words only
        print(f"{name}: {unk_frac:.0%} of the {len(ids)} prompt text tokens are {tok.unk_token} for this checkpoint's "
              "tokenizer: the model cannot read that text, so the outputs test the pipeline and layout, not the method")
    g = torch.Generator(device=model.device).manual_seed(cfg.seed)
    batch = cfg.prompts_per_step * cfg.group_size  # GRPO's sampling batch: a size known to fit this model's memory
    answers = sample_answers(model, prompts, cfg, g, batch=batch, desc=f"{name}: generate")
    folder = os.path.join(cfg.out_dir, "bench", name)
    model_name = "unigrpo-" + os.path.basename(os.path.normpath(ckpt))
    if name == "mmie":
        unigrpo.atomic_dir(folder, lambda d: write_mmie_outputs(records, answers, model_name, d))
        written, (agg, per_sample, summary) = "data.json", proxy_mmie(folder, scorer)
    else:
        unigrpo.atomic_dir(folder, lambda d: write_interleavedbench_outputs(records, answers, d))
        written, (agg, per_sample, summary) = "predictions.json", proxy_interleavedbench(folder, records, scorer)
    print(f"{name}: {len(records)} answers by {ckpt} written to {folder} ({written} + images/)")
    print(summary)
    print(official.format(folder=folder) + f"\nWhat the official scorer needs, step by step: {BENCHMARKS_DOC}")
    result = dict(benchmark=name, label="proxy", checkpoint=ckpt, data_path=data_path, n_records=len(records),
                  unk_fraction=unk_frac, skipped=skipped, aggregate=agg, per_sample=per_sample)
    _dump_json(result, os.path.join(cfg.out_dir, "bench", f"{name}_proxy.json"))
    return result


if __name__ == "__main__":
    main()
    gc.freeze()  # as unigrpo's: the exit's collections would walk every object
