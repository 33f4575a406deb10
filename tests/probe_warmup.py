"""Does the warm-up learn *where* objects go? (a probe script, not collected by pytest)

    python tests/probe_warmup.py --out_dir out                        # default lr, text-to-image only
    python tests/probe_warmup.py --out_dir out --lr 2e-3 --iters 2000 # the old lr: stalls
    python tests/probe_warmup.py --out_dir out --tasks mix            # the default hybrid mix
    python tests/probe_warmup.py --out_dir out --lr 2e-3 --position_embedding

Trains a fresh tiny Janus (the default config) with `unigrpo.warmup_step` on text-to-image prompts
(or the default hybrid mix), with the warm-up's schedule (linear warm-up, cosine decay over --iters),
and every 100 steps prints, on 128 held-out text-to-image prompts, teacher forced: the image NLL
and the share of VQ codes predicted right (argmax) in cells that hold an object and in empty ones.
A model that knows which objects a sentence names but not where they go gets empty cells right and
object cells near 0. Needs a prepared world in --out_dir (`python unigrpo.py --stage prepare`).
--position_embedding adds a learned embedding of each code's cell index to the image-token inputs
(a patch on the model, for this probe only): it tests whether a missing position signal is the cause.
"""
import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import unigrpo  # noqa: E402


def add_position_embedding(model):
    """image-token input += E[k], k = the code's index inside its image (0..n-1)."""
    n, dim = model.n_image_tokens, model.janus.config.text_config.hidden_size
    model.cell_embedding = torch.nn.Parameter(torch.zeros(n, dim))
    embed = model.embed

    def embed_with_cells(ids, is_image):
        e = embed(ids, is_image)
        count = is_image.long().cumsum(1)  # image tokens so far; at each <begin_of_image> it restarts
        start = torch.where((ids == model.boi_id) & ~is_image, count, torch.zeros_like(count)).cummax(1).values
        k = (count - start - 1).clamp(0, n - 1)
        return e + torch.where(is_image.unsqueeze(-1), model.cell_embedding[k], torch.zeros_like(e))
    model.embed = embed_with_cells


@torch.no_grad()
def probe(model, examples):
    """(image NLL, object cells right, empty cells right), teacher forced."""
    model.eval()
    b = unigrpo.make_batch(model, examples)
    ids = torch.cat([b.prompt_ids, b.ids], 1)
    mask = torch.cat([b.prompt_mask, torch.ones_like(b.ids)], 1)
    is_image = torch.cat([torch.zeros_like(b.prompt_ids, dtype=torch.bool), b.is_image], 1)
    h = model.trunk(model.embed(ids, is_image), mask, (mask.cumsum(1) - 1).clamp(min=0))
    logits = model.image_logits(h[:, b.prompt_ids.shape[1] - 1:-1])
    logp = logits.log_softmax(-1).gather(-1, b.ids.unsqueeze(-1)).squeeze(-1)
    right = logits.argmax(-1) == b.ids
    hits = {True: [0, 0], False: [0, 0]}  # holds an object -> [right, total]
    for i, e in enumerate(examples):
        where = b.is_image[i].nonzero().flatten()
        occupied = data.latent_labels([e.answer[0][1]], 3)[0] > 0  # label 0 = an empty cell
        for p, q in enumerate(where):
            hits[bool(occupied[p])][0] += int(right[i, q])
            hits[bool(occupied[p])][1] += 1
    model.train()
    nll = -(logp * b.is_image).sum() / b.is_image.sum()
    return nll.item(), hits[True][0] / hits[True][1], hits[False][0] / hits[False][1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out_dir", default="out")
    p.add_argument("--lr", type=float, default=unigrpo.warmup_lr)
    p.add_argument("--iters", type=int, default=unigrpo.warmup_iters)
    p.add_argument("--tasks", choices=("t2i", "mix"), default="t2i")
    p.add_argument("--position_embedding", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    cfg = unigrpo.get_config([f"--out_dir={a.out_dir}", f"--seed={a.seed}", f"--warmup_lr={a.lr}", f"--warmup_iters={a.iters}"])
    if not unigrpo.is_checkpoint(os.path.join(a.out_dir, "prepare", "vq")):
        raise SystemExit(f"error: no prepared world in {a.out_dir}; run python unigrpo.py --stage prepare --out_dir {a.out_dir}")
    tok, vq, _ = unigrpo.load_prepared(cfg)
    model = unigrpo.UnifiedModel(unigrpo.tiny_janus(tok, vq, cfg), tok)
    if a.position_embedding:
        add_position_embedding(model)
    mix = (data.make_examples("t2i", cfg.n_understanding, "warmup", seed=a.seed) if a.tasks == "t2i"
           else data.warmup_mix(cfg.n_understanding, seed=a.seed, ratio=(cfg.interleaved_ratio, 1.0, 1.0)))
    answers = model.encode_answers([e.answer for e in mix])
    held_out = data.make_examples("t2i", 128, "eval", seed=0)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=a.lr, weight_decay=0.0)
    rng, t0 = random.Random(a.seed), time.time()
    print(f"# python tests/probe_warmup.py {' '.join(sys.argv[1:])}")
    print("| step | train loss | held-out image NLL | object cells right | empty cells right | s |\n|---|---|---|---|---|---|")
    for it in range(a.iters):
        for g in opt.param_groups:
            g["lr"] = unigrpo.warmup_lr_at(cfg, it)
        pick = rng.sample(range(len(mix)), cfg.warmup_batch_size)
        loss, _, _ = unigrpo.warmup_step(model, opt, [mix[i] for i in pick], [answers[i] for i in pick], cfg)
        if it % 100 == 0 or it == a.iters - 1:
            nll, obj, empty = probe(model, held_out)
            print(f"| {it} | {loss.item():.3f} | {nll:.3f} | {obj:.3f} | {empty:.3f} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
