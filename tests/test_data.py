"""Tests for data.py: the toy world, its task families and splits, the tokenizers, the JSONL loader."""
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import ImageFilter

import data
from data import SHAPES, Obj, describe, make_scene, parse, parse_image, render

ONE = data.all_scenes(max_objects=1)
ALL = data.all_scenes()
TWO = ALL[len(ONE):]

# -----------------------------------------------------------------------------
# scenes and the grammar


def test_scene_counts():
    assert len(ONE) == 4 * 3 * 9 and len(TWO) == 36 * 12 * 12
    assert len(set(ALL)) == len(ALL)
    assert all(list(s) == sorted(s, key=lambda o: o.cell) for s in ALL)


def test_describe_format():
    s = make_scene(("blue", "square", 4), ("red", "circle", 0))
    assert describe(s) == "the red circle is at the top left and the blue square is at the center ."
    assert describe((Obj("green", "triangle", 8),)) == "the green triangle is at the bottom right ."


def test_describe_parse_round_trip():
    for s in ONE + TWO:  # every scene there is
        assert parse(describe(s)) == s
    assert parse("  the red circle   is at the top left .\n") == make_scene(("red", "circle", 0))
    # the objects may come in any order; parse returns the canonical (cell) order
    assert parse("the blue square is at the center and the red circle is at the top left .") == \
        make_scene(("red", "circle", 0), ("blue", "square", 4))


@pytest.mark.parametrize("text", [
    "", " ", ".",
    "the red circle is at the top left",  # no final " ."
    "the red circle is at the top left.",  # "." must be its own word
    "the purple circle is at the top left .",
    "the red star is at the top left .",
    "the red circle is at the middle .",
    "the red circle is at top left .",
    "a red circle is at the top left .",
    "the red circle circle is at the top left .",
    "the red circle is at the top left and .",
    "and the red circle is at the top left .",
    "the red circle is at the top and the blue square is at the top .",  # duplicate cell
    "the red circle is at the top and the blue square is at the left and the red square is at the right .",
    "the red circle is at the top . the blue square is at the left .",
])
def test_parse_rejects(text):
    assert parse(text) is None

# -----------------------------------------------------------------------------
# pixels


def test_render_basics():
    img = render(make_scene(("red", "circle", 4)))
    assert data.IMAGE_SIZE == 24 and img.mode == "RGB" and img.size == (24, 24)
    assert img.getpixel((0, 0)) == data.BACKGROUND and img.getpixel((12, 12)) == data.RGB["red"]
    # objects stay inside their cell with a margin: the cell border of the center cell is background
    assert all(img.getpixel((x, 8)) == data.BACKGROUND for x in range(24))
    # the three shapes differ clearly in the same cell and colour
    px = [np.asarray(render(make_scene(("blue", s, 0)))) for s in SHAPES]
    for i in range(3):
        for j in range(i + 1, 3):
            assert (px[i] != px[j]).any(-1).sum() >= 12  # at least 12 of the cell's 64 pixels tell them apart


@pytest.mark.parametrize("size", [24, 48, 32])
def test_parse_image_inverts_render(size):
    rng = random.Random(0)
    scenes = ONE + rng.sample(TWO, 1000 if size == 24 else 200) + [()]
    for s in scenes:
        assert parse_image(render(s, size)) == s


def test_parse_image_robust_to_blur_and_noise():
    gen = torch.Generator().manual_seed(0)
    for s in ONE + random.Random(1).sample(TWO, 50):
        blurred = render(s).filter(ImageFilter.GaussianBlur(1))
        noisy = data.to_image(data.to_tensor(blurred) + 0.15 * torch.randn(3, 24, 24, generator=gen))
        assert parse_image(noisy) == s


def test_tensor_round_trip():
    img = render(make_scene(("yellow", "triangle", 2), ("green", "circle", 6)))
    t = data.to_tensor(img)
    assert t.shape == (3, 24, 24) and t.dtype == torch.float32 and t.min() >= -1 and t.max() <= 1
    assert data.to_image(t).tobytes() == img.tobytes()
    assert data.to_image(torch.full((3, 4, 4), 5.0)).getpixel((0, 0)) == (255, 255, 255)  # clamps

