"""
Rewards for unified interleaved GRPO: the hybrid outcome reward R = r_t + r_v + r_f and the
per-step (process) rewards, plus the toy world's reward models.

A decoded sample is a list of segments, ("text", str) or ("image", PIL.Image), and a flag
`finished` (the policy ended it with EOS within the limits). A sample is scored against the
prompt's reference: `ref_texts` (the correct text of each answer step) and `n_steps` (how many
(text, image) pairs the answer should have). This file imports nothing from the project, so the
toy critic is handed the toy world's `parse` function instead of importing it.

The three terms, each scaled to [0, 1] so that the unweighted sum of the paper weighs them equally:
- r_f, structural fidelity (a rule): 1 iff the answer is exactly n_steps (text, image) pairs in
  that order, every text has a word, no image was cut off, and the sample finished; else 0.
  Empty text segments carry no content and are ignored (the sampler leaves one behind when EOS
  comes right after an image); an *empty text step* still fails, because then the layout is wrong.
- r_t, text quality/relevance: the paper asks a VLM critic (LLaVA-Critic). Here a critic returns
  one score in [0, 1] per generated text step. The toy critic parses the step and the reference
  into scenes and returns the fraction of attributes (colour, shape, cell of each reference object)
  that are right; `VLMCritic` is the full-scale slot (a 0-10 score divided by 10).
- r_v, visual quality and image-text alignment: ImageReward in the paper, CLIP score in its
  ablation. Here a tiny CLIP (open_clip's architecture) trained on toy scenes, or a real open_clip
  checkpoint. Raw cosines live in a narrow band, so they are calibrated to [0, 1] by
  (cos - neg_mean) / (pos_mean - neg_mean), clamped, with the means of matching and mismatched
  pairs measured on held-out data: a mismatched pair scores about 0, a matching pair about 1.
  The toy CLIP's score is graded: a caption with one attribute wrong (same object in another
  cell, or another colour) lands around 0.7-0.8, below every matching pair's raw cosine.

Choices the paper leaves open, made here:
- Several images: r_v is the sum of the scores of the first n_steps images divided by n_steps, so
  a missing image counts 0 and extra images earn nothing. r_t is aggregated over text steps in the
  same way. (A mean over the images actually produced would reward dropping the hard ones.)
- An image is scored against the generated text right before it (the paper's "visual-text
  alignment"); r_t checks that this text is itself right. An image with no text before it scores 0.
- A step is one non-empty text segment or one image (the paper's process reward): a text step gets
  its r_t step score, an image step its r_v against the preceding text. The GRPO side normalises
  these over the group and turns them into suffix sums (process advantages).
- Two extra layouts beyond interleaved answers: n_steps == 0 is an understanding answer (one text,
  no image); task="t2i" is n_steps images and no text, each image scored against ref_texts[i] (the
  prompt's description) because there is no generated text to align with.
"""

import json
import math
import os
import random
import re
import time
from itertools import permutations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# -----------------------------------------------------------------------------
# r_f: structural fidelity


def has_words(text):
    return text is not None and len(text.split()) > 0


def expected_layout(n_steps, task=None):
    """The segment kinds a well-formed answer has, in order."""
    if task == "t2i":
        return ["image"] * n_steps
    if n_steps == 0:  # understanding: a single text answer
        return ["text"]
    return ["text", "image"] * n_steps


def format_reward(segments, n_steps, finished, task=None) -> float:
    if not finished:
        return 0.0
    # empty text segments are not content: drop them, then the layout must match exactly
    content = [(kind, x) for kind, x in segments if not (kind == "text" and not has_words(x))]
    if [kind for kind, _ in content] != expected_layout(n_steps, task):
        return 0.0
    if any(kind == "image" and x is None for kind, x in content):  # truncated image
        return 0.0
    return 1.0

# -----------------------------------------------------------------------------
# r_t: text critics. Interface: .step_scores(texts, ref_texts) -> list[float] in [0, 1], one per text


