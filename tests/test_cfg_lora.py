"""Classifier-free guidance for image tokens (the unconditional branch, its cost, agreement with transformers'
own image generation) and the LoRA variant (only adapters train, the reference is the base with adapters off,
adapters-only checkpoints). The sampler/teacher-forced agreement with CFG is in test_unigrpo.py."""
import copy
import json
import os
import shutil

import pytest
import torch

import data
import unigrpo
from conftest import bias_text_logits
from unigrpo import Trajectories, make_batch, sample_interleaved, sequence_logprobs


def _continuation(n=2):  # answers of 2 steps: each row has a context image and two answer images
    return [e for e in data.make_examples("continuation", 50, "rl", seed=0) if e.n_steps == 2][:n]


def test_unconditional_branch_drops_the_text_and_keeps_the_images(tiny):
    """cfg_scale = 0 is the unconditional branch alone: it must not see the prompt or the generated text,
    but must see the context image and the earlier images of the trajectory."""
    b = make_batch(tiny, _continuation())
    assert b.context[0] and (b.is_image.sum(1) > tiny.n_image_tokens).all(), "context images and 2+ answer images"
    img = b.is_image & b.mask.bool()
    text = (b.prompt_mask.bool() & (b.prompt_ids != tiny.image_id)).nonzero()
    words = [(r, c) for r, c in text.tolist() if b.prompt_ids[r, c] not in (tiny.bos_id, tiny.boi_id, tiny.eoi_id)]
    uncond, _ = sequence_logprobs(tiny, b, cfg_scale=0.0)
    cond, _ = sequence_logprobs(tiny, b)

    other = copy.copy(b)  # a different prompt word and a different generated word
    other.prompt_ids, other.ids = b.prompt_ids.clone(), b.ids.clone()
    other.prompt_ids[words[1]] = tiny.tokenizer.convert_tokens_to_ids("blue")
    marker = (b.ids[0] == tiny.boi_id) | (b.ids[0] == tiny.eoi_id) | (b.ids[0] == tiny.eos_id)
    first_text = int((~b.is_image[0] & ~marker).nonzero()[0])
    assert first_text < int(b.is_image[0].nonzero()[0]), "a generated word before the first image"
    other.ids[0, first_text] = tiny.tokenizer.convert_tokens_to_ids("red")
    assert not torch.equal(other.prompt_ids, b.prompt_ids) and not torch.equal(other.ids, b.ids)
    assert torch.equal(sequence_logprobs(tiny, other, cfg_scale=0.0)[0][img], uncond[img])
    assert (sequence_logprobs(tiny, other)[0][img] - cond[img]).abs().max() > 1e-3  # the conditional branch reads text

    other = copy.copy(b)  # a different context image
    other.context = [[torch.rand_like(x) for x in row] for row in b.context]
    assert (sequence_logprobs(tiny, other, cfg_scale=0.0)[0][img] - uncond[img]).abs().max() > 1e-3

    other = copy.copy(b)  # a different first image: the second image's unconditional log-probs change
    other.ids = b.ids.clone()
    first_img = b.is_image[0].nonzero()[: tiny.n_image_tokens, 0]
    other.ids[0, first_img] = (b.ids[0, first_img] + 1) % tiny.janus.config.vq_config.num_embeddings
    second = img.clone()
    second[:, : int(first_img[-1]) + 1] = False
    second[1:] = False
    assert (sequence_logprobs(tiny, other, cfg_scale=0.0)[0] - uncond)[second].abs().max() > 1e-4  # float noise: 1e-6


def test_no_guidance_runs_no_extra_rows_and_guidance_runs_one_twin_per_row(tiny):
    sizes = []
    tiny.trunk = lambda embeds, *a, f=type(tiny).trunk, **k: sizes.append(embeds.shape[0]) or f(tiny, embeds, *a, **k)
    try:
        bias_text_logits(tiny, boi_id=2.5)
        prompts = [e.prompt for e in _continuation(3)]
        for scale, rows in ((1.0, 3), (3.0, 6)):
            sizes.clear()
            ro = sample_interleaved(tiny, prompts, max_new_tokens=30, generator=torch.Generator().manual_seed(0), cfg_scale=scale)
            assert ro.ids.shape[0] == 3 and set(sizes) == {rows}, (scale, set(sizes))
            sizes.clear()
            assert ro.is_image.any()
            sequence_logprobs(tiny, ro, cfg_scale=scale)
            assert sizes == [rows]
    finally:
        del tiny.trunk, tiny.text_logits


