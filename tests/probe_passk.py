"""How often is a text step right in one sample, and in any of G? (a probe script, not collected by pytest)

    python tests/probe_passk.py --out_dir out                    # the warm-up checkpoint
    python tests/probe_passk.py --out_dir out --checkpoint out/grpo

GRPO can only reinforce what some rollout of a group already does: a step that no sample gets
right earns no advantage. For each interleaved family this samples G answers to each of --prompts
held-out prompts (temperature 1, as GRPO and the evaluation sample) and prints, by the oracle:
the share of samples whose first text step states the true next state (pass@1) and the share of
prompts where at least one of the G samples does (pass@G); the same for all text steps of the
answer right. Needs a trained world in --out_dir (`python unigrpo.py --stage warmup`).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import unigrpo  # noqa: E402
from eval import sample_answers  # noqa: E402


def pass_at_g(model, cfg, task, n_prompts, G, generator, batch_prompts=4):
    exs = data.make_examples(task, n_prompts, "eval", seed=cfg.seed, image_size=cfg.image_size)
    answers = sample_answers(model, [e.prompt for e in exs for _ in range(G)], cfg, generator, batch=batch_prompts * G)
    first, every = [], []  # per prompt: the G samples' first-step and all-steps correctness
    for j, e in enumerate(exs):
        right = [[t for t, _, _ in data.oracle_step_scores(segs, e.states)] for segs in answers[j * G:(j + 1) * G]]
        first.append([r[0] for r in right])
        every.append([all(r) for r in right])
    rate = lambda rows: (sum(map(sum, rows)) / (G * len(rows)), sum(map(any, rows)) / len(rows))
    return rate(first), rate(every)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", default="out")
    p.add_argument("--checkpoint", default="", help="default: OUT_DIR/warmup")
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts per family")
    p.add_argument("--G", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = unigrpo.get_config([f"--out_dir={args.out_dir}"])
    path = args.checkpoint or os.path.join(args.out_dir, "warmup")
    if not unigrpo.is_checkpoint(path):
        raise SystemExit(f"error: no checkpoint in {path}; run python unigrpo.py --stage warmup --out_dir {args.out_dir}")
    model = unigrpo.load_model(path, unigrpo.resolve_device(cfg)).eval()
    g = torch.Generator(device=model.device).manual_seed(cfg.seed)
    print(f"{path}: text steps right by the oracle, {args.prompts} held-out prompts per family, G = {args.G}")
    print(f"| family | first step pass@1 | first step pass@{args.G} | all steps pass@1 | all steps pass@{args.G} |")
    print("|---|---|---|---|---|")
    for task in data.INTERLEAVED:
        (f1, fg), (a1, ag) = pass_at_g(model, cfg, task, args.prompts, args.G, g)
        print(f"| {task} | {f1:.3f} | {fg:.3f} | {a1:.3f} | {ag:.3f} |")


if __name__ == "__main__":
    main()