class ToyTextCritic:
    """Scores each text step against the reference step by parsing both into scenes: 1 for the right scene,
    else `partial` times the fraction of attributes right (a near miss is still wrong)."""

    def __init__(self, parse, partial=0.5):
        self.parse = parse  # the toy world's text -> scene (tuple of objects with colour/shape/cell) or None
        self.partial = partial

    def step_scores(self, texts, ref_texts):
        scores = []
        for i, text in enumerate(texts):
            if i >= len(ref_texts):
                scores.append(0.0)  # steps beyond the reference earn nothing
                continue
            ref = self.parse(ref_texts[i])
            if ref is None:
                raise ValueError(f"reference text {ref_texts[i]!r} does not parse; "
                                 "the toy critic needs toy-world references")
            gen = self.parse(text)
            scores.append(0.0 if gen is None else 1.0 if gen == ref else self.partial * scene_match(gen, ref))
        return scores


def scene_match(gen, ref):
    """Fraction of attributes right under the best matching of generated to reference objects.
    The denominator counts 3 attributes for every object of the larger scene, so a missing object
    and an extra object both cost a whole object's worth."""
    def agree(a, b):
        return (a.colour == b.colour) + (a.shape == b.shape) + (a.cell == b.cell)
    small, big = (gen, ref) if len(gen) <= len(ref) else (ref, gen)
    best = max(sum(agree(a, b) for a, b in zip(small, perm)) for perm in permutations(big, len(small)))
    return best / (3 * max(len(gen), len(ref)))


def parse_critic_score(text):
    """Map a critic's free-form reply to [0, 1], or None when no score can be read.
    Looks, in order, for a number after score/rating/grade, for a fraction 'x/y' or 'x out of y',
    then for a reply holding a single number. Without a denominator the scale is 0-10.
    Out of range -> None (better no reward than a made-up one)."""
    if text is None:
        return None
    s = text.lower().replace("*", "")  # markdown bold, e.g. "**Score:** 7"
    num, den = r"(-?\d+(?:\.\d+)?)", r"(?:\s*(?:/|out of)\s*(\d+(?:\.\d+)?))?"
    m = (re.search(r"(?:score|rating|grade)\w*\s*(?:is|of|:|=)?\s*" + num + den, s)
         or re.search(num + r"\s*(?:/|out of)\s*(\d+(?:\.\d+)?)", s))
    if m:
        x, d = float(m.group(1)), float(m.group(2)) if m.group(2) else 10.0
    else:
        nums = re.findall(num, s)
        if len(nums) != 1:
            return None
        x, d = float(nums[0]), 10.0
    if d <= 0 or not 0.0 <= x / d <= 1.0:
        return None
    return x / d


class VLMCritic:
    """Full-scale r_t slot (the paper's LLaVA-Critic): any HF image-text-to-text chat model (an id or a
    save_pretrained folder with its processor), asked for a 0-10 score per step; a prompt without
    reference texts has each step graded on its own."""

    PROMPT = ("You are grading one step of a multi-step answer.\nReference step: {ref}\nGenerated step: {gen}\n"
              "Rate the generated step for relevance to the reference and for quality, from 0 to 10. "
              "Reply with the score only.")
    PROMPT_NO_REF = ("You are grading one step of a multi-step answer.\nStep: {gen}\n"
                     "Rate the step for clarity and quality, from 0 to 10. Reply with the score only.")

    def __init__(self, model_name_or_path, device="cpu", max_new_tokens=16):
        from transformers import AutoModelForImageTextToText, AutoProcessor
        self.processor = AutoProcessor.from_pretrained(model_name_or_path)
        self.model = AutoModelForImageTextToText.from_pretrained(model_name_or_path, dtype="auto").to(device).eval()
        self.device, self.max_new_tokens = device, max_new_tokens

    @torch.no_grad()
    def step_scores(self, texts, ref_texts):
        scores = []
        for i, text in enumerate(texts):
            if ref_texts and i >= len(ref_texts):
                scores.append(0.0)  # steps beyond the reference earn nothing
                continue
            prompt = self.PROMPT.format(ref=ref_texts[i], gen=text) if ref_texts else self.PROMPT_NO_REF.format(gen=text)
            chat = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
            inputs = self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True, return_tensors="pt").to(self.device)
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            reply = self.processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            score = parse_critic_score(reply)
            scores.append(0.0 if score is None else score)  # an unreadable verdict earns nothing
        return scores