# -----------------------------------------------------------------------------
# task families


def _check_answer(ex):
    """Answer = text, image per state; each text says its state and each image shows it."""
    assert len(ex.answer) == 2 * len(ex.states) == 2 * ex.n_steps
    assert ex.ref_texts == [describe(s) for s in ex.states]
    for i, s in enumerate(ex.states):
        (k1, text), (k2, img) = ex.answer[2 * i], ex.answer[2 * i + 1]
        assert (k1, k2) == ("text", "image")
        assert text == describe(s) and parse_image(img) == s


def test_move_wraps_around():
    assert data.move(0, "left") == 2 and data.move(0, "up") == 6
    assert data.move(8, "right") == 6 and data.move(8, "down") == 2
    assert data.move(4, "up") == 1 and data.move(4, "right") == 5


def test_story_by_hand():
    s0 = make_scene(("red", "circle", 0), ("blue", "square", 4))
    ex = data.build_story(s0, 0, "left", 3)
    assert ex.prompt == [("text", "story : the red circle is at the top left and the blue square is at the center . "
                                  "the red circle moves left . 3 steps .")]
    assert ex.states == [make_scene(("red", "circle", 2), ("blue", "square", 4)),
                         make_scene(("red", "circle", 1), ("blue", "square", 4)),
                         s0]  # three steps on a torus of width 3 come back to the start
    _check_answer(ex)
    assert data.story_states(s0, 0, "down", 2) is not None
    blocked = make_scene(("red", "circle", 0), ("blue", "square", 3))
    assert data.story_states(blocked, 0, "down", 2) is None  # would run into the blue square
    assert all(data.story_states(*p) is not None for p in data.all_params("story"))


def test_story_examples():
    for ex in data.make_examples("story", 60, "warmup", seed=0):
        assert ex.n_steps in (2, 3) and data.split_of(ex) == "warmup"
        _check_answer(ex)
        text = ex.prompt[0][1]  # "story : <s0> the red circle moves right . 3 steps ."
        s0 = parse(text.removeprefix("story : ").split(" . ")[0] + " .")
        words = text.split()
        mover, direction, n = (words[-8], words[-7]), words[-5], int(words[-3])
        assert n == ex.n_steps
        prev = s0
        for s in ex.states:  # exactly the mover moves one cell, the other object stays
            moved = [o for o in prev if o not in s]
            assert len(moved) == 1 and moved[0][:2] == mover
            (new,) = [o for o in s if o not in prev]
            assert new[:2] == mover and new.cell == data.move(moved[0].cell, direction)
            prev = s


def test_howto_order_colour_shape_position():
    s0 = make_scene(("red", "circle", 0))
    ex = data.build_howto(s0, "green", "square", 5)
    assert ex.prompt == [("text", "howto : the red circle is at the top left . make it a green square at the right . 3 steps .")]
    assert ex.states == [make_scene(("green", "circle", 0)), make_scene(("green", "square", 0)),
                         make_scene(("green", "square", 5))]
    _check_answer(ex)
    # an attribute that is already right is skipped
    assert data.howto_states(s0, "red", "square", 5) == [make_scene(("red", "square", 0)),
                                                         make_scene(("red", "square", 5))]


def test_howto_examples():
    steps = set()
    for ex in data.make_examples("howto", 60, "rl", seed=0):
        _check_answer(ex)
        steps.add(ex.n_steps)
        start, goal = ex.prompt[0][1].removeprefix("howto : ").split(" make it a ")
        goal, count = goal.split(" . ")
        assert count == f"{ex.n_steps} steps ."
        goal += " ."
        s = parse(start)
        colour, shape, *where = goal.split()[:-1]  # "green square at the right ."
        assert ex.states[-1] == make_scene((colour, shape, data.CELLS.index(" ".join(where[2:]))))
        for nxt in ex.states:  # one attribute at a time, colour before shape before cell
            (a,), (b,) = s, nxt
            changed = [i for i in range(3) if a[i] != b[i]]
            assert len(changed) == 1
            s = nxt
    assert steps == {2, 3}


