"""Benchmark I/O: MMIE and InterleavedBench loaders, writers, the official MMIE reading rules,
aggregation, and the proxy aspects. All offline, on the fixtures of tests/make_fixtures.py."""
import json
import math
import os
import shutil

import pytest
import torch
from PIL import Image

import eval as E
import make_fixtures

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
MMIE_DIR, IB_DIR = os.path.join(FIX, "mmie"), os.path.join(FIX, "interleavedbench")


def pixels(x):
    with Image.open(x) if isinstance(x, str) else x.copy() as im:
        return im.convert("RGB").tobytes()


def solid(rgb):
    return Image.new("RGB", (16, 16), rgb)


def broken_copy(tmp_path, src_dir, name, edit):
    """The fixture folder copied into tmp_path with edit(records) applied to its JSON."""
    dst = tmp_path / os.path.basename(src_dir)
    shutil.copytree(src_dir, dst)
    with open(dst / name) as f:
        records = json.load(f)
    edit(records)
    with open(dst / name, "w") as f:
        json.dump(records, f)
    return str(dst)


def test_fixtures_are_fresh(tmp_path):
    """The committed fixtures are exactly what make_fixtures.py writes (it is deterministic)."""
    root = make_fixtures.main(str(tmp_path / "fx"))
    for sub in ("mmie", "interleavedbench", "realdata"):
        made = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(os.path.join(root, sub)) for f in fs)
        have = sorted(os.path.relpath(os.path.join(d, f), FIX) for d, _, fs in os.walk(os.path.join(FIX, sub)) for f in fs)
        assert made == have
        for rel in made:
            with open(os.path.join(root, rel), "rb") as a, open(os.path.join(FIX, rel), "rb") as b:
                assert a.read() == b.read(), rel

# --- MMIE loading


def test_load_mmie_conversation_layout():
    recs, skipped = E.load_mmie(MMIE_DIR)
    assert [r["id"] for r in recs] == ["SA-1001", "SA-1002", "PBL-2001", "PBL-2002", "MSR-3001", "MSR-3002"]
    assert [r["category"] for r in recs] == ["SA", "SA", "PBL", "PBL", "MSR", "MSR"]
    sa = recs[0]
    assert [k for k, _ in sa["question"]] == ["text", "image", "text", "image", "text"]
    assert sa["question"][0] == ("text", "A fox wakes up.")
    # images are paired with placeholders in order across turns: the gpt turn takes the third
    assert sa["question"][1][1] == os.path.join(MMIE_DIR, "images", "SA-1001_0.png")
    assert sa["question"][3][1] == os.path.join(MMIE_DIR, "images", "SA-1001_1.png")
    assert sa["answer"] == [("text", "The fox swims across."), ("image", os.path.join(MMIE_DIR, "images", "SA-1001_2.png")),
                            ("text", "It reaches home.")]
    assert sa["gt"] == "The fox swims across.\nIt reaches home." and sa["model"] == "gt"
    for r in recs:
        for kind, x in r["question"] + r["answer"]:
            if kind == "image":
                assert os.path.isabs(x) and os.path.isfile(x)
    assert sum(k == "image" for k, _ in recs[1]["question"]) == 5
    assert [k for k, _ in recs[2]["answer"]] == ["text", "image", "text", "image", "text"]  # "images" alias
    assert recs[4]["gt"] == "3 * 3 = 9. The answer is 9."
    # the system turn of PBL-2002 is reported, not silently dropped
    assert len(skipped) == 1 and "PBL-2002" in skipped[0] and "system" in skipped[0]
    # the file itself can be given too
    assert [r["id"] for r in E.load_mmie(os.path.join(MMIE_DIR, "data.json"))[0]] == [r["id"] for r in recs]


def test_load_mmie_scorer_layout():
    recs, skipped = E.load_mmie(os.path.join(MMIE_DIR, "scorer_layout.json"))
    assert [r["layout"] for r in recs] == ["scorer"] * 3
    sa, pbl, msr = recs
    # a segment with both text and image is read text first, as the official reader does
    assert sa["answer"] == [("text", "The fox swims across."), ("image", os.path.join(MMIE_DIR, "images", "SA-1001_2.png"))]
    assert sa["gt"] == "The fox swims across."  # model "gt" with a null gt text: the answer is the reference
    assert pbl["answer"] == [("text", "Fold the paper in half.")]  # a plain-string answer
    assert msr["gt"] == "9" and msr["question"][0] == ("image", os.path.join(MMIE_DIR, "images", "MSR-3001_0.png"))
    assert skipped == []


def _drop(key):
    return lambda rs: rs[2].pop(key)