# -----------------------------------------------------------------------------
# r_v: visual scorers. Interface: .score(images, texts) -> FloatTensor [B] in [0, 1]


class ClipScorer:
    """An open_clip model plus the two functions that feed it, with a calibration to [0, 1]."""

    def __init__(self, model, tokenize, preprocess, pos_mean=0.4, neg_mean=0.0, config=None):
        # the defaults make score = 2.5 * max(cos, 0), the CLIPScore of Hessel et al. (2021),
        # a sensible scale for real checkpoints before calibrate() has been run
        self.model, self.tokenize, self.preprocess = model.eval(), tokenize, preprocess
        self.pos_mean, self.neg_mean = float(pos_mean), float(neg_mean)
        self.config = config  # how to rebuild the model (toy CLIP only), for save_clip

    @torch.no_grad()
    def cosine(self, images, texts):
        if len(images) == 0:
            return torch.zeros(0)
        device = next(self.model.parameters()).device
        x = torch.stack([self.preprocess(img) for img in images]).to(device)
        t = self.tokenize(list(texts)).to(device)
        cos = (self.model.encode_image(x, normalize=True) * self.model.encode_text(t, normalize=True)).sum(-1)
        return cos.float().cpu()

    def score(self, images, texts):
        cos = self.cosine(images, texts)
        return ((cos - self.neg_mean) / (self.pos_mean - self.neg_mean)).clamp(0.0, 1.0)


def calibrate(scorer, images, texts, batch=64, seed=0):
    """Measure, on held-out pairs, the mean cosine of matching pairs (pos) and of mismatched pairs
    (neg: every other caption of the same chunk of `batch` pairs, captions distinct within a chunk),
    set them on the scorer, and also return top-1 image->text retrieval accuracy among the chunk."""
    first = {}  # one image per distinct caption, so a 'mismatch' is never secretly a match
    for img, txt in zip(images, texts):
        first.setdefault(txt, img)
    caps = sorted(first)
    random.Random(seed).shuffle(caps)
    n_chunks = len(caps) // batch
    if n_chunks == 0:
        raise ValueError(f"calibrate needs at least {batch} distinct captions, got {len(caps)}")
    top1, pos, neg = [], [], []
    with torch.no_grad():
        device = next(scorer.model.parameters()).device
        for c in range(n_chunks):
            chunk = caps[c * batch:(c + 1) * batch]
            x = torch.stack([scorer.preprocess(first[t]) for t in chunk]).to(device)
            im = scorer.model.encode_image(x, normalize=True)
            tx = scorer.model.encode_text(scorer.tokenize(chunk).to(device), normalize=True)
            sim = (im @ tx.T).float().cpu()
            eye = torch.eye(batch, dtype=torch.bool)
            top1.append((sim.argmax(1) == torch.arange(batch)).float().mean().item())
            pos.append(sim[eye].mean().item())
            neg.append(sim[~eye].mean().item())
    scorer.pos_mean, scorer.neg_mean = float(np.mean(pos)), float(np.mean(neg))
    return {"top1": float(np.mean(top1)), "pos_mean": scorer.pos_mean, "neg_mean": scorer.neg_mean,
            "chance": 1.0 / batch, "n_eval": n_chunks * batch}

# --- the toy world's tiny CLIP