def test_guided_image_logprobs_match_transformers_image_generate(tiny):
    """transformers' Janus generate(generation_mode="image") is the reference CFG for one image after a text
    prompt (pad all but BOS and <begin_of_image>, l_u + s (l_c - l_u)): our teacher-forced guided
    log-probs of its samples must equal the guided scores it sampled from."""
    from transformers.generation.logits_process import ClassifierFreeGuidanceLogitsProcessor as CFG
    m = tiny
    prompts = [e.prompt for task in ("story", "howto", "story") for e in data.make_examples(task, 1, "rl", seed=0)]
    ids, mask, _ = unigrpo.pad_prompts(m, prompts)  # a how-to and a story differ in length: left padding
    assert (mask == 0).any(), "left padding is exercised"
    B, N = len(ids), m.n_image_tokens
    boi = torch.full((B, 1), m.boi_id)
    m.janus.generation_config.generation_kwargs = {"boi_token_id": m.boi_id}
    seen, call = [], CFG.__call__
    try:  # record the guided scores, before any sampling warper
        CFG.__call__ = lambda self, i, scores: seen.append(call(self, i, scores)) or seen[-1]
        torch.manual_seed(0)
        codes = m.janus.generate(input_ids=torch.cat([ids, boi], 1), attention_mask=torch.cat([mask, torch.ones_like(boi)], 1),
                                 generation_mode="image", do_sample=True, guidance_scale=3.0, pad_token_id=m.pad_id,
                                 bos_token_id=m.bos_id, max_new_tokens=N)
    finally:
        CFG.__call__ = call
    hf = torch.log_softmax(torch.stack(seen, 1).float(), -1).gather(-1, codes[..., None]).squeeze(-1)
    is_img = torch.cat([torch.zeros_like(boi, dtype=torch.bool), torch.ones(B, N, dtype=torch.bool)], 1)
    z = torch.zeros(B, N + 1, dtype=torch.long)
    ro = Trajectories(ids, mask, [[] for _ in range(B)], torch.cat([boi, codes], 1), is_img, z, z.float(),
                      torch.ones(B, N + 1), torch.ones(B, dtype=torch.bool))
    with torch.no_grad():
        ours = sequence_logprobs(m, ro, cfg_scale=3.0)[0][:, 1:]
        unguided = sequence_logprobs(m, ro)[0][:, 1:]
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=0)  # measured: 5e-7
    assert (unguided - hf).abs().max() > 1e-2


# LoRA --------------------------------------------------------------------------


@pytest.fixture
def base_dir(tiny, tmp_path):
    unigrpo.save_checkpoint(tiny, str(tmp_path / "base"), dict(iter=0))
    return str(tmp_path / "base")


def _grpo_steps(policy, n, cfg_scale=3.0):
    cfg = unigrpo.get_config(["--group_size=2", "--max_new_tokens=40", "--kl_beta=0.04", "--lr=2e-2", "--inner_epochs=2",
                              "--process_reward=false", f"--cfg_scale={cfg_scale}"])
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
    low_codes = lambda ro, g: {"reward": ((ro.ids < 64) & ro.is_image & ro.mask.bool()).float().sum(1) / ro.mask.sum(1)}
    examples = data.make_examples("story", 2, "rl", seed=0)
    bias_text_logits(policy, boi_id=3.0)  # images early, so both heads get a signal
    try:
        return [unigrpo.grpo_step(policy, policy, opt, examples, low_codes, cfg) for _ in range(n)], cfg
    finally:
        del policy.text_logits


def test_lora_trains_only_adapters_and_the_reference_is_the_base(base_dir):
    torch.manual_seed(0)
    policy = unigrpo.load_model(base_dir, "cpu", lora_rank=4, lora_alpha=8).eval()
    trainable = {n for n, p in policy.janus.named_parameters() if p.requires_grad}
    n_layer = policy.janus.config.text_config.num_hidden_layers
    assert len(trainable) == 2 * 7 * n_layer and all("lora_" in n and "language_model.layers" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in policy.janus.named_parameters()}
    hist, cfg = _grpo_steps(policy, 2)
    assert hist[0]["kl"] == 0.0  # adapters start at B = 0: the first policy is the base
    after = dict(policy.janus.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trainable), "a base weight moved"
    assert all(not torch.equal(before[n], after[n]) for n in trainable if "lora_B" in n), "an adapter did not train"

    ro = make_batch(policy, data.make_examples("howto", 2, "rl", seed=1))
    base = unigrpo.load_model(base_dir, "cpu").eval()
    with torch.no_grad():
        ref = unigrpo.reference_logprobs(policy, ro, cfg)
        expect = sequence_logprobs(base, ro, cfg_scale=cfg.cfg_scale)[0]
        now = sequence_logprobs(policy, ro, cfg_scale=cfg.cfg_scale)[0]
        unigrpo.reference_logprobs(policy, ro, cfg)
        assert torch.equal(sequence_logprobs(policy, ro, cfg_scale=cfg.cfg_scale)[0], now)  # adapters back on after
    m = ro.mask.bool()
    torch.testing.assert_close(ref[m], expect[m], atol=1e-6, rtol=0)
    assert (now - ref)[m].abs().max() > 1e-3, "after a step the policy differs from its reference"