def test_howto_change_order_over_all_prompts():
    for p in data.all_params("howto"):
        states = data.howto_states(*p)
        order = []
        prev = p[0][0]
        for (o,) in states:
            order += [i for i in range(3) if o[i] != prev[i]]
            prev = o
        assert order == sorted(order) and 2 <= len(order) <= 3


def test_continuation():
    ex = data.build_continuation(make_scene(("red", "circle", 3)), 0, "right", 2, 1)
    assert [k for k, _ in ex.prompt] == ["text", "text", "image", "text", "image", "text"]
    assert ex.prompt[0][1] == "continue : the red circle is at the left . the red circle moves right ."
    assert ex.prompt[1][1] == "the red circle is at the center ."
    assert ex.prompt[3][1] == "the red circle is at the right ."
    assert parse_image(ex.prompt[4][1]) == make_scene(("red", "circle", 5))
    assert ex.prompt[-1][1] == "1 more step ."
    assert ex.states == [make_scene(("red", "circle", 3))]  # wrapped around
    _check_answer(ex)
    for ex in data.make_examples("continuation", 40, "eval", seed=3):
        _check_answer(ex)
        given = [parse(v) for k, v in ex.prompt[1:-1] if k == "text"]
        assert len(given) in (1, 2) and ex.n_steps in (1, 2)
        assert ex.prompt[-1][1].startswith(f"{ex.n_steps} more step")
        # the given steps and the answer together are one story from the prompt's start
        words = ex.prompt[0][1].split()
        s0 = parse(ex.prompt[0][1].removeprefix("continue : ").split(" . ")[0] + " .")
        mover = [i for i, o in enumerate(s0) if o[:2] == (words[-5], words[-4])][0]
        assert given + ex.states == data.story_states(s0, mover, words[-2], len(given) + ex.n_steps)


def test_understanding_and_t2i():
    (u,) = data.make_examples("understanding", 1, "warmup", seed=0)
    assert u.prompt[0] == ("text", "describe :") and u.prompt[1][0] == "image"
    assert u.answer == [("text", describe(u.states[0]))] and u.ref_texts == [describe(u.states[0])]
    assert parse_image(u.prompt[1][1]) == u.states[0] and u.n_steps == 0
    (t,) = data.make_examples("t2i", 1, "warmup", seed=0)
    assert t.prompt == [("text", "draw : " + describe(t.states[0]))] and t.ref_texts == [describe(t.states[0])]
    assert len(t.answer) == 1 and t.answer[0][0] == "image" and parse_image(t.answer[0][1]) == t.states[0]
    assert t.n_steps == 1


def test_image_size_is_honoured():
    for task in data.TASKS:
        (ex,) = data.make_examples(task, 1, "warmup", seed=0, image_size=32)
        assert all(v.size == (32, 32) for k, v in ex.prompt + ex.answer if k == "image")

# -----------------------------------------------------------------------------
# splits and sampling


def _prompt_id(ex):
    """What a model sees of the prompt, images read back as the scene they show."""
    return ex.task + " ".join(v if k == "text" else describe(parse_image(v)) for k, v in ex.prompt)


def test_splits_never_share_a_prompt():
    for task in data.TASKS:
        seen = {}
        for split in data.SPLITS:
            exs = data.make_examples(task, 150, split, seed=0)
            assert all(data.split_of(ex) == split for ex in exs)
            seen[split] = {_prompt_id(ex) for ex in exs}
        assert not seen["warmup"] & seen["rl"] and not seen["warmup"] & seen["eval"] and not seen["rl"] & seen["eval"]
        # and over all prompts of the task (keys are what split_of hashes)
        keys = [{data._key(task, *p) for p in data._split_params(task, s)} for s in data.SPLITS]
        assert sum(map(len, keys)) == len(data.all_params(task))
        assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])


