"""Tests for rewards.py: exact values on crafted samples, and a tiny CLIP that really learns."""
import random

import pytest
import torch

import data
import rewards
import unigrpo
from rewards import (ClipScorer, ToyTextCritic, format_reward, hybrid_reward, load_clip, parse_critic_score,
                     save_clip, step_rewards, train_tiny_clip)

S1 = data.make_scene(("red", "circle", 0))  # the red circle is at the top left .
S2 = data.make_scene(("red", "circle", 1))
S3 = data.make_scene(("red", "circle", 1), ("blue", "square", 4))
IMG = data.render(S1)


def pairs(*scenes):
    """A well-formed interleaved answer: describe + render for each scene."""
    return [seg for s in scenes for seg in (("text", data.describe(s)), ("image", data.render(s)))]


class FakeScorer:
    """r_v stand-in: 0.5 for any (image, text) pair, counting calls to check batching."""

    def __init__(self):
        self.calls = []

    def score(self, images, texts):
        self.calls.append((list(images), list(texts)))
        return torch.full((len(images),), 0.5)

# -----------------------------------------------------------------------------
# r_f


def test_format_reward_good_and_bad():
    good = pairs(S1, S2)
    assert format_reward(good, 2, True) == 1.0
    assert format_reward(good + [("text", "")], 2, True) == 1.0  # EOS right after the last image
    assert format_reward(good, 2, False) == 0.0  # not finished
    assert format_reward(good[:3], 2, True) == 0.0  # missing image
    assert format_reward(good + [("image", IMG)], 2, True) == 0.0  # extra image
    assert format_reward(pairs(S1, S2, S3), 2, True) == 0.0  # extra step
    assert format_reward(good + [("text", "the end .")], 2, True) == 0.0  # trailing text
    assert format_reward([("text", "  ")] + good[1:], 2, True) == 0.0  # empty text step
    assert format_reward(good[:3] + [("image", None)], 2, True) == 0.0  # truncated image
    assert format_reward([good[1], good[0], good[3], good[2]], 2, True) == 0.0  # image before its text
    assert format_reward([], 1, True) == 0.0


def test_format_reward_other_layouts():
    assert format_reward([("text", data.describe(S1))], 0, True) == 1.0  # understanding
    assert format_reward(pairs(S1), 0, True) == 0.0
    assert format_reward([("text", ""), ("image", IMG)], 1, True, task="t2i") == 1.0
    assert format_reward(pairs(S1), 1, True, task="t2i") == 0.0

# -----------------------------------------------------------------------------
# r_t


def test_toy_text_critic_fractions():
    """1 for the right scene; a near miss earns `partial` (default half) of the fraction of attributes right."""
    critic = ToyTextCritic(data.parse)
    ref = [data.describe(S1), data.describe(S3)]
    scores = critic.step_scores([
        "the blue circle is at the top left .",  # wrong colour: 2/3 of the attributes
        "the red circle is at the top .",  # one of two objects, exactly right: 3/6 (missing object)
        "the red circle is at the top left .",  # beyond the reference: 0
    ], ref)
    assert scores == pytest.approx([0.5 * 2 / 3, 0.5 * 1 / 2, 0.0])
    one = [data.describe(S1)]
    assert critic.step_scores(["the red circle is at the center ."], one) == pytest.approx([0.5 * 2 / 3])  # wrong cell
    assert critic.step_scores(["the red square is at the bottom ."], one) == pytest.approx([0.5 * 1 / 3])
    assert critic.step_scores([data.describe(S1)], one) == [1.0]
    assert critic.step_scores(["the red circle is at ."], one) == [0.0]  # unparseable
    assert critic.step_scores(["banana"], one) == [0.0]
    # an extra object costs as much as a missing one
    assert critic.step_scores([data.describe(data.make_scene(("red", "circle", 0), ("red", "circle", 8)))],
                              one) == pytest.approx([0.5 * 1 / 2])
    assert ToyTextCritic(data.parse, partial=1.0).step_scores(["the red circle is at the center ."], one) == pytest.approx([2 / 3])
    # best assignment, not positional: the two objects swapped cells keep colour and shape right
    swapped = data.make_scene(("blue", "square", 1), ("red", "circle", 4))
    assert critic.step_scores([data.describe(swapped)], [data.describe(S3)]) == pytest.approx([0.5 * 4 / 6])
    two_off = data.make_scene(("red", "circle", 1), ("green", "square", 4))
    assert critic.step_scores([data.describe(two_off)], [data.describe(S3)]) == pytest.approx([0.5 * 5 / 6])
    assert critic.step_scores([], one) == []
    with pytest.raises(ValueError, match="does not parse"):
        critic.step_scores(["the red circle is at the top ."], ["not a scene"])