MMIE_BROKEN = [
    ("missing id", _drop("id"), "missing id", "record 2 (no id)"),
    ("unknown category", lambda rs: rs[2].update(id="XYZ-9"), "unknown category", "XYZ-9"),
    ("missing image", lambda rs: rs[2]["images"].__setitem__(1, "images/nope.png"), "missing image file", "PBL-2001"),
    ("no human turn", lambda rs: rs[2].update(conversations=[rs[2]["conversations"][1]]), "no human turn", "PBL-2001"),
    ("count mismatch", lambda rs: rs[2]["images"].pop(), "placeholders", "PBL-2001"),
    ("unknown layout", lambda rs: rs[2].pop("conversations"), "unknown record layout", "PBL-2001"),
    ("duplicate id", lambda rs: rs[2].update(id="SA-1001"), "duplicate id", "SA-1001"),
    ("MSR without reference", lambda rs: rs[4]["conversations"].pop(), "MSR record without reference", "MSR-3001"),
]


@pytest.mark.parametrize("case, edit, what, who", MMIE_BROKEN, ids=[c[0] for c in MMIE_BROKEN])
def test_load_mmie_malformed(tmp_path, case, edit, what, who):
    d = broken_copy(tmp_path, MMIE_DIR, "data.json", edit)
    with pytest.raises(ValueError) as err:
        E.load_mmie(d)
    msg = str(err.value)
    assert what in msg and who in msg and "record " in msg, msg
    # non-strict: the bad record is skipped and reported, the others load
    recs, skipped = E.load_mmie(d, strict=False)
    assert len(recs) == 5 and any("record skipped" in s and what in s for s in skipped)


def test_load_mmie_bad_scorer_layout_and_top_level(tmp_path):
    bad = json.load(open(os.path.join(MMIE_DIR, "scorer_layout.json")))
    bad[1]["gt_answer"] = []
    (tmp_path / "a.json").write_text(json.dumps(bad))
    (tmp_path / "images").symlink_to(os.path.join(MMIE_DIR, "images"))
    with pytest.raises(ValueError, match=r"record 1 \(id 'PBL-2002'\).*gt_answer"):
        E.load_mmie(str(tmp_path / "a.json"))
    (tmp_path / "b.json").write_text(json.dumps({"SA-1": {}}))
    with pytest.raises(ValueError, match="expected a JSON list"):
        E.load_mmie(str(tmp_path / "b.json"))
    with pytest.raises(FileNotFoundError):
        E.load_mmie(str(tmp_path / "nowhere"))

# --- MMIE writing and the official reader's view


def test_write_mmie_outputs_official_layout_and_round_trip(tmp_path):
    recs, _ = E.load_mmie(MMIE_DIR)
    answers = [[("text", f"answer {i}"), ("image", solid((10 * i, 100, 200))), ("text", "end"), ("image", None)]
               for i in range(len(recs))]
    answers[3] = "just text"  # a plain string is one text segment
    out = str(tmp_path / "out")
    path = E.write_mmie_outputs(recs, answers, "unigrpo-test", out)
    assert path == os.path.join(out, "data.json")
    rows = json.load(open(path))
    assert len(rows) == len(recs)
    for row, rec in zip(rows, recs):
        assert list(row) == ["id", "question", "answer", "model", "gt_answer"]
        assert row["id"] == rec["id"] and row["model"] == "unigrpo-test"
        assert row["gt_answer"] == [{"text": rec["gt"] if rec["category"] == "MSR" else None, "image": None}]
        for seg in row["question"] + row["answer"]:
            assert set(seg) == {"text", "image"} and (seg["text"] is None) != (seg["image"] is None)
            if seg["image"] is not None:
                assert not os.path.isabs(seg["image"]) and seg["image"].startswith("images/")
                assert os.path.isfile(os.path.join(out, seg["image"]))
    assert rows[4]["gt_answer"][0]["text"] == "3 * 3 = 9. The answer is 9."
    assert rows[0]["answer"][1] == {"text": None, "image": "images/0_SA-1001_a0.png"}
    assert len(rows[0]["answer"]) == 3  # the None image is left out

    back, _ = E.load_mmie(out)  # the scorer-input branch reads our output back
    assert [r["layout"] for r in back] == ["scorer"] * len(recs)
    for rec, b, ans in zip(recs, back, answers):
        assert (b["id"], b["category"], b["model"]) == (rec["id"], rec["category"], "unigrpo-test")
        assert [k for k, _ in b["question"]] == [k for k, _ in rec["question"]]
        for (k, x), (_, y) in zip(rec["question"], b["question"]):
            assert (x == y) if k == "text" else (pixels(x) == pixels(y) and y.startswith(out))
        want = [s for s in E._answer_segments(ans) if s[1] is not None]
        assert [k for k, _ in b["answer"]] == [k for k, _ in want]
        for (k, x), (_, y) in zip(want, b["answer"]):
            assert (x == y) if k == "text" else pixels(x) == pixels(y)
        assert b["gt"] == (rec["gt"] if rec["category"] == "MSR" else None)


