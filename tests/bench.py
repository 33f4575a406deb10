"""Speed benchmark (not collected by pytest): python tests/bench.py [--out_dir out]

Prints one table:
  1. the interleaved sampler against transformers' own `generate` on the same tiny Janus, same batch:
     text-only (our sampler with <begin_of_image>/EOS suppressed) and image-only (our sampler forced
     to open one image), both samplers with classifier-free guidance 2 (HF's image mode always guides);
  2. a GRPO step split into sampling, scoring, reference log-probs and update, for G = 2, 4, 8
     (needs a finished `out_dir` from `python unigrpo.py --stage grpo`; skipped otherwise);
  3. peak RSS.
"""
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import unigrpo  # noqa: E402
from conftest import bias_text_logits  # noqa: E402


def _tiny(cfg):
    from transformers import JanusVQVAE
    tok = data.build_text_tokenizer()
    vq = JanusVQVAE(data.make_vq_config(cfg.image_size, cfg.patch_size, cfg.codebook_size, cfg.n_embd))
    return unigrpo.UnifiedModel(unigrpo.tiny_janus(tok, vq, cfg), tok).eval()


def _time(fn, reps=3):
    fn()  # warm-up call
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


@torch.no_grad()
def sampler_vs_generate(cfg, batch=32, new_tokens=64):
    m = _tiny(cfg)
    prompts = [e.prompt for e in data.make_examples("story", batch, "rl", seed=0)]
    ids, mask, _ = unigrpo.pad_prompts(m, prompts)
    rows = []
    # text only
    bias_text_logits(m, boi_id=-1e4, eos_id=-1e4)
    ours = _time(lambda: unigrpo.sample_interleaved(m, prompts, max_new_tokens=new_tokens, max_text_tokens=10 ** 6))
    del m.text_logits
    gc = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, pad_token_id=m.pad_id, eos_token_id=m.eos_id)
    hf = _time(lambda: m.janus.generate(input_ids=ids, attention_mask=mask, **gc))
    rows.append(("text-only", batch * new_tokens / ours, batch * new_tokens / hf))
    # image only: one image of n_image_tokens codes
    N = m.n_image_tokens
    bias_text_logits(m, boi_id=1e4)
    ours = _time(lambda: unigrpo.sample_interleaved(m, prompts, max_new_tokens=N + 1, max_images=1, cfg_scale=2.0))
    del m.text_logits
    img_ids = torch.cat([ids, torch.full((batch, 1), m.boi_id)], 1)
    img_mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], 1)
    m.janus.generation_config.generation_kwargs = {"boi_token_id": m.boi_id}
    hf = _time(lambda: m.janus.generate(input_ids=img_ids, attention_mask=img_mask, generation_mode="image", do_sample=True,
                                        guidance_scale=2.0, pad_token_id=m.pad_id, bos_token_id=m.bos_id, max_new_tokens=N))
    rows.append(("image-only (both with CFG 2)", batch * N / ours, batch * N / hf))
    return rows


def grpo_step_split(cfg, out_dir, Gs=(2, 4, 8)):
    path = os.path.join(out_dir, "grpo")
    if not os.path.exists(os.path.join(path, "config.json")):
        return []
    import copy
    policy = unigrpo.load_model(path, "cpu").eval()
    ref = copy.deepcopy(policy).requires_grad_(False)
    c = copy.copy(cfg)
    c.out_dir = out_dir
    critic, scorer = unigrpo.build_scorers(c, policy.tokenizer, "cpu")
    examples = unigrpo.rl_prompts(c)[:8]
    out = []
    for G in Gs:
        c.group_size = G
        opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=0.0)  # timing only
        m = unigrpo.grpo_step(policy, ref, opt, examples, lambda ro, g: unigrpo.score_rollout(policy, ro, g, critic, scorer, c), c)
        out.append((G, m["time/sampling"], m["time/scoring"], m["time/reference"], m["time/update"]))
    return out


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = unigrpo.get_config(sys.argv[1:])
    print(f"threads={torch.get_num_threads()}  image tokens per image={(cfg.image_size // cfg.patch_size) ** 2}")
    print("| generation | ours tok/s | HF generate tok/s | ratio |\n|---|---|---|---|")
    for name, a, b in sampler_vs_generate(cfg):
        print(f"| {name} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
    rows = grpo_step_split(cfg, cfg.out_dir)
    if rows:
        print("\n| G (8 prompts) | sampling s | scoring s | reference s | update s |\n|---|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(f"{x:.2f}" if isinstance(x, float) else str(x) for x in r) + " |")
    else:
        print(f"\n(no finished GRPO checkpoint in {cfg.out_dir}: step split skipped)")
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