@pytest.mark.parametrize("reply, expected", [
    ("7", 0.7), ("10", 1.0), ("0", 0.0), (" 8.5\n", 0.85),
    ("Score: 8/10", 0.8), ("**Rating:** 9 out of 10", 0.9), ("85/100", 0.85),
    ("Step 2 is fine. Score = 10", 1.0), ("The score is 7.5, because the step is clear.", 0.75),
    ("I would give it a 6.", 0.6), ("Grade: 3", 0.3),
    ("no idea", None), ("", None), (None, None), ("Score: 11", None), ("12/10", None), ("Score: -3", None),
    ("Steps 1 and 2 look right", None),  # two numbers and no keyword: ambiguous
])
def test_parse_critic_score(reply, expected):
    got = parse_critic_score(reply)
    assert got == (None if expected is None else pytest.approx(expected))


def test_vlm_critic_plumbing():
    """VLMCritic without weights: a stub processor/model checks the prompt cut and the score parse."""
    class Inputs(dict):
        def to(self, device):
            return self

    class Stub:
        def __init__(self, replies):
            self.replies = iter(replies)

        def apply_chat_template(self, chat, **kw):
            assert "Reference step: ref" in chat[0]["content"][0]["text"]
            return Inputs(input_ids=torch.tensor([[5, 6, 7]]))

        def generate(self, input_ids, **kw):
            return torch.tensor([[5, 6, 7, 1]])  # prompt then one new token

        def decode(self, ids, **kw):
            assert ids.tolist() == [1]  # only the reply is decoded
            return next(self.replies)

    critic = rewards.VLMCritic.__new__(rewards.VLMCritic)
    critic.processor = critic.model = Stub(["Score: 7/10", "no clue"])
    critic.device, critic.max_new_tokens = "cpu", 4
    assert critic.step_scores(["a", "b", "c"], ["ref", "ref"]) == pytest.approx([0.7, 0.0, 0.0])

# -----------------------------------------------------------------------------
# process rewards and the hybrid sum


def test_step_rewards_alignment():
    critic, fake = ToyTextCritic(data.parse), FakeScorer()
    segs = [("text", data.describe(S1)), ("image", IMG), ("text", " "), ("text", "the blue circle is at the top ."),
            ("image", None), ("image", IMG)]
    got = step_rewards(segs, [data.describe(S1), data.describe(S2)], critic, fake)
    # text: r_t; image: r_v vs the text right before it; 0 for a None image or no text before it;
    # None for the empty text segment, which is no step
    assert got == pytest.approx([1.0, 0.5, None, 0.5 * 2 / 3, 0.0, 0.0])
    assert fake.calls == [([IMG], [data.describe(S1)])]  # one call, only the scorable pair
    assert step_rewards([("image", IMG), ("text", data.describe(S1))], [data.describe(S1)], critic, fake) == [0.0, 1.0]
    assert step_rewards([("text", " "), ("image", IMG)], [data.describe(S1)], critic, fake) == [None, 0.0]
    assert len(fake.calls) == 1  # nothing scorable in the last two samples
    # t2i: the image is compared with the prompt's description
    assert step_rewards([("image", IMG)], [data.describe(S1)], critic, FakeScorer(), task="t2i") == [0.5]