def test_mmie_scorer_view_cutoff_and_drop():
    rec = {"question": [{"text": "Q", "image": None}, {"text": None, "image": "q0.png"}, {"text": None, "image": "q1.png"}],
           "answer": [{"text": "a1", "image": None}, {"text": None, "image": "a0.png"}, {"text": "a2", "image": None},
                      {"text": None, "image": "a1.png"}]}
    q, a, imgs = E.mmie_scorer_view(rec)
    assert q == "Q\nImage-0: <image>\nImage-1: <image>\n"
    assert a == "a1\nImage-2: <image>\n"  # stops once 3 images were read: "a2" and a1.png never reach the judge
    assert imgs == ["q0.png", "q1.png", "a0.png"]
    assert not E.mmie_dropped(rec)  # 5 images in the record, but only 3 were read
    # question with 3 images: the first answer segment's text is still read, then the answer stops
    rec3 = {"question": [{"text": None, "image": f"q{k}.png"} for k in range(3)],
            "answer": [{"text": "t1", "image": "x.png"}, {"text": "t2", "image": None}]}
    assert E.mmie_scorer_view(rec3)[1] == "t1\n" and len(E.mmie_scorer_view(rec3)[2]) == 3
    # more than 4 images read (here: in the question) -> dropped; exactly 4 -> kept
    rec5 = {"question": [{"text": None, "image": f"q{k}.png"} for k in range(5)], "answer": "fine"}
    rec4 = {"question": [{"text": None, "image": f"q{k}.png"} for k in range(4)], "answer": "fine"}
    assert E.mmie_dropped(rec5) and not E.mmie_dropped(rec4)
    assert E.mmie_scorer_view(rec4)[1] == "fine\n"


def test_mmie_scorer_view_on_written_fixture(tmp_path):
    recs, _ = E.load_mmie(MMIE_DIR)
    out = str(tmp_path / "out")
    E.write_mmie_outputs(recs, [[("text", "x"), ("image", solid((1, 2, 3)))]] * len(recs), "m", out)
    rows = json.load(open(os.path.join(out, "data.json")))
    assert [E.mmie_dropped(r, out) for r in rows] == [False, True, False, False, False, False]  # SA-1002: 5 images
    q, a, imgs = E.mmie_scorer_view(rows[0], out)
    assert q == "A fox wakes up.\nImage-0: <image>\nIt sees a river.\nImage-1: <image>\nContinue the story with text and images.\n"
    assert a == "x\nImage-2: <image>\n" and all(os.path.isfile(p) for p in imgs)
    # a missing file is not counted (the official reader prints "not found" and goes on)
    os.remove(os.path.join(out, rows[0]["answer"][1]["image"]))
    assert E.mmie_scorer_view(rows[0], out)[1] == "x\n"
    # loaded records (tuple segments) give the same view as the written JSON
    assert E.mmie_scorer_view(recs[0])[0].count("<image>") == 2


@pytest.mark.parametrize("text, score", [
    ("### Feedback\nGood.\n### Score\n5", 5),
    ("### Score: 4.6", 5),
    ("### Score\n2.5", 2),                     # Python's round, as the official parser
    ("Score 1\n### Feedback\nok\n### Score\n**4**/6", 4),  # the first number after '### Score'
    ("### Score\n7", None),                    # out of 0..6
    ("### Score\n-1", None),
    ("### Feedback\nno score given, 5 stars", None),
    ("", None),
    (None, None),
])
def test_parse_mmie_score(text, score):
    assert E.parse_mmie_score(text) == score


def test_aggregate_mmie_weights_by_category_size():
    scores = {"SA-1": 6, "SA-2": 6, "SA-3": 6, "SA-4": 6, "PBL-1": "### Score\n0", "MSR-1": 3.0, "MSR-2": None,
              "MSR-3": "### Score\nnine", "MSR-4": 7}
    cats = {k: k.split("-")[0] for k in scores}
    agg = E.aggregate_mmie(scores, cats)
    assert agg["label"] == "proxy"
    assert agg["SA"] == {"n": 4, "mean": 6.0, "percent": 100.0}
    assert agg["PBL"]["mean"] == 0.0 and agg["MSR"]["mean"] == 3.0 and agg["MSR"]["n"] == 1
    assert agg["AVG"]["mean"] == pytest.approx(27 / 6) and agg["AVG"]["percent"] == pytest.approx(75.0)
    assert agg["AVG"]["mean"] != pytest.approx((6 + 0 + 3) / 3)  # not the mean of the three means
    assert agg["n_valid"] == 6 and agg["n_invalid"] == 3 and sorted(agg["invalid_ids"]) == ["MSR-2", "MSR-3", "MSR-4"]
    assert E.aggregate_mmie({"SA-1": 4}, {"SA-1": "SA"}, label="MMIE-Score")["PBL"] == {"n": 0, "mean": None, "percent": None}
    with pytest.raises(ValueError, match="category"):
        E.aggregate_mmie({"X-1": 3}, {"X-1": "X"})

# --- InterleavedBench


