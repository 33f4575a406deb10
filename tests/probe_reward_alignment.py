"""Does the reward rank a group's rollouts the way the oracle does? (a probe script, not collected by pytest)

    python tests/probe_reward_alignment.py --out_dir out                  # the warm-up, the defaults' batch
    python tests/probe_reward_alignment.py --out_dir out --checkpoint out/grpo

Samples one GRPO batch (prompts_per_step prompts x G rollouts from the RL split) from a checkpoint, scores it
with the default reward models and with the exact oracle, and prints, for the reward and each of its terms:
the correlation with oracle_step of the deviations from the group means (what GRPO's advantages see), and
the oracle_step of the rollout each term ranks first in its group against the group mean. GRPO can only move
the policy towards what the reward prefers within a group; where that is not what the oracle prefers, a
rising reward is not a better policy. Any other flag is a unigrpo.py config key.
"""
import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import unigrpo  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="", help="default: OUT_DIR/warmup")
    args, rest = p.parse_known_args()
    cfg = unigrpo.get_config(rest)
    policy = unigrpo.load_model(args.checkpoint or os.path.join(cfg.out_dir, "warmup"), "cpu").eval()
    critic, scorer = unigrpo.build_scorers(cfg, policy.tokenizer, "cpu")
    G, prompts = cfg.group_size, random.Random(cfg.seed).sample(unigrpo.rl_prompts(cfg), cfg.prompts_per_step)
    group = [e for e in prompts for _ in range(G)]
    gens = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + i) for i in range(len(prompts))]
    ro = unigrpo.sample_interleaved(policy, [e.prompt for e in group], cfg.temperature, cfg.max_new_tokens,
                                    cfg.max_text_tokens, cfg.max_images, gens, cfg.cfg_scale)
    sc = unigrpo.score_rollout(policy, ro, group, critic, scorer, cfg)
    oracle = []
    for (segs, _), e in zip(sc["decoded"], group):
        o = data.oracle_step_scores(segs, e.states)
        oracle.append(sum(s for _, _, s in o) / len(o))
    o = torch.tensor(oracle).view(-1, G)
    oc = o - o.mean(1, keepdim=True)
    print(f"{len(prompts)} prompts x G = {G}; oracle_step {o.mean():.3f}; groups whose rollouts differ on the oracle: "
          f"{(o.std(1) > 0).float().mean():.2f}")
    print(f"{'':8}{'within-group corr.':>20}{'oracle of its best':>20}{'group mean':>12}")
    for name in ("reward", "text", "visual", "format"):
        if name not in sc:
            continue
        v = sc[name].float().view(-1, G)
        vc = v - v.mean(1, keepdim=True)
        corr = (vc * oc).sum() / ((vc ** 2).sum().sqrt() * (oc ** 2).sum().sqrt()).clamp(min=1e-12)
        best = o[torch.arange(len(o)), v.argmax(1)].mean()
        print(f"{name:8}{corr:>+20.3f}{best:>20.3f}{o.mean():>12.3f}")


if __name__ == "__main__":
    main()
