"""GPU check (not collected by pytest: no test_ prefix). A few warm-up and GRPO steps with the toy world's tiny
Janus and with the Janus-Pro-1B architecture (random weights, built from unigrpo.janus_pro_config: nothing is
downloaded), in the preset's shape; prints step time and peak memory in one table.

    python tests/gpu_check.py                                        # one CUDA device: tiny, then Janus-Pro-1B
    torchrun --standalone --nproc_per_node=8 tests/gpu_check.py --fsdp   # FSDP2 over the visible GPUs (nccl)
    python tests/gpu_check.py --device cpu                           # smoke run of the tiny config on CPU
    torchrun --standalone --nproc_per_node=2 tests/gpu_check.py --device cpu --fsdp   # the FSDP path on gloo

The 1B run uses the janus-pro-1b preset's settings (bf16 autocast over float32 weights and AdamW, gradient
checkpointing, a float32 reference under the same autocast, G = 4, CFG 3 with the warm-up's prompt dropout
0.1), with one image of 24x24 = 576 codes per rollout (random weights: <begin_of_image> is made likely so
that the image head works too). Peak memory is the largest over the ranks.
"""
import argparse
import copy
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import unigrpo  # noqa: E402


def favour_images(model, bias):
    """Raise the <begin_of_image> logit (on the model's device; conftest's helper is CPU-only)."""
    b = torch.zeros(model.janus.config.text_config.vocab_size, device=model.device)
    b[model.boi_id] = bias
    model.text_logits = lambda h, f=type(model).text_logits: f(model, h) + b


def build(name, dev):
    from transformers import JanusForConditionalGeneration, JanusVQVAE
    tok = data.build_text_tokenizer()
    if name == "tiny":
        cfg = unigrpo.get_config(["--group_size=4", "--max_new_tokens=120", "--max_images=2"])
        torch.manual_seed(0)
        vq = JanusVQVAE(data.make_vq_config(cfg.image_size, cfg.patch_size, cfg.codebook_size, cfg.n_embd))
        return unigrpo.UnifiedModel(unigrpo.tiny_janus(tok, vq, cfg).to(dev), tok), cfg, 2.5
    cfg = unigrpo.get_config(["--preset=janus-pro-1b", "--max_new_tokens=700", "--max_images=1", "--prompts_per_step=2"])
    config = unigrpo.janus_pro_config("janus-pro-1b")
    config.image_token_id = tok.convert_tokens_to_ids("<image_placeholder>")  # the toy tokenizer's ids, a 102400 vocab
    with torch.device(dev):  # random init straight on the GPU (2B parameters: slow on a CPU)
        janus = JanusForConditionalGeneration(config)
    return unigrpo.UnifiedModel(janus, tok), cfg, 11.0  # random logits over 102400 words: boi needs a large bias


def peak_over_ranks():
    t = torch.tensor(float(torch.cuda.max_memory_allocated()), device="cuda")
    if unigrpo.world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


def run(name, dev, steps, fsdp):
    torch.manual_seed(0)  # the same random weights on every rank
    policy, cfg, boi_bias = build(name, dev)
    unigrpo.broadcast_from_master(policy)
    policy = unigrpo.for_training(policy, cfg)
    ref = copy.deepcopy(policy).requires_grad_(False).eval()  # float32 under the same autocast, as grpo() holds it
    if fsdp:
        policy, ref = unigrpo.shard(policy), unigrpo.shard(ref, reshard_root=True)
    favour_images(policy, boi_bias)
    favour_images(ref, boi_bias)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    size = policy.image_size
    mix = data.make_examples("story", 4, "warmup", seed=0, image_size=size) + data.make_examples("t2i", 4, "warmup", seed=0, image_size=size)
    prompts = data.make_examples("continuation", 1, "rl", seed=0, image_size=size) + data.make_examples("story", 1, "rl", seed=0, image_size=size)

    answers = policy.encode_answers([e.answer for e in mix])

    rng = random.Random(0)

    def warmup_step():  # returns nothing: only GRPO rows print metrics
        unigrpo.warmup_step(policy, opt, mix, answers, cfg, [rng.random() < cfg.cfg_dropout for _ in mix])

    def score(ro, group):  # a synthetic reward: low image codes and short text (no reward models needed)
        live = ro.mask.bool()
        img, txt = live & ro.is_image, live & ~ro.is_image
        return {"reward": (((ro.ids < 512) & img).sum(1) / img.sum(1).clamp(min=1) - txt.sum(1) / 100).float().cpu()}

    cfg.process_reward = False
    rows = []
    for phase, step in (("warm-up", warmup_step), ("GRPO", lambda: unigrpo.grpo_step(policy, ref, opt, prompts, score, cfg))):
        times, out = [], None
        if dev == "cuda":
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            t = time.perf_counter()
            out = step()
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        peak = f"{peak_over_ranks() / 2**30:.1f}" if dev == "cuda" else "-"
        extra = f"image tokens/rollout {out['completions/mean_image_tokens']:.0f}, loss {out['loss']:.4f}" if out else ""
        # the first step pays for kernel selection and allocator growth: report the mean of the rest
        rows.append((name, phase, sum(times[1:]) / max(1, len(times) - 1), peak, extra))
    del policy, ref, opt
    if dev == "cuda":
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip_1b", action="store_true")
    ap.add_argument("--fsdp", action="store_true", help="shard with FSDP2 over torchrun's processes")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing was measured. "
                 "Run it on a GPU machine, or `python tests/gpu_check.py --device cpu` for a smoke run of the tiny config.")
    if args.device == "cpu":
        torch.set_num_threads(1)
    if args.fsdp and not unigrpo.ddp_init(unigrpo.get_config([f"--device={args.device}"])):
        sys.exit("gpu_check: --fsdp shards over torchrun's processes; launch it with torchrun (see the docstring)")
    names = ["tiny"] + ([] if args.skip_1b or args.device == "cpu" else ["janus-pro-1b"])
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device: {unigrpo.world_size()} x {where}{' (FSDP)' if args.fsdp else ''}, torch {torch.__version__}, "
          f"{args.steps} steps per phase")
    print(f"| config | phase | s/step | peak GiB (max_memory_allocated) | |\n|---|---|---|---|---|")
    for name in names:
        for row in run(name, args.device, args.steps, args.fsdp):
            print("| {} | {} | {:.2f} | {} | {} |".format(*row), flush=True)
    if args.fsdp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
