"""Write the small benchmark fixtures that tests/test_benchmarks.py reads, in each benchmark's layout.

    python tests/make_fixtures.py [ROOT]     # default ROOT: tests/fixtures

Deterministic: the same bytes on every run (a test regenerates them and compares), so edit this
script, never the files. Images are 16x16 PNGs, each a distinct colour with a dark diagonal.
  ROOT/mmie/data.json            release-like conversation layout, 6 records (SA x2, PBL x2, MSR x2);
                                 SA-1002 has 5 question images (the official scorer drops it),
                                 PBL-2001 uses "images" (alias) and 3 images across both turns,
                                 PBL-2002 has a "system" turn the loader ignores and reports
  ROOT/mmie/scorer_layout.json   the official scorer's input layout ("model": "gt"), 3 records
  ROOT/interleavedbench/interleaved_bench.json   5 records: next step (with <BEGIN>), storytelling,
                                 a context-free report, sequential image editing, multi-concept composition
  ROOT/realdata/{warmup,rl,eval}.jsonl   unigrpo's own data files (format at the top of data.py), toy-world
                                 content so that the toy model and critic run on them: warm-up (interleaved,
                                 understanding, t2i), GRPO prompts and evaluation prompts (one with a context
                                 image, one without ref_texts), images rendered at 48 px (the loaders resize them to
                                 --image_size, 24 by default)
"""
import json
import os
import sys

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import data  # noqa: E402


def png(path, k):
    """A 16x16 image unique to k."""
    img = Image.new("RGB", (16, 16), ((37 * k + 60) % 256, (91 * k + 20) % 256, (53 * k + 140) % 256))
    for i in range(16):
        img.putpixel((i, (i + k) % 16), (10, 10, 10))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format="PNG")