def test_load_interleavedbench():
    recs, skipped = E.load_interleavedbench(IB_DIR)
    assert len(recs) == 5 and skipped == []
    nxt, story, report, edit, comp = recs
    img = lambda name: os.path.join(IB_DIR, "images", name)
    assert nxt["prompt"] == [("text", "Goal: make tea. Step 1: boil water."), ("image", img("wikihow_0.png")),
                             ("text", "Step 2: add the tea bag."), ("image", img("wikihow_1.png")),
                             ("text", "Write the next step with text and an image.")]  # <BEGIN> removed
    assert (nxt["goal"], nxt["category"], nxt["dataset_id"]) == ("Make tea", ["Food and Entertaining"], "wikihow")
    assert [k for k, _ in story["prompt"]] == ["image"] * 3 + ["text"]
    assert report["prompt"] == [("text", "Write a short report on the water cycle with text and images.")]  # context-free
    assert comp["prompt"] == [("text", "Put the dog"), ("image", img("dog.png")), ("text", "on the sofa"),
                              ("image", img("sofa.png")), ("text", ".")]
    assert all(os.path.isfile(x) for r in recs for k, x in r["prompt"] if k == "image")
    assert [E.ib_text_aspects_scored(r["task_name"]) for r in recs] == [True, True, True, False, False]
    segs = E.load_segment_images(nxt["prompt"], image_size=8)
    assert segs[1][1].size == (8, 8) and segs[0] == nxt["prompt"][0]


IB_BROKEN = [
    ("count mismatch", lambda rs: rs[1]["image"].pop(), "placeholders", "storytelling_generation_0_12"),
    ("missing image", lambda rs: rs[1]["image"].__setitem__(0, "images/gone.png"), "missing image file", "storytelling_generation_0_12"),
    ("no human turn", lambda rs: rs[1]["conversations"].pop(0), "no human turn", "storytelling_generation_0_12"),
    ("missing id", lambda rs: rs[1].pop("id"), "missing id", "record 1 (no id)"),
    ("missing task", lambda rs: rs[1].pop("task_name"), "missing task_name", "storytelling_generation_0_12"),
]


@pytest.mark.parametrize("case, edit, what, who", IB_BROKEN, ids=[c[0] for c in IB_BROKEN])
def test_load_interleavedbench_malformed(tmp_path, case, edit, what, who):
    d = broken_copy(tmp_path, IB_DIR, "interleaved_bench.json", edit)
    with pytest.raises(ValueError) as err:
        E.load_interleavedbench(d)
    assert what in str(err.value) and who in str(err.value), str(err.value)


def test_write_interleavedbench_outputs_round_trip(tmp_path):
    recs, _ = E.load_interleavedbench(IB_DIR)
    answers = [[("text", f"step {i}"), ("image", solid((i, 2 * i, 3 * i))), ("image", solid((50, 60, 70 + i))),
                ("image", None)] for i in range(len(recs))]
    out = str(tmp_path / "ib")
    path = E.write_interleavedbench_outputs(recs, answers, out)
    rows = json.load(open(path))
    assert [list(r) for r in rows] == [["id", "task_name", "output"]] * len(recs)
    assert rows[0]["output"] == [{"text": "step 0", "image": None},
                                 {"text": None, "image": "images/wikihow_next_step_0_489157_0.png"},
                                 {"text": None, "image": "images/wikihow_next_step_0_489157_1.png"}]
    back = E.load_interleavedbench_outputs(out)
    for rec, b, ans in zip(recs, back, answers):
        assert (b["id"], b["task_name"]) == (rec["id"], rec["task_name"])
        want = [s for s in ans if s[1] is not None]
        assert [k for k, _ in b["output"]] == [k for k, _ in want]
        for (k, x), (_, y) in zip(want, b["output"]):
            assert (x == y) if k == "text" else pixels(x) == pixels(y)


def test_aggregate_interleavedbench_editing_exception():
    five = lambda *v: dict(zip(E.IB_ASPECTS, v))
    scores = {"a": five(5, 4, 3, 2, 1),        # AVG 3
              "b": five(1, 1, 1, 1, 1),        # AVG 1
              "e": five(0, 4, 4, 0, 4),        # editing: text aspects (the zeros) left out -> AVG 4, not 2.4
              "c": five(None, 2, 2, None, 2),  # composition: text aspects need not be given
              "x": five(3, 3, None, 3, 3)}     # a missing scored aspect: invalid
    tasks = {"a": "wikihow_next_step", "b": "report_generation", "e": "sequential_image_editing",
             "c": "multi_concept_composition", "x": "marketing_generation"}
    agg = E.aggregate_interleavedbench(scores, tasks)
    assert agg["label"] == "proxy" and agg["n_valid"] == 4 and agg["n_invalid"] == 1 and agg["invalid_ids"] == ["x"]
    assert agg["AVG"] == pytest.approx((3 + 1 + 4 + 2) / 4)
    assert agg["text_quality"] == pytest.approx(3.0)  # only a and b score it
    assert agg["text_image_coherence"] == pytest.approx(1.5)
    assert agg["perceptual_quality"] == pytest.approx((4 + 1 + 4 + 2) / 4)
    with pytest.raises(ValueError, match="outside 0..5"):
        E.aggregate_interleavedbench({"a": five(6, 1, 1, 1, 1)}, {"a": "report_generation"})