def test_hybrid_reward_sum_and_switches():
    critic, fake = ToyTextCritic(data.parse), FakeScorer()
    refs = [data.describe(S1), data.describe(S2)]
    batch = [
        pairs(S1, S2),  # perfect layout and text
        pairs(S1),  # missing second step
        [("text", "the blue circle is at the top left ."), ("image", IMG), ("text", "banana"), ("image", IMG)],
        pairs(S1, S2, S3),  # an extra step earns nothing and breaks the format
    ]
    finished = [True, True, True, True]
    out = hybrid_reward(batch, finished, [refs] * 4, [2] * 4, critic, fake)
    assert out["format"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert out["text"].tolist() == pytest.approx([1.0, 0.5, (0.5 * 2 / 3 + 0) / 2, 1.0])
    assert out["visual"].tolist() == pytest.approx([0.5, 0.25, 0.5, 0.5])
    assert torch.allclose(out["reward"], out["format"] + out["text"] + out["visual"])
    assert len(fake.calls) == 1 and len(fake.calls[0][0]) == 2 + 1 + 2 + 2  # one batched CLIP call; not the extra image
    assert [len(s) for s in out["steps"]] == [len(b) for b in batch]
    assert out["steps"][2] == pytest.approx([0.5 * 2 / 3, 0.5, 0.0, 0.5])
    for flags, terms in [(dict(use_format=False), ("text", "visual")), (dict(use_text=False), ("format", "visual")),
                         (dict(use_visual=False), ("format", "text")),
                         (dict(use_format=False, use_text=False, use_visual=False), ())]:
        o = hybrid_reward(batch, finished, [refs] * 4, [2] * 4, critic, FakeScorer(), **flags)
        assert torch.allclose(o["reward"], sum((out[t] for t in terms), torch.zeros(4)))
        for t in ("format", "text", "visual"):  # still computed for logging
            assert torch.equal(o[t], out[t])
    unfinished = hybrid_reward(batch[:1], [False], [refs], [2], critic, FakeScorer())
    assert unfinished["format"].item() == 0.0 and unfinished["reward"].item() == pytest.approx(1.5)
    und = hybrid_reward([[("text", data.describe(S1))]], [True], [[data.describe(S1)]], [0], critic, FakeScorer())
    assert und["reward"].item() == 2.0 and und["visual"].item() == 0.0  # understanding: one text, no image

# -----------------------------------------------------------------------------
# r_v: the tiny CLIP


def corpus(n, seed):
    rng = random.Random(seed)
    scenes = [data.random_scene(rng) for _ in range(n)]
    return scenes, [data.render(s) for s in scenes], [data.describe(s) for s in scenes]


@pytest.fixture(scope="module")
def clip():
    tok = data.build_text_tokenizer()
    scenes, images, texts = corpus(1500, seed=0)
    scorer, stats = train_tiny_clip(images, texts, tok, steps=250, seed=0)
    return scorer, stats, tok, set(texts)


def held_out_scenes(n, seen, seed):
    """Scenes whose captions the CLIP never saw, each with hard negatives: same objects with one
    object moved to another free cell, or recoloured."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        s = data.random_scene(rng)
        if data.describe(s) in seen or data.describe(s) in {data.describe(o[0]) for o in out}:
            continue
        o, rest = s[0], s[1:]
        free = [c for c in range(9) if c not in {x.cell for x in s}]
        moved = data.make_scene(o._replace(cell=rng.choice(free)), *rest)
        recol = data.make_scene(o._replace(colour=rng.choice([c for c in data.COLOURS if c != o.colour])), *rest)
        out.append((s, moved, recol))
    return out


def test_tiny_clip_tokenize_puts_eot_last():
    tok = data.build_text_tokenizer()
    ids = rewards.make_toy_tokenize(tok, 32)([data.describe(S1), ""])
    words = tok(data.describe(S1), add_special_tokens=False)["input_ids"]
    assert ids[0, :len(words)].tolist() == words and ids[0, len(words)] == len(tok)
    assert ids[0, len(words) + 1:].eq(0).all() and ids[1, 0] == len(tok)
    assert ids.argmax(1).tolist() == [len(words), 0]  # where open_clip's argmax pooling reads


def test_tiny_clip_learns(clip):
    scorer, stats, tok, seen = clip
    assert stats["top1"] >= 0.5, stats  # among 64 held-out captions; chance 1/64
    assert stats["pos_mean"] > stats["neg_mean"] + 0.3
    cases = held_out_scenes(64, seen, seed=1)
    imgs = [data.render(c[0]) for c in cases]
    # retrieval among 16 held-out captions, 4 groups
    hits = []
    for g in range(4):
        group = cases[16 * g:16 * (g + 1)]
        caps = [data.describe(c[0]) for c in group]
        for i in range(16):
            hits.append(scorer.cosine([imgs[16 * g + i]] * 16, caps).argmax().item() == i)
    assert sum(hits) / len(hits) >= 0.5
    match = scorer.score(imgs, [data.describe(c[0]) for c in cases])
    mismatch = scorer.score(imgs, [data.describe(cases[(i + 1) % 64][0]) for i in range(64)])
    assert ((match >= 0) & (match <= 1)).all() and ((mismatch >= 0) & (mismatch <= 1)).all()
    assert match.mean() > mismatch.mean() + 0.5
    for k in (1, 2):  # hard negatives: same objects, one moved or recoloured
        hard = [data.describe(c[k]) for c in cases]
        assert match.mean() > scorer.score(imgs, hard).mean() + 0.1
        m, h = scorer.cosine(imgs, [data.describe(c[0]) for c in cases]), scorer.cosine(imgs, hard)
        assert (m > h).float().mean() >= 0.75


def test_clip_save_load_round_trip(clip, tmp_path):
    scorer, _, tok, _ = clip
    _, imgs, texts = corpus(8, seed=2)
    before = scorer.score(imgs, texts[::-1])
    save_clip(scorer, tmp_path / "clip")
    loaded = load_clip(tmp_path / "clip", tok)
    assert (loaded.pos_mean, loaded.neg_mean) == (scorer.pos_mean, scorer.neg_mean)
    assert torch.equal(loaded.score(imgs, texts[::-1]), before)
    assert loaded.score([], []).shape == (0,)
    bigger = data.build_text_tokenizer()
    bigger.add_tokens(["purple"])
    with pytest.raises(ValueError, match="vocabulary"):
        load_clip(tmp_path / "clip", bigger)


def test_train_tiny_clip_deterministic_and_checks_size():
    tok = data.build_text_tokenizer()
    _, imgs, texts = corpus(300, seed=3)
    a, _ = train_tiny_clip(imgs, texts, tok, steps=3, batch_size=32, seed=5)
    b, _ = train_tiny_clip(imgs, texts, tok, steps=3, batch_size=32, seed=5)
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(v, w), k
    with pytest.raises(ValueError, match="more pairs"):
        train_tiny_clip(imgs[:50], texts[:50], tok, steps=1)


def test_full_scale_slots_without_downloads():
    try:
        import ImageReward  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="image-reward"):
            rewards.ImageRewardScorer()
    # uncalibrated, ClipScorer is CLIPScore = 2.5 * max(cos, 0): a stub model with known cosines
    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def encode_image(self, x, normalize):
            return torch.tensor([[1.0, 0.0]]).expand(len(x), 2)

        def encode_text(self, t, normalize):
            return torch.stack([t, (1 - t ** 2).sqrt()], 1)  # cosine with the image = t

    s = ClipScorer(Stub(), lambda texts: torch.tensor([float(t) for t in texts]), lambda img: torch.zeros(1))
    got = s.score([IMG] * 4, ["-0.2", "0.1", "0.3", "0.9"])
    assert got.tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0])


def test_steps_beyond_the_asked_layout_earn_nothing():
    """A G=2 group of a 2-step story: one rollout well formed, the other the same plus an extra (text, image)
    pair. The extra image is not scored and earns 0, so its process advantage is negative (it broke the
    layout), not the positive one it would get from r_v alone."""
    from unigrpo import process_advantages

    class ByText(FakeScorer):  # r_v 0.8 for every pair it is asked about
        def score(self, images, texts):
            super().score(images, texts)
            return torch.full((len(images),), 0.8)
    critic, scorer = ToyTextCritic(data.parse), ByText()
    refs = [data.describe(S1), data.describe(S2)]
    good = pairs(S1, S2)
    extra = good + [("text", data.describe(S3)), ("image", data.render(S3))]
    steps = rewards.batch_step_rewards([good, extra], [refs, refs], critic, scorer, batch_n_steps=[2, 2])
    assert steps[0] == pytest.approx([1.0, 0.8, 1.0, 0.8])
    assert steps[1] == pytest.approx([1.0, 0.8, 1.0, 0.8, 0.0, 0.0])
    assert sum(len(images) for images, _ in scorer.calls) == 4  # the extra image was never scored
    nan = float("nan")
    sr = torch.tensor([steps[0] + [nan, nan], steps[1]])
    token_step = torch.arange(6).repeat(2, 1)  # one token per step
    adv = process_advantages(sr, token_step, 2)
    assert adv[1, 5] < 0 and adv[1, 4] < 0  # the extra pair is discouraged
    # without n_steps, the old rule: the extra image is scored like any other (what the fix prevents)
    old = rewards.batch_step_rewards([extra], [refs], critic, ByText())[0]
    assert old[5] == pytest.approx(0.8)
    out = rewards.hybrid_reward([good, extra], [True, True], [refs, refs], [2, 2], critic, ByText())
    assert out["steps"][1][4:] == [0.0, 0.0] and out["format"].tolist() == [1.0, 0.0]


def tiny_vlm_critic_folder(folder, pinned_reply=None):
    """A random-weight LLaVA (transformers' LlavaForConditionalGeneration: CLIP vision tower, Llama text model)
    with the toy word tokenizer and a one-line chat template, saved with its processor like a hub checkpoint.
    pinned_reply: a token the generation config favours, then EOS (random weights would say noise)."""
    from transformers import CLIPImageProcessor, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    tok = data.build_text_tokenizer()
    tok.add_tokens(["<image>"], special_tokens=True)
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tok), **ids),
                         vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16),
                         image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    bias = []
    if pinned_reply is not None:
        t = tok.convert_tokens_to_ids(pinned_reply)
        bias = [[[t], 100.0], [[t, tok.eos_token_id], 200.0]]  # the token first, then EOS right after it
    model.generation_config = GenerationConfig(**ids, sequence_bias=bias or None)
    model.save_pretrained(folder)
    template = ("{% for m in messages %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %} :{% endif %}")
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                   tokenizer=tok, patch_size=16, chat_template=template).save_pretrained(folder)
    return str(folder)


def test_vlm_critic_runs_a_real_model_from_a_folder(tmp_path):
    """rewards.VLMCritic end to end through AutoProcessor / AutoModelForImageTextToText: chat template, greedy
    generation, reply decoding, score parsing; with references and without; unreadable replies score 0."""
    critic = rewards.VLMCritic(tiny_vlm_critic_folder(tmp_path / "pinned", pinned_reply="7"))
    assert critic.step_scores(["the red circle is at the top .", "x", "beyond"], ["the red circle is at the top .", "y"]) \
        == pytest.approx([0.7, 0.7, 0.0])  # "7" on 0-10; a step beyond the references earns nothing
    assert critic.step_scores(["the red circle is at the top ."], []) == pytest.approx([0.7])  # graded alone
    noisy = rewards.VLMCritic(tiny_vlm_critic_folder(tmp_path / "random"), max_new_tokens=6)
    scores = noisy.step_scores(["a", "b"], ["c", "d"])
    assert all(0.0 <= x <= 1.0 for x in scores)  # random words: parsed when they hold one number, else 0


def test_openclip_scorer_with_a_real_architecture_and_random_weights():
    """rewards.load_openclip_scorer and unigrpo.build_scorers on open_clip's ViT-S-32 with random weights
    (pretrained none): its own preprocessing and BPE tokenizer, scores in [0, 1]; nothing downloads."""
    scorer = rewards.load_openclip_scorer("ViT-S-32", None)
    imgs = [data.render(S1), data.render(S2)]
    got = scorer.score(imgs, ["a red circle", "a blue square at the top"])
    assert got.shape == (2,) and ((got >= 0) & (got <= 1)).all()
    assert scorer.cosine(imgs, ["x", "y"]).abs().max() <= 1.0
    _, via_cli = unigrpo.build_scorers(unigrpo.get_config(["--visual_scorer=openclip:ViT-S-32"]), None, "cpu")
    assert type(via_cli.model).__name__ == "CLIP" and via_cli.score(imgs[:1], ["a"]).shape == (1,)


def test_missing_optional_packages_name_their_install(tiny, tmp_path):
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    tiny.janus.save_pretrained(tmp_path); tiny.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        unigrpo.load_model(str(tmp_path), "cpu", four_bit=True)
