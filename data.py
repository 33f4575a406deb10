"""
The toy world, its tokenizers, and a loader for real data.

No pretrained weights can be downloaded here, and a learner wants results in minutes, so the
default run trains everything from scratch on a synthetic world whose ground truth is known
exactly. The world:

- A scene is one or two objects on a 3x3 grid. An object has a colour (red, green, blue, yellow),
  a shape (circle, square, triangle) and a cell (0..8, index = row*3 + col; names "top left" ...
  "bottom right"). Two objects never share a cell; a scene is kept sorted by cell.
- A tiny grammar says a scene in one sentence and can be parsed back exactly:
      "the red circle is at the top left and the blue square is at the center ."
  Words (and the final ".") are separated by single spaces, so the text tokenizer is word level.
- `render` draws a scene (24x24 by default, one 8x8 cell per grid square); `parse_image` is the
  oracle's eye: it reads a scene back from pixels by template matching, cell by cell.
- Task families mirror the paper's warm-up mix. Interleaved answers are text, image, text, image...
    story          "story : <scene> the red circle moves right . 3 steps ."  one object moves one cell
                   per step; the grid wraps around (a torus: leaving on the right re-enters on the
                   left), so every move is legal and the next state is always defined.
    howto          "howto : <scene> make it a green square at the right . 2 steps ."  one attribute
                   changes per step, always in the order colour, shape, position, skipping those
                   already right (so the step count follows from the scene; the prompt states it).
    continuation   a story whose first 1-2 steps are given in the prompt; predict the remaining 1-2.
    understanding  image in, description out.
    t2i            description in, image out.
- Every prompt has a stable split (warmup / rl / eval) from a hash of the trajectory its states lie
  on (`trajectory_key`), so no held-out answer is ever part of a training answer or prompt.

Imperfect demonstrations: in the warm-up mix a share of the interleaved answer steps (`stall`) repeats the
state before it, as automatically assembled interleaved data repeats frames (`stall_steps`). The prompts, the
other splits and the oracle never change.

Image tokenizer: a tiny Janus VQ-VAE (transformers' JanusVQVAE) trained here on rendered scenes.
With the defaults (24 px, 8 px patches) an image is 3x3 = 9 tokens, one per grid cell.

Real data (the full-scale warm-up) comes as JSONL, one JSON object per line:
    {"task": "interleaved",
     "prompt": [{"text": "how to make tea ."}, {"image": "imgs/0001_a.png"}],
     "answer": [{"text": "boil the water ."}, {"image": "imgs/0001_b.png"}, {"text": "..."}]}
- "task": a non-empty string ("interleaved", "understanding", "t2i", or any label you use).
- "prompt", "answer": lists of segments; a segment is an object with exactly one key, "text"
  (a string) or "image" (a path to an image file, relative to the JSONL file's folder).
  The prompt may be empty (unconditional); the answer may not.
- Other top-level keys (an "id", a "source") are allowed and ignored. Blank lines are skipped.

GRPO prompts (--rl_data) and evaluation prompts (--eval_data) are the same family without an answer:
    {"task": "interleaved", "prompt": [{"text": "how to make tea ?"}, {"image": "imgs/0001_a.png"}],
     "n_steps": 3, "ref_texts": ["boil the water .", "add the tea .", "pour ."]}
- "task", "prompt": as above ("t2i": the answer is n_steps images and no text; ref_texts are then what
  each image should show, scored against it by r_v).
- "n_steps": how many (text, image) steps the answer should have (0: one text answer, understanding);
  r_f checks the layout against it.
- "ref_texts" (optional): a reference text per step for the text critic (r_t); without it the critic
  grades each step on its own.
`load_jsonl` / `load_prompts` check every line and raise ValueError("<file>:<line>: <what is wrong and how to fix>").
"""

import base64
import hashlib
import io
import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

# -----------------------------------------------------------------------------
# scenes and the grammar

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top", "top right", "left", "center", "right",
         "bottom left", "bottom", "bottom right")  # cell index = row*3 + col


class Obj(NamedTuple):
    colour: str
    shape: str
    cell: int


# Scene = tuple[Obj, ...]: 1 or 2 objects in distinct cells, sorted by cell (the canonical order)

def make_scene(*objs) -> tuple:
    """Canonical scene from Obj or (colour, shape, cell) tuples."""
    return tuple(sorted((Obj(*o) for o in objs), key=lambda o: o.cell))


def describe(scene) -> str:
    """The one sentence that says a scene, objects in cell order."""
    parts = [f"the {o.colour} {o.shape} is at the {CELLS[o.cell]}" for o in sorted(scene, key=lambda o: o.cell)]
    return " and ".join(parts) + " ."


def parse(text: str):
    """Inverse of describe: the scene a sentence says, or None if it is not a scene sentence."""
    words = text.split()  # split() without arguments tolerates any run of whitespace
    if len(words) < 2 or words[-1] != ".":
        return None
    clauses = " ".join(words[:-1]).split(" and ")
    if len(clauses) > 2:
        return None
    objs = []
    for clause in clauses:
        w = clause.split(" ")
        if len(w) < 7 or w[0] != "the" or w[1] not in COLOURS or w[2] not in SHAPES or w[3:6] != ["is", "at", "the"]:
            return None
        where = " ".join(w[6:])
        if where not in CELLS:
            return None
        objs.append(Obj(w[1], w[2], CELLS.index(where)))
    if len({o.cell for o in objs}) != len(objs):  # two objects cannot share a cell
        return None
    return make_scene(*objs)