class WordScorer:
    """A stand-in visual scorer without a CLIP: 1 when the text says 'red', else 0."""

    def score(self, images, texts):
        return torch.tensor([1.0 if "red" in t else 0.0 for t in texts])


def test_proxy_aspects_rules():
    red, blue = solid((220, 40, 40)), solid((40, 70, 220))
    good = [("text", "a red one ."), ("image", red), ("text", "another red ."), ("image", red)]
    asp = E.proxy_aspects(good, "draw", WordScorer())
    assert set(asp) == set(E.IB_ASPECTS) and all(0 <= v <= 5 for v in asp.values())
    assert asp == {"text_quality": 5.0, "perceptual_quality": 5.0, "image_coherence": 5.0,
                   "text_image_coherence": 5.0, "helpfulness": 5.0}
    # wrong words, a truncated image, unlike images, no alternation
    bad = [("text", "a blue one ."), ("image", blue), ("image", red), ("image", None), ("text", "  ")]
    asp = E.proxy_aspects(bad, "a red prompt", WordScorer())
    assert asp["perceptual_quality"] == pytest.approx(5 * 2 / 3)
    # blue after text 'a blue one' -> 0; red after an image -> scored against the prompt -> 1; None -> 0
    assert asp["text_image_coherence"] == pytest.approx(5 * 1 / 3)
    assert asp["helpfulness"] == pytest.approx(5 * 1 / 3)  # 1 switch among 3 neighbouring pairs (blank text dropped)
    assert asp["image_coherence"] < 5.0
    assert E.proxy_aspects([("text", "only text .")], "p", WordScorer())["helpfulness"] == 0.0
    toy_ok = E.proxy_aspects(bad, "p", WordScorer(), text_ok=lambda t: "blue" not in t)["text_quality"]
    assert toy_ok == 0.0
    assert 0 <= E.proxy_mmie_score(asp) <= 6 and E.proxy_mmie_score(dict.fromkeys(E.IB_ASPECTS, 5.0)) == 6.0


def test_proxy_image_coherence_uses_clip_embeddings():
    import data
    import rewards
    torch.manual_seed(0)
    tok = data.build_text_tokenizer()
    scorer = rewards.build_toy_clip(rewards.toy_clip_config(tok), tok)  # untrained: enough for the maths
    a, b = data.render(data.make_scene(("red", "circle", 0))), data.render(data.make_scene(("blue", "square", 8)))
    same = E.proxy_aspects([("text", "the red circle is at the top left ."), ("image", a), ("image", a)], "p", scorer)
    assert same["image_coherence"] == pytest.approx(5.0, abs=1e-4)
    diff = E.proxy_aspects([("text", "the red circle is at the top left ."), ("image", a), ("image", b)], "p", scorer)
    x = torch.stack([scorer.preprocess(a), scorer.preprocess(b)])
    e = scorer.model.encode_image(x, normalize=True).detach()
    assert diff["image_coherence"] == pytest.approx(5 * float((e[0] @ e[1]).clamp(0, 1)), abs=1e-4)

# --- the command line: python eval.py --benchmark NAME --data_path DIR, and --ablations


def tiny_prepare(root, model):
    """OUT/prepare as unigrpo's `prepare` leaves it, from the tiny model's own (untrained) parts and
    untrained CLIPs: seconds instead of a minute of training, enough for the plumbing."""
    import rewards
    p = os.path.join(root, "prepare")
    model.tokenizer.save_pretrained(os.path.join(p, "tokenizer"))
    model.janus.model.vqmodel.save_pretrained(os.path.join(p, "vq"))
    for name in ("clip", "clip_weak"):
        rewards.save_clip(rewards.build_toy_clip(rewards.toy_clip_config(model.tokenizer), model.tokenizer), os.path.join(p, name))


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory, tiny):
    """An out_dir with a prepared world and the tiny model saved as its warm-up checkpoint."""
    import unigrpo
    out = str(tmp_path_factory.mktemp("bench_run"))
    tiny_prepare(out, tiny)
    unigrpo.save_checkpoint(tiny, os.path.join(out, "warmup"), {"iter": 1})
    return out


@pytest.fixture
def images_early(monkeypatch):
    """Checkpoints load with <begin_of_image> made likely, so that answers hold generated images too."""
    import unigrpo
    from conftest import bias_text_logits
    real = unigrpo.load_model

    def load(*a, **k):
        m = real(*a, **k)
        bias_text_logits(m, boi_id=3.0)
        return m
    monkeypatch.setattr(unigrpo, "load_model", load)