def dump(obj, path):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def conv(human, gpt, system=None):
    turns = [{"from": "system", "value": system}] if system else []
    return turns + [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


MMIE = [
    {"id": "SA-1001", "image": ["images/SA-1001_0.png", "images/SA-1001_1.png", "images/SA-1001_2.png"],
     "conversations": conv("A fox wakes up. <image> It sees a river. <image> Continue the story with text and images.",
                           "The fox swims across. <image> It reaches home.")},
    {"id": "SA-1002", "image": [f"images/SA-1002_{k}.png" for k in range(5)],
     "conversations": conv("Five pictures: <image> <image> <image> <image> <image> Tell their story.",
                           "A long day at the farm.")},
    {"id": "PBL-2001", "images": ["images/PBL-2001_0.png", "images/PBL-2001_1.png", "images/PBL-2001_2.png"],
     "conversations": conv("How do I plant a tree? <image>",
                           "Dig a hole. <image> Put the tree in. <image> Water it.")},
    {"id": "PBL-2002", "image": ["images/PBL-2002_0.png"],
     "conversations": conv("How do I fold a paper plane? <image>", "Fold the paper in half.",
                           system="You are a helpful assistant.")},
    {"id": "MSR-3001", "image": ["images/MSR-3001_0.png"],
     "conversations": conv("<image> What is the area of the square? Its side is 3.", "3 * 3 = 9. The answer is 9.")},
    {"id": "MSR-3002", "image": ["images/MSR-3002_0.png", "images/MSR-3002_1.png"],
     "conversations": conv("<image> <image> Which shape has more sides?", "The hexagon: 6 sides against 4.")},
]

MMIE_SCORER = [
    {"id": "SA-1001", "question": [{"text": "A fox wakes up.", "image": None}, {"text": None, "image": "images/SA-1001_0.png"}],
     "answer": [{"text": "The fox swims across.", "image": "images/SA-1001_2.png"}],
     "model": "gt", "gt_answer": [{"text": None, "image": None}]},
    {"id": "PBL-2002", "question": [{"text": "How do I fold a paper plane?", "image": "images/PBL-2002_0.png"}],
     "answer": "Fold the paper in half.", "model": "gt", "gt_answer": [{"text": None, "image": None}]},
    {"id": "MSR-3001", "question": [{"text": None, "image": "images/MSR-3001_0.png"},
                                    {"text": "What is the area of the square? Its side is 3.", "image": None}],
     "answer": [{"text": "3 * 3 = 9. The answer is 9.", "image": None}],
     "model": "gt", "gt_answer": [{"text": "9", "image": None}]},
]

IB = [
    {"id": "wikihow_next_step_0_489157", "image": ["images/wikihow_0.png", "images/wikihow_1.png"],
     "task_name": "wikihow_next_step", "goal": "Make tea", "category": ["Food and Entertaining"], "dataset_id": "wikihow",
     "conversations": conv("<BEGIN> Goal: make tea. Step 1: boil water. <image> Step 2: add the tea bag. <image> "
                           "Write the next step with text and an image.", "Step 3: pour the water in.")},
    {"id": "storytelling_generation_0_12", "image": [f"images/story_{k}.png" for k in range(3)],
     "task_name": "storytelling_generation", "category": ["story"], "dataset_id": "vist",
     "conversations": conv("<image> <image> <image> Continue this story with text and images.", "")},
    {"id": "report_generation_0_7", "image": [], "task_name": "report_generation", "category": ["report"],
     "dataset_id": "none", "conversations": conv("Write a short report on the water cycle with text and images.", "")},
    {"id": "sequential_image_editing_0_3", "image": ["images/edit_0.png"], "task_name": "sequential_image_editing",
     "category": ["editing"], "dataset_id": "magicbrush",
     "conversations": conv("<image> First make the sky red. Then add a sun.", "")},
    {"id": "multi_concept_composition_0_2", "image": ["images/dog.png", "images/sofa.png"],
     "task_name": "multi_concept_composition", "category": ["composition"], "dataset_id": "custom",
     "conversations": conv("Put the dog <image> on the sofa <image>.", "")},
]


def _segments(segs, folder, stem):
    """Example segments -> JSONL segments, images written as PNGs next to the file."""
    out = []
    for j, (kind, x) in enumerate(segs):
        if kind == "text":
            out.append({"text": x})
        else:
            os.makedirs(os.path.join(folder, "images"), exist_ok=True)
            x.save(os.path.join(folder, "images", f"{stem}_{j}.png"), format="PNG")
            out.append({"image": f"images/{stem}_{j}.png"})
    return out


def realdata(folder):
    """unigrpo's data files, from toy-world examples of each split."""
    mk = lambda task, n, split: data.make_examples(task, n, split, seed=0, image_size=48)
    files = {"warmup": [e for t in ("story", "continuation", "understanding", "t2i") for e in mk(t, 2, "warmup")],
             "rl": [e for t in ("story", "howto", "continuation") for e in mk(t, 2, "rl")],
             "eval": [e for t in ("story", "howto", "continuation") for e in mk(t, 1, "eval")]}
    for name, examples in files.items():
        rows = []
        for i, e in enumerate(examples):
            row = {"id": f"{name}-{i}", "task": e.task, "prompt": _segments(e.prompt, folder, f"{name}{i}_p")}
            if name == "warmup":
                row["answer"] = _segments(e.answer, folder, f"{name}{i}_a")
            else:
                row["n_steps"] = e.n_steps
                if i != 1:  # one prompt without references: the critic grades its steps alone
                    row["ref_texts"] = e.ref_texts
            rows.append(json.dumps(row))
        with open(os.path.join(folder, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.write("\n".join(rows) + "\n")


def main(root=os.path.join(HERE, "fixtures")):
    k = 0
    for sub, records, name in (("mmie", MMIE, "data.json"), ("interleavedbench", IB, "interleaved_bench.json")):
        for r in records:
            for p in r.get("image", r.get("images", [])):
                png(os.path.join(root, sub, p), k)
                k += 1
        dump(records, os.path.join(root, sub, name))
    dump(MMIE_SCORER, os.path.join(root, "mmie", "scorer_layout.json"))
    realdata(os.path.join(root, "realdata"))
    return root


if __name__ == "__main__":
    print("fixtures written to", main(*sys.argv[1:2]))