def test_lora_checkpoint_holds_adapters_only_and_reloads_anywhere(base_dir, tmp_path):
    torch.manual_seed(0)
    policy = unigrpo.load_model(base_dir, "cpu", lora_rank=4, lora_alpha=8).eval()
    _grpo_steps(policy, 1, cfg_scale=1.0)
    ro = make_batch(policy, data.make_examples("story", 2, "rl", seed=1))
    with torch.no_grad():
        want = sequence_logprobs(policy, ro)[0]
    unigrpo.save_checkpoint(policy, str(tmp_path / "lora"), dict(iter=1))
    files = os.listdir(tmp_path / "lora")
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files and "trainer_state.pt" in files
    with open(tmp_path / "lora" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.join("..", "base")  # out_dir can move
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "base", moved / "base")
    shutil.copytree(tmp_path / "lora", moved / "lora")

    again = unigrpo.load_model(str(moved / "lora"), "cpu").eval()  # resume / eval: adapters attached, trainable
    assert again.lora is not None and all("lora_" in n for n, p in again.janus.named_parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.equal(sequence_logprobs(again, ro)[0], want)
        base = unigrpo.load_model(str(moved / "base"), "cpu").eval()
        assert torch.equal(unigrpo.reference_logprobs(again, ro, unigrpo.get_config([])), sequence_logprobs(base, ro)[0])
        # the next stage: the adapters merged into plain weights, optionally with fresh adapters on top
        merged = unigrpo.load_model(str(moved / "lora"), "cpu", lora_rank=0).eval()
        assert not hasattr(merged, "lora") and all(p.requires_grad for p in merged.janus.model.language_model.parameters())
        torch.testing.assert_close(sequence_logprobs(merged, ro)[0], want, atol=1e-5, rtol=0)
        stacked = unigrpo.load_model(str(moved / "lora"), "cpu", lora_rank=2).eval()
        torch.testing.assert_close(unigrpo.reference_logprobs(stacked, ro, unigrpo.get_config([])), want, atol=1e-5, rtol=0)
    unigrpo.save_checkpoint(stacked, str(moved / "stage2"), dict(iter=0))  # a chain: stage2 -> lora -> base
    with open(moved / "stage2" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.join("..", "lora")
    chained = unigrpo.load_model(str(moved / "stage2"), "cpu").eval()
    with torch.no_grad():
        torch.testing.assert_close(sequence_logprobs(chained, ro)[0], want, atol=1e-5, rtol=0)



def _colour_answer(m, e):
    """A t2i answer whose 9 codes all name the described object's colour: conditionally certain, a 4-way
    guess unconditionally, and learnt by the tiny model in ~100 steps (real scenes take ~1000)."""
    return [m.boi_id] + [1 + data.COLOURS.index(e.states[0][0].colour)] * 9 + [m.eoi_id, m.eos_id], \
        [False] + [True] * 9 + [False] * 2, [True] * 10 + [False, True]


def test_prompt_dropout_trains_the_unconditional_branch(tiny):
    """--cfg_dropout: a dropped example is the input the sampler's unconditional twin sees (its image log-probs
    equal the guided ones at cfg_scale 0) and trains only its image tokens. Same start, same batches, with and
    without dropout: the held-out NLL of the first image code under the unconditional input ends near the
    marginal's entropy with dropout and far above it without (that branch was never trained)."""
    train, held_ex = data.make_examples("t2i", 64, "warmup", seed=0), data.make_examples("t2i", 32, "eval", seed=0)
    held = make_batch(tiny, held_ex, [_colour_answer(tiny, e) for e in held_ex])
    img = held.is_image & held.mask.bool()
    dropped = unigrpo.drop_prompts(tiny, copy.deepcopy(held), torch.ones(len(held.ids), dtype=torch.bool))
    assert (dropped.prompt_ids != held.prompt_ids).any() and torch.equal(dropped.mask, held.mask * held.is_image)
    torch.testing.assert_close(sequence_logprobs(tiny, dropped)[0][img], sequence_logprobs(tiny, held, cfg_scale=0.0)[0][img])
    first = img & (img.cumsum(1) == 1)
    p_colour = torch.bincount(held.ids[first]).float()[1:] / first.sum()
    marginal = -(p_colour * p_colour.log()).sum().item()
    nll = {}
    for p in (0.0, 0.5):
        torch.manual_seed(0)
        m = copy.deepcopy(tiny).train()
        opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-3)
        answers, rng = [_colour_answer(m, e) for e in train], torch.Generator().manual_seed(0)
        for _ in range(120):
            pick, drop = torch.randperm(len(train), generator=rng)[:8].tolist(), (torch.rand(8, generator=rng) < p).tolist()
            unigrpo.warmup_step(m, opt, [train[i] for i in pick], [answers[i] for i in pick], unigrpo.get_config([]), drop)
        with torch.no_grad():
            nll[p] = [-sequence_logprobs(m.eval(), b)[0][first].mean().item() for b in (dropped, held)]
    print(f"first image code, held-out NLL (unconditional, conditional): no dropout {nll[0.0]}, dropout 0.5 {nll[0.5]}, "
          f"marginal entropy {marginal:.3f}")
    assert nll[0.0][1] < 0.1 and nll[0.5][1] < 1.0  # both learnt the conditional branch
    assert nll[0.5][0] < marginal + 0.5 and nll[0.0][0] > nll[0.5][0] + 1.0, (nll, marginal)