def test_benchmark_cli_mmie_end_to_end(tiny_out, images_early, capsys):
    import unigrpo
    res = E.main(["--benchmark", "mmie", "--data_path", MMIE_DIR, "--out_dir", tiny_out, "--max_new_tokens=120"])
    printed = capsys.readouterr().out
    folder = os.path.join(tiny_out, "bench", "mmie")
    recs, _ = E.load_mmie(MMIE_DIR)
    rows = json.load(open(os.path.join(folder, "data.json")))
    # exactly the official scorer's input: one JSON list, these keys, relative paths under images/
    assert [r["id"] for r in rows] == [r["id"] for r in recs]
    m = unigrpo.load_model(os.path.join(tiny_out, "warmup"), "cpu")
    size = m.vq_decode(torch.zeros(1, m.n_image_tokens, dtype=torch.long))[0].size  # what a generated image decodes to
    generated = 0
    for row, rec in zip(rows, recs):
        assert list(row) == ["id", "question", "answer", "model", "gt_answer"] and row["model"] == "unigrpo-warmup"
        assert row["gt_answer"] == [{"text": rec["gt"] if rec["category"] == "MSR" else None, "image": None}]
        for seg in row["question"] + row["answer"]:
            assert set(seg) == {"text", "image"} and (seg["text"] is None) != (seg["image"] is None)
            if seg["image"] is not None:
                assert seg["image"].startswith("images/") and os.path.isfile(os.path.join(folder, seg["image"]))
        # the question is the benchmark's, images copied pixel for pixel
        assert [(s["text"], s["image"] is None) for s in row["question"]] == [(x if k == "text" else None, k == "text")
                                                                              for k, x in rec["question"]]
        for s, (k, x) in zip(row["question"], rec["question"]):
            assert k == "text" or pixels(os.path.join(folder, s["image"])) == pixels(x)
        for s in row["answer"]:
            if s["image"] is not None:
                generated += 1
                with Image.open(os.path.join(folder, s["image"])) as im:
                    assert im.format == "PNG" and im.size == size
            else:  # the toy tokenizer writes its own words only (never <unk> or other specials)
                assert "<" not in s["text"]
    assert generated > 0
    back, _ = E.load_mmie(folder)  # re-reads through the scorer-input branch
    assert [b["layout"] for b in back] == ["scorer"] * len(recs)
    # the proxy: labelled, on what the judge reads, SA-1002 dropped by the >4-image rule
    agg = res["aggregate"]
    assert res["label"] == agg["label"] == "proxy" and agg["dropped_ids"] == ["SA-1002"]
    assert sorted(res["per_sample"]) == sorted(r["id"] for r in recs if r["id"] != "SA-1002")
    assert agg["n_valid"] == 5 and agg["AVG"]["mean"] == pytest.approx(sum(res["per_sample"].values()) / 5)
    assert json.load(open(os.path.join(tiny_out, "bench", "mmie_proxy.json")))["aggregate"]["AVG"] == agg["AVG"]
    assert 0 < res["unk_fraction"] < 1 and "<unk>" in printed
    assert "PROXY MMIE" in printed and "NOT MMIE-Score" in printed
    assert f"python main.py --model_path PATH_TO_MMIE-Eval --input_dir {folder} --input_name data.json" in printed


def test_benchmark_cli_interleavedbench_end_to_end(tiny_out, images_early, capsys):
    ckpt = os.path.join(tiny_out, "warmup")
    res = E.main(["--benchmark=interleavedbench", f"--data_path={IB_DIR}", f"--checkpoint={ckpt}", "--out_dir", tiny_out,
                  "--max_new_tokens=120"])
    printed = capsys.readouterr().out
    folder = os.path.join(tiny_out, "bench", "interleavedbench")
    recs, _ = E.load_interleavedbench(IB_DIR)
    rows = json.load(open(os.path.join(folder, "predictions.json")))
    assert [(r["id"], r["task_name"]) for r in rows] == [(r["id"], r["task_name"]) for r in recs]
    assert all(list(r) == ["id", "task_name", "output"] for r in rows)
    back = E.load_interleavedbench_outputs(folder)
    images = [x for b in back for k, x in b["output"] if k == "image"]
    assert images and all(os.path.isfile(x) for x in images)
    # the official rule: editing / composition drop their text aspects from every average
    per, agg = res["per_sample"], res["aggregate"]
    scored = [r["id"] for r in recs if E.ib_text_aspects_scored(r["task_name"])]
    assert len(scored) == 3 and agg["n_valid"] == 5 and agg["label"] == "proxy"
    assert agg["text_quality"] == pytest.approx(sum(per[i]["text_quality"] for i in scored) / 3)
    assert agg["AVG"] == pytest.approx(sum(
        sum(v for a, v in per[r["id"]].items() if E.ib_text_aspects_scored(r["task_name"]) or a not in E.IB_TEXT_ASPECTS)
        / (5 if E.ib_text_aspects_scored(r["task_name"]) else 3) for r in recs) / 5)
    assert "PROXY InterleavedBench" in printed and "predictions.json" in printed and ckpt in printed


def test_latest_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="--checkpoint"):
        E.latest_checkpoint(str(tmp_path))
    for stage in ("warmup", "grpo"):
        os.makedirs(tmp_path / stage)
        (tmp_path / stage / "config.json").write_text("{}")
        assert E.latest_checkpoint(str(tmp_path)) == str(tmp_path / stage)


