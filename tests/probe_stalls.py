"""Does GRPO stop the warm-up's stalls? (a probe script, not collected by pytest)

    python tests/probe_stalls.py --out_dir out

For the warm-up and the GRPO checkpoint in --out_dir: samples one answer (temperature 1) to each of 64 held-out
prompts per interleaved family and prints, over all text steps the prompts ask for, the share that states the
state before the step (a stall: the flaw --warmup_stall puts into the warm-up's demonstrations) and the share
that states the true next state (right by the oracle).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import unigrpo  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", default="out")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts per family")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = unigrpo.get_config([f"--out_dir={args.out_dir}"])
    for name in ("warmup", "grpo"):
        path = os.path.join(args.out_dir, name)
        if not unigrpo.is_checkpoint(path):
            raise SystemExit(f"error: no checkpoint in {path}; "
                             f"run python unigrpo.py --stage grpo --out_dir {args.out_dir}")
        model = unigrpo.load_model(path, "cpu").eval()
        stalled = right = n = 0
        for task in data.INTERLEAVED:
            params = data.sample_params(task, args.prompts, "eval", cfg.seed)  # state_before needs them
            examples = data.make_examples(task, args.prompts, "eval", cfg.seed, cfg.image_size)
            for i in range(0, len(examples), 32):
                batch = examples[i:i + 32]
                gens = [torch.Generator().manual_seed(7 * 1_000_003 + i + j) for j in range(len(batch))]
                ro = unigrpo.sample_interleaved(model, [e.prompt for e in batch], 1.0, cfg.max_new_tokens,
                                                cfg.max_text_tokens, cfg.max_images, gens)
                for (segs, _), e, q in zip(unigrpo.decode_rollout(model, ro), batch, params[i:i + 32]):
                    texts = [x for k, x in segs if k == "text"]
                    for k, (truth, before) in enumerate(zip(e.states, [data.state_before(task, q), *e.states[:-1]])):
                        said = data.parse(texts[k]) if k < len(texts) else None
                        n, stalled, right = n + 1, stalled + (said == before), right + (said == truth)
        print(f"{name}: {n} text steps; stating the state before (a stall) {stalled / n:.3f}, right {right / n:.3f}")


if __name__ == "__main__":
    main()