def all_scenes(max_objects: int = 2) -> list:
    """Every scene of 1 (108) or 1-2 (108 + 5184) objects, in a fixed order."""
    things = [(c, s) for c in COLOURS for s in SHAPES]
    scenes = [make_scene((c, s, i)) for i in range(9) for c, s in things]
    if max_objects >= 2:
        scenes += [make_scene((c1, s1, i), (c2, s2, j))
                   for i in range(9) for j in range(i + 1, 9) for c1, s1 in things for c2, s2 in things]
    return scenes


def random_scene(rng: random.Random, n_objects: int | None = None) -> tuple:
    """A random scene; 1 or 2 objects with equal chance unless n_objects is given."""
    cells = rng.sample(range(9), n_objects or rng.choice((1, 2)))
    return make_scene(*[(rng.choice(COLOURS), rng.choice(SHAPES), c) for c in cells])


def cell_contents(scene) -> list:
    """Per cell: None if empty, else (colour, shape). Used for per-cell accuracy."""
    grid = [None] * 9
    for o in scene:
        grid[o.cell] = (o.colour, o.shape)
    return grid

# -----------------------------------------------------------------------------
# pixels

IMAGE_SIZE, PATCH_SIZE = 24, 8  # the toy world's default: a 3x3 grid of 8 px cells, one VQ token per cell
BACKGROUND = (200, 200, 200)  # light grey, so that no palette colour is close to it
RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30)}


def _cell_box(cell: int, image_size: int):
    """Pixel box [x0, y0, x1, y1) of a cell; rounded edges so that any image_size works."""
    r, c = divmod(cell, 3)
    edge = [round(i * image_size / 3) for i in range(4)]
    return edge[c], edge[r], edge[c + 1], edge[r + 1]