def _missing_image(rs):
    rs[1]["image"][0] = "images/gone.png"


def _bad_json(tmp_path):
    d = tmp_path / "ib"
    d.mkdir()
    (d / "interleaved_bench.json").write_text('[{"id": "a",}]')
    return str(d)


@pytest.mark.parametrize("args, message", [
    (["--benchmark", "foo", "--data_path", MMIE_DIR], "unknown --benchmark 'foo'; choose one of mmie, interleavedbench"),
    (["--benchmark", "mmie"], "--benchmark mmie needs --data_path DIR"),
    (["--data_path", MMIE_DIR], "--data_path needs --benchmark"),
    (["--benchmark", "mmie", "--data_path", "NOWHERE"], "not found; pass the folder that holds data.json"),
    (["--benchmark", "interleavedbench", "--data_path", _bad_json], "invalid JSON"),
    (["--benchmark", "interleavedbench", "--data_path", lambda t: broken_copy(t, IB_DIR, "interleaved_bench.json", _missing_image)],
     "record 1 (id 'storytelling_generation_0_12'): missing image file 'images/gone.png'"),
    (["--ablations", "--rows", "warmup,nope"], "--rows takes a comma-separated subset of base, warmup"),
    (["--ablations", "--kl_beta=0"], "need --kl_beta > 0"),
])
def test_cli_errors_are_clear(tmp_path, args, message):
    args = [a(tmp_path) if callable(a) else str(tmp_path / a) if a == "NOWHERE" else a for a in args]
    with pytest.raises(SystemExit) as err:
        E.main(args + ["--out_dir", str(tmp_path)])
    assert message in str(err.value), str(err.value)
    if "missing image" in message:
        assert "--skip_bad" in str(err.value)  # and says how to get past it


def test_benchmark_cli_skip_bad_lists_the_record(tmp_path, tiny_out, capsys):
    d = broken_copy(tmp_path, IB_DIR, "interleaved_bench.json", _missing_image)
    res = E.main(["--benchmark", "interleavedbench", "--data_path", d, "--skip_bad", "--limit=2", "--out_dir", tiny_out,
                  "--max_new_tokens=20"])
    assert res["n_records"] == 2 and len(res["skipped"]) == 1 and "storytelling_generation_0_12" in res["skipped"][0]
    assert "record skipped" in capsys.readouterr().out
    assert [r["id"] for r in json.load(open(os.path.join(tiny_out, "bench", "interleavedbench", "predictions.json")))] == \
        ["wikihow_next_step_0_489157", "report_generation_0_7"]


def test_eval_uses_cpu_threads_as_unigrpo_does(tmp_path, monkeypatch):
    """--cpu_threads sets torch's threads before any work (here: before it finds no checkpoint); 0 leaves torch's
    default, one per core (eval.py forced 1 thread once, which also made the ablations train at 1)."""
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    for flag, want in (("--cpu_threads=3", [3]), ("--cpu_threads=0", [])):
        with pytest.raises(SystemExit, match="no checkpoint"):
            E.main([f"--out_dir={tmp_path}", flag])
        assert seen == want
        seen.clear()


def test_ablation_trend_and_table_rules():
    """Hand-made results: paired differences, spread, the verdicts, and the one table's rows and cells."""
    r = lambda v: dict.fromkeys(E.ABLATION_COLUMNS, v)
    res = {f"warmup/seed{k}": r(0.1) for k in range(3)}
    res.update({"rf/seed0": r(0.3), "rf/seed1": r(0.4), "rf/seed2": r(0.5)})        # up, clearly: agrees
    res.update({"rt/seed0": r(0.2), "rt/seed1": r(0.6), "rt/seed2": r(0.4)})        # vs rf: -0.1, +0.2, -0.1
    res.update({f"rv/seed{k}": r(0.5) for k in range(3)})
    res.update({f"full/seed{k}": r(0.0) for k in range(3)})                         # down from rv; the paper: up
    res.update({f"kl_g2/seed{k}": r(0.0) for k in range(3)})                        # vs full: no change at all
    seeds = range(3)
    # diffs 0.2, 0.3, 0.4: se 0.0577, t(0.975, df 2) = 4.303, so the 95% interval is 0.300 ± 0.248, p = 0.035
    assert E.ablation_trend(res, "rf", seeds).endswith("ours ↑ +0.300, 95% CI [+0.052, +0.548], p = 0.035 (3 seeds): agrees")
    assert "paper ↑ (MMIE +0.25, IB +0.08)" in E.ablation_trend(res, "rf", seeds)
    assert E.ablation_trend(res, "rt", seeds).endswith("within noise")
    assert E.ablation_trend(res, "full", seeds).endswith("disagrees")
    assert E.ablation_trend(res, "kl_g2", seeds).endswith("flat: not reproduced")
    assert E.ablation_trend(res, "warmup", seeds) == "vs base model, no warm-up, no GRPO: not run"
    assert E.ablation_trend(res, "base", seeds) == "reference row"
    assert E.ablation_trend({"rf/seed0": r(0.3), "warmup/seed0": r(0.1)}, "rf", [0]).endswith("agrees in sign (1 seed, no spread)")
    table = E.ablation_table(res, ["warmup", "rf", "nokl_g2"], seeds).splitlines()
    assert table[0] == ("| setting | paper MMIE | paper IB | " + " | ".join(E.ABLATION_COLUMNS)
                        + " | trend of oracle_step vs the paper |") and len(table) == 5
    rf = [c.strip() for c in table[3].strip("|").split("|")]
    assert rf[:4] == ["warm-up + GRPO, r_f only", "53.56", "2.05", "0.400 ± 0.100"]
    assert [c.strip() for c in table[4].strip("|").split("|")][:4] == ["no KL, G = 2", "53.04", "1.72", "–"]