def image_to_tensor(img, image_size):
    """PIL -> FloatTensor [3, S, S] in [-1, 1], the same scale the toy world's VQ uses."""
    img = img.convert("RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def make_toy_tokenize(tokenizer, context_length):
    """Word-level ids, then an EOT id = len(tokenizer), zero padded. open_clip's CLIP pools the text
    at argmax(id) (pool_type 'argmax'), so EOT must be the largest id in the row; its causal mask
    means the zero padding after EOT never reaches the pooled position."""
    eot = len(tokenizer)

    def tokenize(texts):
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, ids in enumerate(tokenizer(list(texts), add_special_tokens=False)["input_ids"]):
            ids = ids[:context_length - 1] + [eot]
            out[i, :len(ids)] = torch.tensor(ids)
        return out
    return tokenize


def toy_clip_config(tokenizer, image_size=24, patch_size=8, embed_dim=64, width=64, layers=2, context_length=32):
    # one patch per grid cell (8 px patches on the toy world's 24 px), a good inductive bias for the 3x3 world
    return dict(embed_dim=embed_dim,
                vision_cfg=dict(image_size=image_size, patch_size=patch_size, width=width, layers=layers,
                                head_width=16),  # 4 heads of 16
                text_cfg=dict(context_length=context_length, vocab_size=len(tokenizer) + 1,  # + the EOT id
                              width=width, layers=layers, heads=4))


def build_toy_clip(config, tokenizer):
    import open_clip
    model = open_clip.CLIP(**config)
    size = config["vision_cfg"]["image_size"]
    return ClipScorer(model, make_toy_tokenize(tokenizer, config["text_cfg"]["context_length"]),
                      lambda img: image_to_tensor(img, size), config=config)


def train_tiny_clip(images, texts, tokenizer, image_size=24, steps=400, batch_size=128, seed=0,
                    lr=5e-4, patch_size=8, held_out=0.1, hard_negatives=0.5, progress=False):
    """Contrastive (InfoNCE, learnable temperature) training of a tiny open_clip CLIP on
    (rendered scene, description) pairs, with hard negatives in every batch (below). A held-out set
    of *captions never seen in training* gives the retrieval accuracy and the calibration means.
    Defaults: 3000 random scenes train in ~40 s on one CPU thread to ~99% top-1 among 64.
    lr 5e-4: at 1e-3 and above, binding objects to cells is learnt late or not at all."""
    t0 = time.time()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    caps = sorted(set(texts))
    rng.shuffle(caps)
    hold = set(caps[:max(64, int(held_out * len(caps)))])
    train_idx = [i for i, t in enumerate(texts) if t not in hold]
    eval_idx = [i for i, t in enumerate(texts) if t in hold]
    if len(hold) < 64 or len(train_idx) < batch_size:
        raise ValueError(f"train_tiny_clip needs more pairs: {len(caps)} distinct captions for {len(texts)} pairs "
                         f"(held out {len(hold)} captions, {len(train_idx)} training pairs, batch_size {batch_size})")

    scorer = build_toy_clip(toy_clip_config(tokenizer, image_size, patch_size), tokenizer)
    model = scorer.model.train()
    X = torch.stack([scorer.preprocess(images[i]) for i in train_idx])
    T = scorer.tokenize([texts[i] for i in train_idx])
    # captions as ids: two pairs with the same caption are both positives, not a false negative
    cap_index = {c: k for k, c in enumerate(caps)}
    cap_id = torch.tensor([cap_index[texts[i]] for i in train_idx])
    # hard negatives: the last half of each batch is replaced by a neighbour of each anchor in the
    # first half (a caption at most 2 words away: other colour, shape or cell), so that the model
    # must bind attributes to objects and cells instead of spotting which colours occur somewhere
    neighbours = []
    for c in range(0, len(T), 512):
        d = (T[c:c + 512, None, :] != T[None, :, :]).sum(-1, dtype=torch.int16)  # int16 counts: int64 cost ~0.5 GB here
        neighbours += [row.nonzero().squeeze(1) for row in (d >= 1) & (d <= 2)]
    n_hard = int(hard_negatives * batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, foreach=True)  # one kernel for all tensors
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    for step in range(steps):
        idx = torch.randint(len(train_idx), (batch_size,), generator=gen)
        for k in range(n_hard):
            nb = neighbours[idx[k]]
            if len(nb):
                idx[batch_size - 1 - k] = nb[torch.randint(len(nb), (1,), generator=gen)]
        im = model.encode_image(X[idx], normalize=True)
        tx = model.encode_text(T[idx], normalize=True)
        logits = model.logit_scale.exp() * im @ tx.T
        same = (cap_id[idx, None] == cap_id[None, idx]).float()
        target = same / same.sum(1, keepdim=True)  # symmetric, so it serves both directions
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip's training does
        if progress and (step % 100 == 0 or step == steps - 1):
            print(f"clip step {step} loss {loss.item():.4f} scale {model.logit_scale.exp().item():.1f}")
    model.eval()
    stats = calibrate(scorer, [images[i] for i in eval_idx], [texts[i] for i in eval_idx], seed=seed)
    stats.update(loss=loss.item(), seconds=time.time() - t0, steps=steps, n_train=len(train_idx),
                 n_held_out=len(eval_idx))
    return scorer, stats


def save_clip(scorer, dir):
    from safetensors.torch import save_file
    if scorer.config is None:
        raise ValueError("save_clip saves toy CLIPs built by train_tiny_clip/load_clip; "
                         "a real checkpoint is reloaded by name")
    os.makedirs(dir, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in scorer.model.state_dict().items()},
              os.path.join(dir, "model.safetensors"))
    with open(os.path.join(dir, "clip_config.json"), "w") as f:
        json.dump({"model": scorer.config, "pos_mean": scorer.pos_mean, "neg_mean": scorer.neg_mean}, f, indent=2)