def render(scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    """Draw a scene: each object filled inside its own cell with a small margin."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene:
        x0, y0, x1, y1 = _cell_box(o.cell, image_size)
        m = max(1, round((x1 - x0) * 0.15))  # margin keeps objects apart and inside their cell
        x0, y0, x1, y1 = x0 + m, y0 + m, x1 - m - 1, y1 - m - 1  # PIL boxes include the last pixel
        if o.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=RGB[o.colour])
        elif o.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=RGB[o.colour])
        else:  # triangle pointing up
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=RGB[o.colour])
    return img


@lru_cache(maxsize=8)
def _cell_templates(image_size: int):
    """For every cell: the 13 things it can hold (empty + 12 objects) and their pixels there."""
    things = [None] + [(c, s) for c in COLOURS for s in SHAPES]
    templates = []
    for cell in range(9):
        x0, y0, x1, y1 = _cell_box(cell, image_size)
        crops = [np.asarray(render(() if t is None else (Obj(*t, cell),), image_size), np.float32)[y0:y1, x0:x1]
                 for t in things]
        templates.append(np.stack(crops))  # [13, h, w, 3]
    return things, templates


def parse_image(img: Image.Image) -> tuple:
    """The oracle's eye: per cell, the nearest (pixel MSE) of the renders of all it could hold.

    Inverts render exactly; a blurred or slightly off-colour image still reads right because only
    the nearest of 13 very different templates matters. An image that is not a render may read as
    0 or more than 2 objects; such a scene simply will not equal any true scene.
    """
    if img.size[0] != img.size[1]:
        raise ValueError(f"parse_image expects a square image, got {img.size}")
    pixels = np.asarray(img.convert("RGB"), np.float32)
    things, templates = _cell_templates(img.size[0])
    objs = []
    for cell in range(9):
        x0, y0, x1, y1 = _cell_box(cell, img.size[0])
        mse = ((templates[cell] - pixels[y0:y1, x0:x1]) ** 2).mean(axis=(1, 2, 3))
        best = things[int(mse.argmin())]
        if best is not None:
            objs.append(Obj(*best, cell))
    return make_scene(*objs)


def oracle_step_scores(segments, states):
    """The oracle, per expected step: (text right, image shows its own text, step right: the text and the
    image both show the true scene), read by the grammar parser and parse_image. Missing steps score 0."""
    texts = [x for k, x in segments if k == "text"]
    images = [x for k, x in segments if k == "image"]
    out = []
    for i, truth in enumerate(states):
        said = parse(texts[i]) if i < len(texts) else None
        seen = parse_image(images[i]) if i < len(images) and images[i] is not None else None
        out.append((said == truth, seen is not None and seen == said, said == truth and seen == truth))
    return out


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL -> float [3, H, W] in [-1, 1], the range the VQ-VAE works in."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), np.float32)).permute(2, 0, 1) / 127.5 - 1


def to_image(t: torch.Tensor) -> Image.Image:
    """Inverse of to_tensor; clamps, since a decoder's output can overshoot [-1, 1]."""
    t = ((t.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(t.permute(1, 2, 0).numpy())

# -----------------------------------------------------------------------------
# task families: every prompt from a small parameter tuple, so all prompts can be enumerated

TASKS = ("story", "howto", "continuation", "understanding", "t2i")
INTERLEAVED = ("story", "howto", "continuation")
DIRECTIONS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
STORY_OBJECTS = 1  # objects in a story's or continuation's scene (at most 2)


# Segment = ("text", str) or ("image", PIL.Image): prompts and answers are lists of them

@dataclass
class Example:
    """One prompt and its reference answer, with the ground truth rewards and the oracle use."""
    task: str  # one of TASKS (or a free label for real data)
    prompt: list  # of segments: ("text", str) or ("image", PIL.Image)
    answer: list  # the target segments
    states: list = field(default_factory=list)  # true scene of each answer step (understanding/t2i: the scene)
    ref_texts: list = field(default_factory=list)  # the correct text of each answer step
    key: str = ""  # task + initial state + parameters: the prompt's identity ("" for real data)
    trajectory: str = ""  # the trajectory its states lie on: what split_of hashes (see trajectory_key)
    steps_asked: int | None = None  # a prompt file's "n_steps" (no answer to count them from)

    @property
    def n_steps(self) -> int:
        """How many (text, image) steps the answer should have: its image count. That is
        len(states) for interleaved tasks, 0 for understanding and 1 (the image) for t2i."""
        if self.steps_asked is not None:
            return self.steps_asked
        return sum(kind == "image" for kind, _ in self.answer)


def move(cell: int, direction: str) -> int:
    """One step on the torus: leaving the grid on one side re-enters it on the other."""
    r, c = divmod(cell, 3)
    dr, dc = DIRECTIONS[direction]
    return (r + dr) % 3 * 3 + (c + dc) % 3


def mover_path(cell: int, direction: str, n: int) -> list:
    """The cells one object visits in n moves."""
    path = []
    for _ in range(n):
        cell = move(cell, direction)
        path.append(cell)
    return path


def story_states(s0, mover: int, direction: str, n: int):
    """The n states after s0 when object `mover` moves n times; None if it would hit the other."""
    others = [o for i, o in enumerate(s0) if i != mover]
    path = mover_path(s0[mover].cell, direction, n)
    if any(o.cell in path for o in others):
        return None
    return [make_scene(*others, s0[mover]._replace(cell=c)) for c in path]


def howto_states(s0, colour: str, shape: str, cell: int) -> list:
    """One attribute per step in the fixed order colour, shape, position; unchanged ones skipped."""
    (o,) = s0
    states = []
    for attr, value in (("colour", colour), ("shape", shape), ("cell", cell)):
        if getattr(o, attr) != value:
            o = o._replace(**{attr: value})
            states.append((o,))
    return states


def _steps(states, image_size):
    """Interleaved answer segments: text, image, text, image..."""
    return [seg for s in states for seg in (("text", describe(s)), ("image", render(s, image_size)))]


def _mover_words(s0, mover):
    return f"the {s0[mover].colour} {s0[mover].shape} moves"


def build_story(s0, mover, direction, n, image_size=IMAGE_SIZE) -> Example:
    states = story_states(s0, mover, direction, n)
    text = f"story : {describe(s0)} {_mover_words(s0, mover)} {direction} . {n} steps ."
    return Example("story", [("text", text)], _steps(states, image_size), states,
                   [describe(s) for s in states], _key("story", s0, mover, direction, n),
                   trajectory_key("story", (s0, mover, direction, n)))


def build_howto(s0, colour, shape, cell, image_size=IMAGE_SIZE) -> Example:
    states = howto_states(s0, colour, shape, cell)
    n = len(states)  # said in the prompt, as stories say theirs: r_f checks the layout the prompt asks for
    text = f"howto : {describe(s0)} make it a {colour} {shape} at the {CELLS[cell]} . {n} steps ."
    return Example("howto", [("text", text)], _steps(states, image_size), states,
                   [describe(s) for s in states], _key("howto", s0, colour, shape, cell),
                   trajectory_key("howto", (s0, colour, shape, cell)))


def build_continuation(s0, mover, direction, k, k_more, image_size=IMAGE_SIZE) -> Example:
    states = story_states(s0, mover, direction, k + k_more)
    given, rest = states[:k], states[k:]
    prompt = [("text", f"continue : {describe(s0)} {_mover_words(s0, mover)} {direction} .")]
    prompt += _steps(given, image_size)
    prompt += [("text", f"{k_more} more {'step' if k_more == 1 else 'steps'} .")]
    return Example("continuation", prompt, _steps(rest, image_size), rest,
                   [describe(s) for s in rest], _key("continuation", s0, mover, direction, k, k_more),
                   trajectory_key("continuation", (s0, mover, direction, k, k_more)))


def build_understanding(s0, image_size=IMAGE_SIZE) -> Example:
    return Example("understanding", [("text", "describe :"), ("image", render(s0, image_size))],
                   [("text", describe(s0))], [s0], [describe(s0)], _key("understanding", s0),
                   trajectory_key("understanding", (s0,)))


def build_t2i(s0, image_size=IMAGE_SIZE) -> Example:
    return Example("t2i", [("text", "draw : " + describe(s0))], [("image", render(s0, image_size))],
                   [s0], [describe(s0)], _key("t2i", s0), trajectory_key("t2i", (s0,)))


BUILDERS = {"story": build_story, "howto": build_howto, "continuation": build_continuation,
            "understanding": build_understanding, "t2i": build_t2i}


def _movers(s0):
    """Objects that may move: a mover must be nameable, so not a twin of the other object."""
    if len(s0) == 2 and s0[0][:2] == s0[1][:2]:
        return []
    return range(len(s0))


def _stories(lengths):
    """(s0, mover, direction, n) of every story of n in lengths moves that never runs into the other object."""
    for s0 in all_scenes(STORY_OBJECTS):
        for m in _movers(s0):
            for d in DIRECTIONS:
                path = mover_path(s0[m].cell, d, max(lengths))
                yield from ((s0, m, d, n) for n in lengths if len(s0) == 1 or s0[1 - m].cell not in path[:n])


@lru_cache(maxsize=None)
def all_params(task: str) -> list:
    """Every parameter tuple (after the initial scene s0, which comes first) of a task's prompts."""
    if task in ("understanding", "t2i"):
        return [(s0,) for s0 in all_scenes()]
    if task == "howto":  # single object, 2 or 3 attributes to change
        return [(s0, c, s, i) for s0 in all_scenes(1) for c in COLOURS for s in SHAPES for i in range(9)
                if 2 <= len(howto_states(s0, c, s, i)) <= 3]
    if task == "story":
        return list(_stories((2, 3)))
    if task == "continuation":  # k given steps, then 1 or 2 more
        return [(s0, m, d, k, n - k) for s0, m, d, n in _stories((2, 3, 4)) for k in (1, 2) if 1 <= n - k <= 2]
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")

# -----------------------------------------------------------------------------
# splits

SPLITS = ("warmup", "rl", "eval")


def _key(task, s0, *params) -> str:
    return "|".join([task, describe(s0), *map(str, params)])


def _split_of_key(key: str) -> str:
    # hashlib, not hash(): Python salts str hashes per process, and splits must never move
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100
    return "warmup" if h < 70 else "rl" if h < 90 else "eval"


def trajectory_key(task, params) -> str:
    """The unit of the split: every prompt whose states lie on one trajectory gets one split, so no held-out
    answer is a prefix or a part of a training answer or prompt. Stories and continuations: the cycle the
    mover travels on the torus (the other object, the mover, the direction, its row or column): a 2-step
    story is the start of a 3-step one, and a continuation's answer is a story from a later state.
    How-tos: prompts whose state sequences contain one another (_howto_components). Others: the prompt."""
    if task in ("story", "continuation"):
        s0, mover, direction = params[:3]
        o = s0[mover]
        others = [x for i, x in enumerate(s0) if i != mover]
        line = o.cell // 3 if direction in ("left", "right") else o.cell % 3
        return "|".join(["move", describe(others) if others else "-", o.colour, o.shape, direction, str(line)])
    if task == "howto":
        return "howto|" + _howto_components()[tuple(params)]
    return _key(task, *params)


@lru_cache(maxsize=None)
def _howto_components() -> dict:
    """Union-find over how-to prompts: two are joined when one's states (start included) are a run of the
    other's, e.g. red circle -> green circle -> green square is the start of one more step."""
    params = all_params("howto")
    states = {p: (p[0], *howto_states(*p)) for p in params}
    parent = {p: p for p in params}

    def root(p):
        while parent[p] != p:
            parent[p] = p = parent[parent[p]]
        return p
    by_states = {}
    for p, s in states.items():
        by_states.setdefault(s, []).append(p)
    for p, s in states.items():
        for i in range(len(s)):
            for j in range(i + 2, len(s) + 1):
                for q in by_states.get(s[i:j], ()):
                    parent[root(p)] = root(q)
    return {p: _key("howto", *root(p)) for p in params}


def split_of(example: Example) -> str:
    """'warmup' (~70%), 'rl' (~20%) or 'eval' (~10%), fixed by the example's trajectory."""
    if example.trajectory:
        return _split_of_key(example.trajectory)
    # real data has no parameters: hash the prompt's content itself
    h = hashlib.sha256(example.task.encode())
    for kind, value in example.prompt:
        h.update(value.encode() if kind == "text" else value.tobytes())
    return _split_of_key(h.hexdigest())


@lru_cache(maxsize=None)
def _split_params(task: str, split: str) -> list:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return [p for p in all_params(task) if _split_of_key(trajectory_key(task, p)) == split]


def sample_params(task: str, n: int, split: str, seed: int) -> list:
    """n parameter tuples of one task from one split. Sampled without replacement; only when the split
    has fewer than n prompts does a new pass over them start (so prompts then repeat)."""
    pool, rng, chosen = _split_params(task, split), random.Random(seed), []
    if not pool and n > 0:
        raise ValueError(f"no {task} prompts in split {split!r}")
    while len(chosen) < n:
        chosen += rng.sample(pool, min(n - len(chosen), len(pool)))
    return chosen


def make_examples(task: str, n: int, split: str, seed: int, image_size: int = IMAGE_SIZE) -> list:
    """n examples of one task from one split (see sample_params)."""
    return [BUILDERS[task](*p, image_size=image_size) for p in sample_params(task, n, split, seed)]


def state_before(task: str, params):
    """The state an interleaved answer starts from: the prompt's scene, or a continuation's last given step."""
    if task == "continuation":
        s0, mover, direction, k, _ = params
        return story_states(s0, mover, direction, k)[-1]
    return params[0]


def stall_steps(example: Example, before, p: float, rng: random.Random, image_size: int = IMAGE_SIZE) -> Example:
    """An imperfect demonstration: each answer step, with probability p, repeats the state before it (the
    sentence and picture of the previous step, or of the prompt's scene) instead of showing the change.
    `states` and `ref_texts` follow what the demonstration shows."""
    shown = [prev if rng.random() < p else s for prev, s in zip([before, *example.states[:-1]], example.states)]
    return replace(example, answer=_steps(shown, image_size), states=shown, ref_texts=[describe(s) for s in shown])


def warmup_mix(n_understanding: int, seed: int, ratio=(0.3, 1.0, 1.0), image_size: int = IMAGE_SIZE,
               stall: float = 0.0) -> list:
    """The warm-up set at the paper's ratio interleaved : understanding : t2i (0.3M : 1M : 1M).
    Interleaved data is deliberately scarce, as in the paper: GRPO must add what it lacks.
    The interleaved share is split in equal thirds over story, howto and continuation.
    stall: the share of interleaved answer steps that repeat the state before them (stall_steps), as scraped
    interleaved data has near-duplicate frames; understanding and text-to-image stay clean."""
    n_inter = round(n_understanding * ratio[0] / ratio[1])
    n_t2i = round(n_understanding * ratio[2] / ratio[1])
    counts = {t: n_inter // 3 + (i < n_inter % 3) for i, t in enumerate(INTERLEAVED)}
    counts.update(understanding=n_understanding, t2i=n_t2i)
    noise, examples = random.Random(f"stall|{seed}"), []
    for i, (task, n) in enumerate(counts.items()):
        for params in sample_params(task, n, "warmup", seed * len(TASKS) + i):
            ex = BUILDERS[task](*params, image_size=image_size)
            if stall > 0 and task in INTERLEAVED:
                ex = stall_steps(ex, state_before(task, params), stall, noise, image_size)
            examples.append(ex)
    random.Random(seed).shuffle(examples)
    return examples

# -----------------------------------------------------------------------------
# text tokenizer: word level over the closed vocabulary of the toy world

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", "<sep>",
                  "<begin_of_image>", "<end_of_image>", "<image_placeholder>")  # ids 0..7, in this order
TASK_WORDS = ("story", "howto", "continue", "describe", "draw", "make", "it", "a", "moves",
              "up", "down", "steps", "step", "more", ":", ",")
DIGITS = tuple(str(i) for i in range(1, 10))


def vocabulary() -> list:
    """All words, specials first; dict.fromkeys dedups ('left' is a cell word and a direction)."""
    grammar = ["the", "is", "at", "and", "."] + list(COLOURS) + list(SHAPES) + [w for c in CELLS for w in c.split()]
    return list(dict.fromkeys([*SPECIAL_TOKENS, *grammar, *TASK_WORDS, *DIGITS]))


def build_text_tokenizer():
    """A transformers fast tokenizer (saves/loads like any HF tokenizer) over our word vocabulary.
    No post-processor: the model wrapper adds <bos>/<eos> where it wants them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # without a decoder, tokenizers joins tokens with single spaces: exactly our sentence format
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>", sep_token="<sep>",
                                   extra_special_tokens=list(SPECIAL_TOKENS[5:]))

# -----------------------------------------------------------------------------
# image tokenizer: a tiny Janus VQ-VAE trained on rendered scenes

def make_vq_config(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, codebook_size=16, projection_dim=128):
    """Janus VQ-VAE config: one token per patch_size x patch_size patch. The encoder halves the
    resolution at each level but the last, so log2(patch_size) + 1 levels give that patch size.
    projection_dim must equal the text hidden size (the aligner maps codes into the LM).

    Why one patch per scene cell (a 3x3 grid) and 16 codes: a cell holds one of 13 things, and with
    latent labels (train_vq) each gets one code, so an image is 9 tokens the policy can learn to draw.
    Four tokens per cell (a 6x6 grid, 52 codes) reconstruct a little better but make every image 4x
    longer to sample and to learn. Why 24 px: the VQ trains ~6x faster than at 48 px and still reads
    back every cell of the world's scenes (README, "Results")."""
    from transformers import JanusVQVAEConfig

    levels = int(math.log2(patch_size)) + 1
    if 2 ** (levels - 1) != patch_size or image_size % patch_size:
        raise ValueError(f"patch_size must be a power of 2 dividing image_size, got {patch_size}, {image_size}")
    return JanusVQVAEConfig(embed_dim=8, num_embeddings=codebook_size, base_channels=32, latent_channels=64,
                            num_res_blocks=1, channel_multiplier=[1, 1] + [2] * (levels - 2),
                            num_patches=image_size // patch_size, projection_dim=projection_dim,
                            image_token_embed_dim=projection_dim, num_hidden_layers=2)


def vq_training_images(n: int, seed: int = 0, image_size: int = IMAGE_SIZE) -> list:
    """Renders of busy grids (1 to 9 objects, uniformly): not scenes of the world (those have 1-2
    objects), but every image then teaches the tokenizer several objects instead of mostly
    background, which roughly halves the steps it needs."""
    rng = random.Random(seed)
    grids = [[(rng.choice(COLOURS), rng.choice(SHAPES), c) for c in rng.sample(range(9), rng.randint(1, 9))]
             for _ in range(n)]
    return [render(make_scene(*g), image_size) for g in grids]


def _quantise(vq, pixels):
    """Encoder -> cosine-nearest code -> straight-through. Returns z, codes, e, z_q (channels last).

    HF's decode feeds L2-normalised codebook rows to the decoder, so train exactly that; HF's
    encode takes argmin |h - e|^2 over raw rows, which for unit rows is argmax <h, e>: the same code
    as our cosine rule as long as the rows stay unit norm (train_vq renormalises after each step)."""
    h = vq.quant_conv(vq.encoder(pixels))  # [B, D, n, n]
    z = F.normalize(h, dim=1).permute(0, 2, 3, 1)  # [B, n, n, D]
    codebook = F.normalize(vq.quantize.embedding.weight, dim=1)
    codes = (z @ codebook.T).argmax(-1)  # [B, n, n]
    e = codebook[codes]
    z_q = z + (e - z).detach()  # straight-through: decoder gradients flow on into the encoder
    return z, codes, e, z_q


def _decode_latents(vq, z_q):
    return vq.decoder(vq.post_quant_conv(z_q.permute(0, 3, 1, 2)))


def fan_in_init(*modules):
    """PyTorch's fan-in default init for every Conv2d and Linear in `modules` (returns the first). HF draws them
    from N(0, 0.02), a placeholder a checkpoint overwrites: trained from scratch, each such layer scales its
    input (and its gradient) by ~0.02 * sqrt(fan_in), and these small nets learn far slower."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.reset_parameters()
    return modules[0]


def train_vq(config, images: list, steps: int = 200, batch_size: int = 8, lr: float = 3e-3, seed: int = 0,
             progress: bool = True, labels: torch.Tensor | None = None):
    """Train a JanusVQVAE on images so that HF's own decode(encode(x)) reconstructs x.

    Loss = pixel MSE + codebook loss + 0.25 * commitment (VQ-VAE), all on unit vectors, plus deep
    supervision: throw-away 1x1 heads predict the image at each lower decoder resolution from that
    level's features, a direct signal that shortens the decoder's long initial plateau. Dead codes
    are re-seeded from encoder outputs (without labels). Small batches and many steps beat large batches here: the
    cost is per image, and the plateau is measured in steps.

    `labels` [N, grid*grid] (see latent_labels): what each latent position shows. The toy world knows
    it, so a cross-entropy term asks each position for the code reserved for its label. Why: a plain
    VQ-VAE here spreads one cell content over ~6 codes that also encode the neighbours (measured
    H(code | position, content) = 2.5 nats at 256 codes), and a tiny policy cannot learn in minutes
    to draw from such codes (its image loss stalled near 3 nats; t2i accuracy 0). With labels
    H = 0: one code per content, and the policy's image tokens are learnable.
    A random 10% (at most 64) of the images is held out for stats (see vq_stats).
    Measured (defaults: 24 px, 3x3 grid, labels, 400 steps, 1500 vq_training_images): 99.7% of held-out cells
    and 98.4% of held-out busy grids read back right, every cell of 300 world scenes; 300 steps: 98.8% (README).
    """
    from transformers import JanusVQVAE

    torch.manual_seed(seed)
    t0 = time.time()
    vq = fan_in_init(JanusVQVAE(config).train())
    pixels = torch.stack([to_tensor(im) for im in images])
    order = random.Random(seed).sample(range(len(pixels)), len(pixels))
    n_held = min(64, len(pixels) // 10)
    held, train = pixels[order[:n_held]], pixels[order[n_held:]]
    if labels is not None:
        if int(labels.max()) >= config.num_embeddings:
            raise ValueError(f"{int(labels.max()) + 1} latent labels need at least that many codes, not "
                             f"{config.num_embeddings}: raise --codebook_size")
        labels = labels[order[n_held:]]

    # deep supervision: catch the output of each decoder level but the last
    levels = [up.block[-1] for up in vq.decoder.up[:-1]]
    heads = torch.nn.ModuleList(torch.nn.Conv2d(b.out_channels, 3, 1) for b in levels)
    feats = []
    hooks = [b.register_forward_hook(lambda mod, inp, out: feats.append(out)) for b in levels]

    opt = torch.optim.Adam([*vq.parameters(), *heads.parameters()], lr=lr, foreach=True)  # one kernel for all tensors
    # warm up, hold, then decay over the last 30% to let the codes settle
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20, 0.1 + 0.9 * (steps - s) / (0.3 * steps)))
    usage = torch.zeros(config.num_embeddings)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="train vq", disable=not progress, leave=False)
    for step in bar:
        pick = torch.randint(len(train), (batch_size,), generator=gen)
        x = train[pick]
        feats.clear()
        z, codes, e, z_q = _quantise(vq, x)
        recon = F.mse_loss(_decode_latents(vq, z_q), x)
        aux = sum(F.mse_loss(head(f), F.adaptive_avg_pool2d(x, f.shape[-1])) for head, f in zip(heads, feats))
        codebook_loss = F.mse_loss(e, z.detach())  # pull the chosen codes towards the encoder outputs
        commit = F.mse_loss(z, e.detach())  # keep the encoder near its codes
        loss = recon + aux + codebook_loss + 0.25 * commit
        if labels is not None:  # cosine similarity to every code, sharpened: a softmax over the codebook
            sims = z.reshape(-1, z.shape[-1]) @ F.normalize(vq.quantize.embedding.weight, dim=1).T
            loss = loss + F.cross_entropy(sims / 0.1, labels[pick].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            usage += torch.bincount(codes.flatten(), minlength=config.num_embeddings)
            if labels is None and (step + 1) % 20 == 0 and step < 0.8 * steps:  # re-seed codes unused for 20 steps
                dead = (usage == 0).nonzero().flatten()
                pool = z.reshape(-1, z.shape[-1])
                picks = torch.randint(len(pool), (len(dead),), generator=gen)
                noise = 0.01 * torch.randn(len(dead), pool.shape[1], generator=gen)
                vq.quantize.embedding.weight[dead] = pool[picks] + noise
                usage.zero_()
            w = vq.quantize.embedding.weight
            w.copy_(F.normalize(w, dim=1))  # unit rows: HF encode then picks our cosine code
        bar.set_postfix(recon=f"{recon.item():.4f}", refresh=False)
    for h in hooks:
        h.remove()

    vq.eval()
    stats = {"loss": loss.item(), "recon_loss": recon.item(), "train_seconds": time.time() - t0}
    stats.update(vq_stats(vq, [to_image(t) for t in held]))
    return vq, stats


def latent_labels(images: list, grid: int) -> torch.Tensor:
    """What each VQ latent position shows, as an id: the content of its cell (0 = empty, then the 12
    colour-shape pairs) times (grid/3)^2 plus its place inside the cell (a cell spans (grid/3)^2
    positions that see different parts of the object). Read from the pixels with parse_image."""
    if grid % 3:
        raise ValueError(f"the VQ grid ({grid}x{grid}) must split into the scene's 3x3 cells")
    things, k = [None] + [(c, s) for c in COLOURS for s in SHAPES], grid // 3
    out = []
    for im in images:
        cell = [things.index(t) for t in cell_contents(parse_image(im))]
        out.append([cell[(r // k) * 3 + c // k] * k * k + (r % k) * k + c % k for r in range(grid) for c in range(grid)])
    return torch.tensor(out)


@torch.no_grad()
def vq_stats(vq, images: list) -> dict:
    """Reconstruction quality through HF's encode/decode: per-cell accuracy of parse_image,
    exact-scene accuracy, pixel MSE (in [-1, 1] units) and how many codes the images use."""
    if not images:
        return {}
    tokens = vq_encode(vq, images)
    decoded = vq.decode(tokens).float().cpu().clamp(-1, 1)
    target = torch.stack([to_tensor(im) for im in images])
    cells_ok, scenes_ok = 0, 0
    for im, d in zip(images, decoded):
        truth, got = cell_contents(parse_image(im)), cell_contents(parse_image(to_image(d)))
        cells_ok += sum(a == b for a, b in zip(truth, got))
        scenes_ok += truth == got
    return {"cell_accuracy": cells_ok / (9 * len(images)), "scene_accuracy": scenes_ok / len(images),
            "pixel_mse": F.mse_loss(decoded, target).item(), "codes_used": len(tokens.unique())}


@torch.no_grad()
def vq_encode(vq, images: list) -> torch.Tensor:
    """PIL images -> image tokens [B, num_patches**2] with HF's encode (row-major over the grid)."""
    p = next(vq.parameters())
    x = torch.stack([to_tensor(im) for im in images]).to(p.device, p.dtype)
    return vq.encode(x).image_tokens.view(len(images), -1)


@torch.no_grad()
def vq_decode(vq, tokens: torch.Tensor) -> list:
    """Image tokens [B, num_patches**2] -> PIL images with HF's decode. Each distinct grid is decoded once (the
    G rollouts of a prompt draw many of the same scenes: ~5x fewer decodes in a GRPO step), 64 at a time (the
    decoder's activations at full resolution are the largest tensors of a GRPO step)."""
    dev = next(vq.parameters()).device
    grids, which = torch.unique(tokens, dim=0, return_inverse=True)
    images = [to_image(t) for i in range(0, len(grids), 64) for t in vq.decode(grids[i:i + 64].to(dev))]
    return [images[j] for j in which.tolist()]


# -----------------------------------------------------------------------------
# real data: JSONL (format in the module docstring)

def _segments(path, lineno, record, name, folder, image_size):
    def bad(msg):
        return ValueError(f"{path}:{lineno}: {msg}")

    value = record[name]
    if not isinstance(value, list):
        raise bad(f'"{name}" must be a list of segments, got {type(value).__name__}')
    segments = []
    for i, seg in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(seg, dict) or len(seg) != 1:
            raise bad(f'{where} must be an object with exactly one key, "text" or "image", got {seg!r:.80}')
        (kind, v), = seg.items()
        if kind not in ("text", "image"):
            raise bad(f'unknown segment key {kind!r} in {where}; use "text" or "image"')
        if not isinstance(v, str):
            raise bad(f'{where}.{kind} must be a string, got {type(v).__name__}')
        if kind == "text":
            segments.append(("text", v))
            continue
        file = folder / v
        if not file.is_file():
            raise bad(f"image file not found: {file} ({where}); image paths are relative to the JSONL file's folder")
        try:
            with Image.open(file) as im:
                img = im.convert("RGB")  # convert() loads the pixels, so the file can close
        except Exception as err:
            raise bad(f"cannot read image {file} ({where}): {err}") from None
        if image_size is not None and img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BICUBIC)
        segments.append(("image", img))
    return segments


def _records(path, keys):
    """(line number, record) of every non-blank line, each a JSON object with `keys` and a non-empty "task"."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno}); "
                                 "each line must be one complete JSON object") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            for k in keys:
                if k not in record:
                    raise ValueError(f'{path}:{lineno}: missing key "{k}"; every record needs ' +
                                     ", ".join(f'"{k}"' for k in keys))
            if not isinstance(record["task"], str) or not record["task"]:
                raise ValueError(f'{path}:{lineno}: "task" must be a non-empty string, got {record["task"]!r:.40}')
            yield lineno, record


def load_jsonl(path, image_size: int | None = None) -> list:
    """Warm-up examples from a JSONL file (format in the module docstring), every line checked.
    Images are loaded as RGB and, if image_size is given, resized to image_size x image_size."""
    path, examples = Path(path), []
    for lineno, record in _records(path, ("task", "prompt", "answer")):
        prompt = _segments(path, lineno, record, "prompt", path.parent, image_size)
        answer = _segments(path, lineno, record, "answer", path.parent, image_size)
        if not answer:
            raise ValueError(f'{path}:{lineno}: empty answer; "answer" needs at least one segment')
        examples.append(Example(record["task"], prompt, answer, states=[],
                                ref_texts=[v for kind, v in answer if kind == "text"]))
    return examples


def load_prompts(path, image_size: int | None = None, check_only: bool = False) -> list:
    """GRPO or evaluation prompts from a JSONL file (format in the module docstring), every line checked;
    check_only: validate (images opened too) and return nothing."""
    path, examples = Path(path), []
    for lineno, record in _records(path, ("task", "prompt", "n_steps")):
        prompt = _segments(path, lineno, record, "prompt", path.parent, image_size)
        n, refs = record["n_steps"], record.get("ref_texts", [])
        if type(n) is not int or n < 0:
            raise ValueError(f'{path}:{lineno}: "n_steps" must be a whole number >= 0 (0: a one-text answer), got {n!r:.40}')
        if not isinstance(refs, list) or not all(isinstance(t, str) for t in refs):
            raise ValueError(f'{path}:{lineno}: "ref_texts" must be a list of strings, one per step, got {refs!r:.60}')
        if not prompt:
            raise ValueError(f'{path}:{lineno}: empty prompt; GRPO and evaluation prompts need at least one segment')
        if not check_only:
            examples.append(Example(record["task"], prompt, [], states=[], ref_texts=refs, steps_asked=n))
    if not examples and not check_only:
        raise ValueError(f"{path}: no prompts (every line blank)")
    return examples


# -----------------------------------------------------------------------------
# storyboards: decoded trajectories as an HTML page (images inline) and a PNG sheet, one strip a row

def save_storyboard(base, title, rows, size=96):
    """rows: (prompt text, segments) pairs, a segment ("text", str) or ("image", PIL or None: cut short).
    Writes base.html and base.png, because people would rather look at interleaved output than token ids."""
    html, strips = [f"<html><body style='font-family:sans-serif'><h2>{title}</h2>"], []
    for prompt, segs in rows:
        html.append(f"<hr><p><b>prompt:</b> {prompt}</p><p><b>sample:</b> ")
        strip = Image.new("RGB", (size * (1 + max(1, len(segs))), size), "white")
        draw = ImageDraw.Draw(strip)
        draw.multiline_text((2, 2), _wrap(prompt, 16), fill="black")
        for j, (kind, x) in enumerate(segs):
            if kind == "text":
                html.append(f"{x} ")
                draw.multiline_text((size * (j + 1) + 2, 2), _wrap(x, 16), fill="navy")
            elif x is None:
                html.append("[truncated image] ")
            else:
                im, buf = x.resize((size, size), Image.NEAREST), io.BytesIO()
                im.save(buf, format="PNG")
                html.append(f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}' "
                            "style='vertical-align:middle'> ")
                strip.paste(im, (size * (j + 1), 0))
        html.append("</p>")
        strips.append(strip)
    with open(base + ".html", "w") as f:
        f.write("\n".join(html) + "</body></html>")
    sheet = Image.new("RGB", (max(s.width for s in strips), size * len(strips)), "white")
    for i, s in enumerate(strips):
        sheet.paste(s, (0, size * i))
    sheet.save(base + ".png")


def _wrap(text, width):
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width:
            lines.append(cur); cur = w
        else:
            cur = (cur + " " + w).strip()
    return "\n".join(lines + [cur])