def _trajectory(task, p):
    """(start and every state, answer states) of an interleaved prompt's parameters."""
    if task == "howto":
        states = data.howto_states(*p)
    else:
        states = data.story_states(p[0], p[1], p[2], p[3] + (p[4] if task == "continuation" else 0))
    return (p[0], *states), tuple(states[p[3]:] if task == "continuation" else states)


def test_split_by_trajectory_no_eval_answer_seen_in_training():
    """A held-out trajectory (start and answer) is never a run of a training prompt's trajectory (a 2-step story
    is the start of a 3-step one, a continuation is a story from a later state), and no multi-step held-out
    story or continuation answer is a prefix of a training one. (Two how-tos from different starts may share
    an answer: red circle -> blue circle at 5 and blue square -> blue circle at 5; they are other questions.)"""
    runs, prefixes = set(), set()
    for task in data.INTERLEAVED:
        for split in ("warmup", "rl"):
            for p in data._split_params(task, split):
                full, answer = _trajectory(task, p)
                runs.update(full[i:j] for i in range(len(full)) for j in range(i + 2, len(full) + 1))
                if task != "howto":
                    prefixes.update(answer[:j] for j in range(2, len(answer) + 1))
    for task in data.INTERLEAVED:
        for p in data._split_params(task, "eval"):
            full, answer = _trajectory(task, p)
            assert full not in runs, (task, p)
            assert task == "howto" or answer not in prefixes, (task, p)
    # the old rule hashed each prompt, so a 2-step story and its 3-step extension split apart
    s0, m, d, n = next(p for p in data._split_params("story", "eval") if p[3] == 2 and data.story_states(*p[:3], 3))
    assert data.split_of(data.build_story(s0, m, d, 3)) == "eval"
    assert data.split_of(data.build_continuation(s0, m, d, 1, 1)) == "eval"


def test_split_fractions_and_stability():
    for task in data.TASKS:
        n = {s: len(data._split_params(task, s)) for s in data.SPLITS}
        total = sum(n.values())
        for split, share in zip(data.SPLITS, (0.7, 0.2, 0.1)):  # how-tos split in units of up to 35 prompts
            assert abs(n[split] / total - share) < (0.04 if task == "howto" else 0.03)
    # pinned: a change of the hash would silently move eval prompts into training
    assert {s: len(data._split_params("t2i", s)) for s in data.SPLITS} == {"warmup": 3710, "rl": 1061, "eval": 521}
    # real data (no key) is split by the prompt's content
    ex = data.Example("interleaved", [("text", "how to"), ("image", render(()))], [("text", "x")])
    assert data.split_of(ex) == data.split_of(data.Example("interleaved", list(ex.prompt), [("text", "y")]))


def test_make_examples_deterministic_and_without_replacement():
    a = [ex.key for ex in data.make_examples("story", 50, "rl", seed=1)]
    assert a == [ex.key for ex in data.make_examples("story", 50, "rl", seed=1)]
    assert a != [ex.key for ex in data.make_examples("story", 50, "rl", seed=2)]
    assert len(set(a)) == 50
    pool = len(data._split_params("understanding", "eval"))
    keys = [ex.key for ex in data.make_examples("understanding", pool + 20, "eval", seed=0)]
    assert len(set(keys[:pool])) == pool  # every prompt once before any repeats
    assert len(set(keys)) == pool
    with pytest.raises(ValueError):
        data.make_examples("story", 1, "test", seed=0)
    with pytest.raises(ValueError):
        data.make_examples("poem", 1, "rl", seed=0)