def load_clip(dir, tokenizer):
    from safetensors.torch import load_file
    with open(os.path.join(dir, "clip_config.json")) as f:
        cfg = json.load(f)
    vocab = cfg["model"]["text_cfg"]["vocab_size"]
    if vocab != len(tokenizer) + 1:
        raise ValueError(f"{dir}: CLIP was trained with a vocabulary of {vocab - 1} words, the tokenizer has "
                         f"{len(tokenizer)}; load it with the tokenizer it was trained with")
    scorer = build_toy_clip(cfg["model"], tokenizer)
    scorer.model.load_state_dict(load_file(os.path.join(dir, "model.safetensors")))
    scorer.model.eval()
    scorer.pos_mean, scorer.neg_mean = cfg["pos_mean"], cfg["neg_mean"]
    return scorer

# --- full-scale visual scorers


def load_openclip_scorer(name, pretrained, device="cpu"):
    """A real open_clip checkpoint (e.g. "ViT-B-32", "laion2b_s34b_b79k", or a local file as
    `pretrained`), with its own tokenizer and preprocessing. Calibrated as CLIPScore until
    calibrate() is run on matching/mismatched pairs of the target domain."""
    import open_clip
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained or None, device=device)
    return ClipScorer(model, open_clip.get_tokenizer(name), preprocess)


class ImageRewardScorer:
    """The paper's r_v: ImageReward (Xu et al. 2023), only if the `image-reward` package is installed."""

    def __init__(self, name="ImageReward-v1.0", device="cpu"):
        try:
            import ImageReward as RM
        except ImportError as e:
            raise ImportError("ImageRewardScorer needs the ImageReward package (pip install image-reward); "
                              "without it use the CLIP scorer") from e
        self.model = RM.load(name, device=device)

    @torch.no_grad()
    def score(self, images, texts):
        # ImageReward is z-scored against human preferences (mean 0, std 1): a sigmoid maps it to [0, 1]
        raw = [float(self.model.score(t, img)) for img, t in zip(images, texts)]
        return torch.sigmoid(torch.tensor(raw, dtype=torch.float32))

# -----------------------------------------------------------------------------
# process (per-step) rewards and the hybrid outcome reward


