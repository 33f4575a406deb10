"""GRPO with the oracle as its reward: is the reward what limits the gain? (a probe script, not collected by pytest)

    python tests/probe_oracle_reward.py --stage grpo --out_dir D --process_reward False [any unigrpo.py flags]

Runs `unigrpo.py` unchanged except for the outcome reward: each rollout earns the oracle's share of
right steps (text and image both show the true scene) plus r_f, instead of r_t + r_v + r_f. If GRPO
gains no more with the exact answer as its reward than with the learned one, the reward is not the
bottleneck. Turn the process reward off: the step rewards stay the learned ones. The held-out
evaluation's `reward` column then reads this reward too; the oracle columns are unchanged.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import unigrpo  # noqa: E402

learned_reward = unigrpo.score_rollout


def oracle_reward(model, ro, examples, critic, scorer, cfg):
    out = learned_reward(model, ro, examples, critic, scorer, cfg)
    reward = []
    for (segments, _), e, fmt in zip(out["decoded"], examples, out["format"].tolist()):
        steps = data.oracle_step_scores(segments, e.states) if e.task in data.INTERLEAVED else []
        reward.append((sum(right for _, _, right in steps) / len(steps) if steps else 0.0) + fmt)
    out["reward"] = torch.tensor(reward)
    return out


if __name__ == "__main__":
    unigrpo.score_rollout = oracle_reward  # grpo() and evaluate() look it up at call time
    unigrpo.main(sys.argv[1:])