def test_warmup_mix_ratio():
    mix = data.warmup_mix(100, seed=0)
    count = {t: sum(ex.task == t for ex in mix) for t in data.TASKS}
    assert count == {"story": 10, "howto": 10, "continuation": 10, "understanding": 100, "t2i": 100}
    assert all(data.split_of(ex) == "warmup" for ex in mix)
    assert [ex.key for ex in mix] == [ex.key for ex in data.warmup_mix(100, seed=0)]
    assert len({ex.task for ex in mix[:40]}) >= 3  # shuffled, not grouped by task
    count = {t: sum(ex.task == t for ex in data.warmup_mix(20, seed=1, ratio=(1.0, 1.0, 0.5))) for t in data.TASKS}
    assert count == {"story": 7, "howto": 7, "continuation": 6, "understanding": 20, "t2i": 10}


def test_warmup_mix_stalled_steps_repeat_the_state_before():
    clean, noisy = data.warmup_mix(600, seed=2), data.warmup_mix(600, seed=2, stall=0.3)
    assert [(ex.key, ex.prompt[0][1]) for ex in clean] == [(ex.key, ex.prompt[0][1]) for ex in noisy]
    stalled = steps = 0
    for c, n in zip(clean, noisy):
        if c.task not in data.INTERLEAVED:  # understanding and text-to-image stay clean
            assert n.states == c.states and _texts(n) == _texts(c)
            continue
        for i, (truth, shown) in enumerate(zip(c.states, n.states)):
            steps += 1
            if shown != truth:  # a stalled step shows the true state before it, never anything else
                stalled += 1
                assert shown == (c.states[i - 1] if i else data.state_before(c.task, _params_of(c)))
        images = [x for k, x in n.answer if k == "image"]
        assert _texts(n) == n.ref_texts == [data.describe(s) for s in n.states]  # the answer shows what states say
        assert [data.parse_image(im) for im in images] == n.states
    assert steps > 300 and 0.22 < stalled / steps < 0.38  # binomial(>300, 0.3): 4 sd is about 0.1
    assert data.warmup_mix(600, seed=2, stall=0.3)[0].states == noisy[0].states  # deterministic


def _texts(example):
    return [x for k, x in example.answer if k == "text"]


def _params_of(example):
    """The parameter tuple an interleaved example was built from (its key, found among all prompts of its task)."""
    return next(p for p in data.all_params(example.task) if data._key(example.task, *p) == example.key)

# -----------------------------------------------------------------------------
# text tokenizer


def test_tokenizer_special_ids():
    tok = data.build_text_tokenizer()
    specials = ["<pad>", "<unk>", "<bos>", "<eos>", "<sep>",
                "<begin_of_image>", "<end_of_image>", "<image_placeholder>"]
    assert tok.convert_tokens_to_ids(specials) == list(range(8))
    assert set(specials) <= set(tok.all_special_tokens)
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.sep_token_id) == (0, 1, 2, 3, 4)
    # no <bos>/<eos> added: the model wrapper places them
    assert tok("the red circle .")["input_ids"] == tok.convert_tokens_to_ids(["the", "red", "circle", "."])
    assert tok("the pink circle .")["input_ids"][1] == tok.unk_token_id
    assert len(tok) == len(data.vocabulary()) < 100