def test_ablations_smoke_and_resume(tmp_path, tiny, monkeypatch, capsys):
    """Two rows, one seed, tiny budgets, through unigrpo's own CLI: the table has the right rows and
    columns with real numbers, and a rerun skips the finished rows."""
    import unigrpo
    out = str(tmp_path / "abl")
    tiny_prepare(out, tiny)
    calls, evals = [], []
    real_main, real_eval = unigrpo.main, E.evaluate_checkpoint
    monkeypatch.setattr(unigrpo, "main", lambda argv: calls.append(argv) or real_main(argv))
    monkeypatch.setattr(E, "evaluate_checkpoint", lambda *a, **k: evals.append(a[0]) or real_eval(*a, **k))
    args = ["--ablations", "--seeds=1", "--rows=warmup,rf", f"--out_dir={out}", "--warmup_iters=2", "--warmup_batch_size=4",
            "--n_understanding=10", "--grpo_iters=1", "--prompts_per_step=1", "--max_new_tokens=40", "--eval_prompts=3",
            "--storyboard_interval=1000"]
    E.main(args)
    first = capsys.readouterr().out
    root = os.path.join(out, "ablations")
    md = open(os.path.join(root, "ablations.md")).read()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 4 and md.count("| setting |") == 1  # one table: header, rule, two rows
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head == ["setting", "paper MMIE", "paper IB", *E.ABLATION_COLUMNS, "trend of oracle_step vs the paper"]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [c[:3] for c in cells] == [["warm-up only", "53.31", "1.97"], ["warm-up + GRPO, r_f only", "53.56", "2.05"]]
    for c in cells:
        vals = {k: float(x) for k, x in zip(E.ABLATION_COLUMNS, c[3:-1])}
        assert all(0 <= v <= (3 if k == "reward" else 1) for k, v in vals.items())  # the reward sums three terms
    assert cells[1][-1].startswith("vs warm-up only: paper ↑")
    saved = json.load(open(os.path.join(root, "ablations.json")))
    assert sorted(saved["results"]) == ["rf/seed0", "warmup/seed0"]
    for res in saved["results"].values():
        assert all(isinstance(res[c], float) and math.isfinite(res[c]) for c in E.ABLATION_COLUMNS)
    # the common prepared world, this seed's warm-up (trained once, then found finished), then the r_f-only row in
    # its own out_dir, through the CLI's flags, from that warm-up
    warm = os.path.join(root, "warmup", "seed0")
    assert [c[-2:] if c[-1].startswith("--seed=") else c[-1:] for c in calls[:3]] == [
        ["--stage=prepare"], ["--stage=warmup", "--seed=1337"], ["--stage=warmup", "--seed=1337"]] and len(calls) == 4
    assert f"--out_dir={warm}" in calls[1]
    rf = calls[3]
    assert f"--out_dir={os.path.join(root, 'rf', 'seed0')}" in rf and "--stage=grpo" in rf
    assert {"--use_text_reward=False", "--use_visual_reward=False", "--process_reward=False", "--group_size=4"} <= set(rf)
    assert os.path.realpath(os.path.join(root, "rf", "seed0", "warmup")) == os.path.realpath(os.path.join(warm, "warmup"))
    assert os.path.realpath(os.path.join(warm, "prepare")) == os.path.realpath(os.path.join(out, "prepare"))
    assert evals == [os.path.join(warm, "warmup"), os.path.join(root, "rf", "seed0", "grpo")]
    assert "[ablations 2/2] rf seed 0" in first
    # rerun: nothing is trained or evaluated again
    stamp = os.path.getmtime(os.path.join(root, "rf", "seed0", "grpo", "trainer_state.pt"))
    calls.clear()
    evals.clear()
    E.main(args)
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2
    assert evals == [] and [c[-1] for c in calls] == ["--stage=prepare"]
    assert os.path.getmtime(os.path.join(root, "rf", "seed0", "grpo", "trainer_state.pt")) == stamp
    assert json.load(open(os.path.join(root, "ablations.json")))["results"] == saved["results"]
    with pytest.raises(SystemExit, match="other settings.*--grpo_iters=1"):
        E.main(args + ["--grpo_iters=2"])
