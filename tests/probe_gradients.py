"""How much of a GRPO gradient is signal? (a probe script, not collected by pytest)

    python tests/probe_gradients.py --out_dir out                          # the defaults' batch
    python tests/probe_gradients.py --out_dir out --prompts_per_step 8     # 32 rollouts

From the warm-up checkpoint, takes one GRPO gradient (grpo_step with a zero learning rate, one inner epoch) on
each of --batches independent batches of prompts and rollouts, and prints the mean cosine between every two,
over all trained parameters and per part of the model. Two batches share only the expected gradient, so the
cosine estimates |E g|^2 / E|g|^2: near 0, an optimizer step is mostly noise (Adam then moves every weight by
about lr in a random direction). Any other flag is a unigrpo.py config key.
"""
import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import unigrpo  # noqa: E402

PARTS = {"all": lambda n: True, "trunk": lambda n: "language_model" in n, "generation head": lambda n: "generation_head" in n,
         "understanding path": lambda n: "vision_model" in n or ".aligner" in n}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=4)
    args, rest = p.parse_known_args()
    cfg = unigrpo.get_config([*rest, "--inner_epochs=1"])
    torch.set_num_threads(cfg.cpu_threads or torch.get_num_threads())
    path = os.path.join(cfg.out_dir, "warmup")
    policy = unigrpo.load_model(path, "cpu")
    ref = unigrpo.load_model(path, "cpu").requires_grad_(False) if cfg.kl_beta > 0 else None
    critic, scorer = unigrpo.build_scorers(cfg, policy.tokenizer, "cpu")
    named = [(n, q) for n, q in policy.named_parameters() if q.requires_grad]
    opt = torch.optim.SGD([q for _, q in named], lr=0.0)  # the step changes nothing; the gradients stay in .grad
    pool, rng, grads = unigrpo.rl_prompts(cfg), random.Random(cfg.seed), []
    score = lambda ro, group: unigrpo.score_rollout(policy, ro, group, critic, scorer, cfg)
    for b in range(args.batches):
        examples = rng.sample(pool, cfg.prompts_per_step)
        gens = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + b * 10_007 + i) for i in range(len(examples))]
        m = unigrpo.grpo_step(policy, ref, opt, examples, score, cfg, gens)
        grads.append({n: q.grad.detach().clone() if q.grad is not None else torch.zeros_like(q) for n, q in named})
        print(f"batch {b}: reward {m['reward']:.3f}, grad norm {m['grad_norm']:.3f}, "
              f"{sum(v for k, v in m.items() if k.startswith('time/')):.1f} s", flush=True)
    n_rollouts = cfg.prompts_per_step * cfg.group_size
    print(f"mean cosine between the GRPO gradients of {args.batches} independent batches of {n_rollouts} rollouts:")
    for part, keep in PARTS.items():
        names = [n for n, _ in named if keep(n)]
        vec = [torch.cat([g[n].flatten() for n in names]) for g in grads]
        cos = [torch.nn.functional.cosine_similarity(vec[i], vec[j], 0).item()
               for i in range(len(vec)) for j in range(i + 1, len(vec))]
        print(f"  {part:20} {sum(cos) / len(cos):+.3f}  ({sum(map(len, (vec[0],))):,} weights)")


if __name__ == "__main__":
    main()