def batch_step_rewards(batch_segments, batch_ref_texts, text_critic, visual_scorer, batch_tasks=None, batch_n_steps=None):
    """step_rewards for a whole batch with one visual_scorer call for all images of the batch. With
    batch_n_steps, a step beyond the layout the prompt asks for (an extra text or image) earns 0: the
    outcome terms do not count it, so the process reward must not pay for drawing it either."""
    batch_tasks = batch_tasks or [None] * len(batch_segments)
    batch_n_steps = batch_n_steps or [None] * len(batch_segments)
    steps, pairs = [], []  # pairs: (sample, segment index, image, text) still to be scored
    for b, (segments, ref_texts, task, n) in enumerate(zip(batch_segments, batch_ref_texts, batch_tasks, batch_n_steps)):
        layout = expected_layout(n, task) if n is not None else None
        n_text, n_image = (layout.count("text"), layout.count("image")) if layout else (len(segments),) * 2
        out = [None] * len(segments)
        text_pos = [j for j, (kind, x) in enumerate(segments) if kind == "text" and has_words(x)]
        for i, (j, s) in enumerate(zip(text_pos, text_critic.step_scores([segments[j][1] for j in text_pos], ref_texts))):
            out[j] = float(s) if i < n_text else 0.0
        n_img = 0
        for j, (kind, img) in enumerate(segments):
            if kind != "image":
                continue
            if task == "t2i":  # no generated text: align with the prompt's description
                text = ref_texts[n_img] if n_img < len(ref_texts) else None
            else:
                prev = segments[j - 1] if j > 0 else None
                text = prev[1] if prev is not None and prev[0] == "text" and has_words(prev[1]) else None
            n_img += 1
            out[j] = 0.0
            if img is not None and text is not None and n_img <= n_image:
                pairs.append((b, j, img, text))
        steps.append(out)
    if pairs:
        scores = visual_scorer.score([p[2] for p in pairs], [p[3] for p in pairs])
        for (b, j, _, _), s in zip(pairs, scores.tolist()):
            steps[b][j] = float(s)
    return steps


def step_rewards(segments, ref_texts, text_critic, visual_scorer, task=None, n_steps=None):
    """One reward per segment: a text step its r_t score, an image its r_v against the text right
    before it (0 if there is none, the image is None, or it is beyond n_steps), None for a segment
    that is no step."""
    return batch_step_rewards([segments], [ref_texts], text_critic, visual_scorer, [task], [n_steps])[0]


def hybrid_reward(batch_segments, batch_finished, batch_ref_texts, batch_n_steps, text_critic, visual_scorer,
                  use_format=True, use_text=True, use_visual=True, batch_tasks=None) -> dict:
    """R = r_t + r_v + r_f over the enabled terms (unweighted, as in the paper). Every term is
    computed even when disabled so that it can be logged."""
    batch_tasks = batch_tasks or [None] * len(batch_segments)
    steps = batch_step_rewards(batch_segments, batch_ref_texts, text_critic, visual_scorer, batch_tasks, batch_n_steps)
    fmt, txt, vis = [], [], []
    for segments, finished, n, task, st in zip(batch_segments, batch_finished, batch_n_steps, batch_tasks, steps):
        layout = expected_layout(n, task)
        n_text, n_img = layout.count("text"), layout.count("image")
        text_scores = [r for (kind, _), r in zip(segments, st) if kind == "text" and r is not None]
        image_scores = [r for (kind, _), r in zip(segments, st) if kind == "image"]
        fmt.append(format_reward(segments, n, finished, task))
        # the first n expected steps, divided by n: missing steps count 0, extra steps earn nothing
        txt.append(sum(text_scores[:n_text]) / n_text if n_text else 0.0)
        vis.append(sum(image_scores[:n_img]) / n_img if n_img else 0.0)
    fmt, txt, vis = (torch.tensor(v, dtype=torch.float32) for v in (fmt, txt, vis))
    reward = torch.zeros(len(batch_segments))
    for on, term in ((use_format, fmt), (use_text, txt), (use_visual, vis)):
        if on:
            reward = reward + term
    return {"reward": reward, "format": fmt, "text": txt, "visual": vis, "steps": steps}