def test_tokenizer_round_trip_and_save_load(tmp_path):
    tok = data.build_text_tokenizer()
    texts = [v for t in data.TASKS for ex in data.make_examples(t, 20, "warmup", seed=0)
             for k, v in ex.prompt + ex.answer if k == "text"]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids  # the closed vocabulary covers every toy text
        assert tok.decode([tok.bos_token_id, *ids, tok.convert_tokens_to_ids("<begin_of_image>"), tok.eos_token_id],
                          skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    for loaded in (PreTrainedTokenizerFast.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert [loaded(t)["input_ids"] for t in texts] == [tok(t)["input_ids"] for t in texts]
        assert loaded.get_vocab() == tok.get_vocab() and loaded.eos_token_id == 3

# -----------------------------------------------------------------------------
# VQ image tokenizer


def test_vq_config():
    cfg = data.make_vq_config()
    assert list(cfg.channel_multiplier) == [1, 1, 2, 2] and cfg.num_patches == 3
    assert cfg.num_embeddings == 16 and cfg.projection_dim == cfg.image_token_embed_dim == 128
    cfg = data.make_vq_config(image_size=48, patch_size=16, codebook_size=64, projection_dim=64)
    assert list(cfg.channel_multiplier) == [1, 1, 2, 2, 2] and cfg.num_patches == 3 and cfg.image_token_embed_dim == 64
    cfg = data.make_vq_config(image_size=24, patch_size=4, codebook_size=64)
    assert list(cfg.channel_multiplier) == [1, 1, 2] and cfg.num_patches == 6
    with pytest.raises(ValueError):
        data.make_vq_config(patch_size=12)


def test_latent_labels():
    scene = data.make_scene(data.Obj("red", "circle", 0), data.Obj("blue", "triangle", 4))
    img = render(scene)
    red_circle = 1 + data.COLOURS.index("red") * 3 + data.SHAPES.index("circle")
    blue_triangle = 1 + data.COLOURS.index("blue") * 3 + data.SHAPES.index("triangle")
    assert data.latent_labels([img], 3).tolist() == [[red_circle, 0, 0, 0, blue_triangle, 0, 0, 0, 0]]
    six = data.latent_labels([img], 6)[0].view(6, 6)  # 2x2 positions per cell, each its own place in the cell
    assert six[:2, :2].flatten().tolist() == [red_circle * 4 + q for q in range(4)]
    assert six[2:4, 2:4].flatten().tolist() == [blue_triangle * 4 + q for q in range(4)]
    with pytest.raises(ValueError, match="3x3"):
        data.latent_labels([img], 4)


@pytest.fixture(scope="module")
def trained_vq():
    images = data.vq_training_images(1500, seed=0)
    cfg = data.make_vq_config()
    vq, stats = data.train_vq(cfg, images, steps=300, progress=False, labels=data.latent_labels(images, cfg.num_patches))
    return vq, stats, {parse_image(im) for im in images}


def test_vq_hf_round_trip(trained_vq):
    vq, stats, train_scenes = trained_vq
    # stats are on held-out busy grids (up to 9 objects), harder than the world's 1-2 object scenes
    assert stats["cell_accuracy"] >= 0.9 and stats["pixel_mse"] < 0.04
    # held-out scenes of the world, decoded by HF's own encode/decode (which L2-normalises the codebook)
    rng = random.Random(123)
    held = [s for s in (data.random_scene(rng) for _ in range(300)) if s not in train_scenes][:120]
    assert len(held) == 120
    x = torch.stack([data.to_tensor(render(s)) for s in held])
    with torch.no_grad():
        tokens = vq.encode(x).image_tokens.view(len(held), -1)
        out = vq.decode(tokens)
    cells = [a == b for s, d in zip(held, out)
             for a, b in zip(data.cell_contents(s), data.cell_contents(parse_image(data.to_image(d))))]
    assert sum(cells) / len(cells) >= 0.97
    assert torch.nn.functional.mse_loss(out.clamp(-1, 1), x) < 0.03  # an all-background image scores ~0.06
    # the point of the labels: one code per cell content, whatever the neighbours (a plain VQ-VAE
    # spreads a content over several neighbour-dependent codes, which the policy cannot learn to draw)
    labels = data.latent_labels([render(s) for s in held], 3)
    code_of = {}
    for lab, code in zip(labels.flatten().tolist(), tokens.flatten().tolist()):
        code_of.setdefault(lab, set()).add(code)
    assert all(len(c) == 1 for c in code_of.values()) and len({*map(min, code_of.values())}) == len(code_of)


def test_vq_codebook_and_helpers(trained_vq):
    vq, _, _ = trained_vq
    w = vq.quantize.embedding.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(len(w)), atol=1e-5)
    images = [render(data.random_scene(random.Random(i))) for i in range(6)]
    tokens = data.vq_encode(vq, images)
    assert tokens.shape == (6, 9) and tokens.dtype == torch.long and 0 <= tokens.min() and tokens.max() < 16
    with torch.no_grad():  # the training-time cosine rule picks the same codes as HF's encode
        _, codes, _, _ = data._quantise(vq, torch.stack([data.to_tensor(im) for im in images]))
    assert torch.equal(codes.view(6, -1), tokens)
    decoded = data.vq_decode(vq, tokens)
    assert len(decoded) == 6 and all(im.size == (24, 24) and im.mode == "RGB" for im in decoded)
    assert sum(parse_image(d) == parse_image(im) for d, im in zip(decoded, images)) >= 5
    with pytest.raises(ValueError, match="codebook_size"):  # 52 labels of a 6x6 grid do not fit 16 codes
        data.train_vq(data.make_vq_config(patch_size=4), images, steps=1, progress=False, labels=data.latent_labels(images, 6))


def test_vq_training_images():
    images = data.vq_training_images(50, seed=0)
    counts = [len(parse_image(im)) for im in images]
    assert min(counts) >= 1 and max(counts) <= 9 and max(counts) > 4
    assert [im.tobytes() for im in images[:3]] == [im.tobytes() for im in data.vq_training_images(3, seed=0)]


# -----------------------------------------------------------------------------
# real data: JSONL


@pytest.fixture
def jsonl_dir(tmp_path):
    (tmp_path / "imgs").mkdir()
    render(make_scene(("red", "circle", 0))).save(tmp_path / "imgs" / "a.png")
    render(make_scene(("red", "circle", 1))).resize((64, 64)).save(tmp_path / "imgs" / "b.png")
    return tmp_path


def _write(folder, records):
    path = folder / "data.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


GOOD = {"task": "interleaved", "prompt": [{"text": "move it right ."}, {"image": "imgs/a.png"}],
        "answer": [{"text": "the red circle is at the top ."}, {"image": "imgs/b.png"}], "id": 7}


def test_load_jsonl(jsonl_dir):
    path = _write(jsonl_dir, [GOOD, "", {"task": "understanding", "prompt": [{"image": "imgs/a.png"}],
                                         "answer": [{"text": "a red circle ."}]}])
    a, b = data.load_jsonl(path)
    assert a.task == "interleaved" and [k for k, _ in a.prompt] == ["text", "image"] and a.n_steps == 1
    assert a.ref_texts == ["the red circle is at the top ."] and a.states == []
    assert a.answer[1][1].size == (64, 64) and a.answer[1][1].mode == "RGB"
    assert parse_image(a.prompt[1][1]) == make_scene(("red", "circle", 0))
    assert b.task == "understanding" and b.n_steps == 0
    (a, _) = data.load_jsonl(path, image_size=48)
    assert a.answer[1][1].size == (48, 48) and parse_image(a.answer[1][1]) == make_scene(("red", "circle", 1))


@pytest.mark.parametrize("bad, message", [
    ('{"task": "interleaved", "prompt": [}', "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"task": "t2i", "prompt": []}, 'missing key "answer"'),
    ({"prompt": [], "answer": [{"text": "x"}]}, 'missing key "task"'),
    ({"task": 3, "prompt": [], "answer": [{"text": "x"}]}, '"task" must be a non-empty string'),
    ({"task": "t2i", "prompt": "draw", "answer": [{"text": "x"}]}, '"prompt" must be a list'),
    ({"task": "t2i", "prompt": [], "answer": [{"video": "a.mp4"}]}, "unknown segment key 'video' in answer[0]"),
    ({"task": "t2i", "prompt": [{"text": "a", "image": "b"}], "answer": [{"text": "x"}]}, "exactly one key"),
    ({"task": "t2i", "prompt": [{"text": 5}], "answer": [{"text": "x"}]}, "prompt[0].text must be a string"),
    ({"task": "t2i", "prompt": [], "answer": [{"image": "imgs/missing.png"}]}, "image file not found"),
    ({"task": "t2i", "prompt": [], "answer": []}, "empty answer"),
])
def test_load_jsonl_errors_name_file_and_line(jsonl_dir, bad, message):
    path = _write(jsonl_dir, [GOOD, GOOD, bad])
    with pytest.raises(ValueError) as err:
        data.load_jsonl(path)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)


def test_load_jsonl_unreadable_image(jsonl_dir):
    (jsonl_dir / "imgs" / "broken.png").write_bytes(b"not a png")
    path = _write(jsonl_dir, [{"task": "t2i", "prompt": [], "answer": [{"image": "imgs/broken.png"}]}])
    with pytest.raises(ValueError, match=r"data.jsonl:1: cannot read image"):
        data.load_jsonl(path)


@pytest.mark.parametrize("bad, message", [
    ('{"task": "t2i", "prompt": [', "invalid JSON"),
    ({"task": "t2i", "prompt": []}, 'missing key "answer"'),
    ({"task": "t2i", "prompt": [{"text": 5}], "answer": [{"text": "x"}]}, "prompt[0].text must be a string"),
    ({"task": "t2i", "prompt": [], "answer": [{"image": "imgs/missing.png"}]}, "image file not found"),
    ({"task": "t2i", "prompt": [], "answer": [{"image": "imgs/broken.png"}]}, "cannot read image"),
])
def test_bad_warmup_data_line_stops_the_cli_before_any_stage(jsonl_dir, bad, message, capsys):
    """python unigrpo.py --warmup_data BAD: the file and line on stderr, status 2, before prepare runs."""
    import unigrpo
    (jsonl_dir / "imgs" / "broken.png").write_bytes(b"not a png")
    path = _write(jsonl_dir, [GOOD, GOOD, bad])
    with pytest.raises(SystemExit) as err:
        unigrpo.main([f"--warmup_data={path}", f"--out_dir={jsonl_dir / 'run'}", "--stage=warmup"])
    out = capsys.readouterr()
    assert err.value.code == 2 and out.err.startswith(f"error: --warmup_data: {path}:3: ") and message in out.err, out.err
    assert "Traceback" not in out.err and not (jsonl_dir / "run" / "prepare").exists()


PROMPT = {"task": "interleaved", "prompt": [{"text": "move it right ."}, {"image": "imgs/a.png"}], "n_steps": 2,
          "ref_texts": ["the red circle is at the top .", "the red circle is at the top right ."]}


def test_load_prompts(jsonl_dir):
    path = _write(jsonl_dir, [PROMPT, "", {"task": "t2i", "prompt": [{"text": "draw : a cat ."}], "n_steps": 1}])
    a, b = data.load_prompts(path)
    assert a.n_steps == 2 and a.ref_texts == PROMPT["ref_texts"] and a.answer == [] and a.prompt[1][1].mode == "RGB"
    assert b.task == "t2i" and b.n_steps == 1 and b.ref_texts == []
    assert data.load_prompts(path, check_only=True) == []
    ex = data.load_prompts(os.path.join(os.path.dirname(__file__), "fixtures", "realdata", "rl.jsonl"))
    assert len(ex) == 6 and any(k == "image" for e in ex for k, _ in e.prompt)  # the shipped example file


@pytest.mark.parametrize("bad, message", [
    ("[1]", "expected a JSON object"),
    ({"task": "x", "prompt": [{"text": "a"}]}, 'missing key "n_steps"'),
    ({**PROMPT, "n_steps": -1}, '"n_steps" must be a whole number >= 0'),
    ({**PROMPT, "n_steps": 1.5}, '"n_steps" must be a whole number'),
    ({**PROMPT, "ref_texts": "one ."}, '"ref_texts" must be a list of strings'),
    ({**PROMPT, "prompt": []}, "empty prompt"),
    ({**PROMPT, "prompt": [{"image": "imgs/nope.png"}]}, "image file not found"),
])
def test_load_prompts_errors_name_file_and_line(jsonl_dir, bad, message):
    path = _write(jsonl_dir, [PROMPT, bad])
    with pytest.raises(ValueError) as err:
        data.load_prompts(path, check_only=True)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)
