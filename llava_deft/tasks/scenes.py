"""The generated scenes task: several small and large shapes on one canvas, each question about some of them.

Each image (default 96×96; 144 tokens with configs/model/scenes_cs96.yaml, 8 px per token) holds 3 to 6
objects on a plain light-gray background (its level drawn per image, plus a little per-pixel noise):
a circle, square or triangle in one of six colours (:data:`COLORS`), "small" (8-12 % of the side) or
"large" (20-28 %), at continuous random positions, never overlapping. Every image gets up to five
questions, one per type, each answered by one lowercase word::

    relation_color  what color is the small triangle left of the circle?    a colour
    shape           what shape is the red object?                          circle | square | triangle
    color           what color is the large square?                        a colour
    count           how many blue shapes are there? / how many circles are there?   a digit, 0-9
    presence        is there a green triangle?                             yes | no

A question is only asked when its answer is unambiguous, and is left out of an image where it cannot
be (so a few images have fewer than five; the rest are still one per type):

* relation_color: the anchor ("the circle" when its shape is unique in the image, or "the red
  circle" when its colour and shape are) and the relation (left of / right of / above / below, by
  box centres) must single out exactly one object of the named size and shape other than the
  anchor, and no object of that size and shape may lie within :data:`RELATION_MARGIN` of the
  side's length of the anchor along the relation's axis (no borderline case). Where possible the
  referent is one whose size and shape alone are *not* unique, so the relation is needed.
* shape: the colour is unique in the image. color: the size and shape are unique.
* count: of a colour (any of the six) or a shape (any of the three); answers are digits ("0", "2"; one
  token each of the tiny tokenizer). The answer value is drawn uniformly among the values the
  image's counts take, then the question among those with it, so small counts do not dominate.
* presence: "yes" or "no" with probability 1/2 each; a "no" names, where the image allows, a colour
  and a shape that are both present but not together.

Output (LLaVA conversation JSON; image paths relative to the JSON's folder)::

    <out>/meta.json                        the generator's arguments and library versions
    <out>/train.json, <out>/test.json
    <out>/train_captions.json, <out>/test_captions.json   one caption record per image (below)
    <out>/train/images/000000.png ...      <out>/test/images/000000.png ...

    {"id": "scenes-train-000000-relation_color", "image": "train/images/000000.png",
     "question_type": "relation_color",
     "conversations": [{"from": "human", "value": "<image>\\nwhat color is the small triangle left of the circle?"},
                       {"from": "gpt", "value": "blue"}]}

A caption record asks "describe the scene." and answers with every object as "<size> <colour> <shape>
at <where>" (``where``: the cell of a 3x3 grid its centre falls in: "top left", "top", ..., "center"),
in reading order: "small red circle at top left, large blue square at center, small green triangle at
bottom." It is the dense, question-free supervision of LLaVA's alignment stage: mixed into training
(configs/train/scenes_captions.yaml) it teaches the encoder every object's attributes and place, which
each question type reads. ``--no-captions`` leaves the caption files out.

Everything is a function of ``seed``: image ``i`` of a split draws its scene and its questions from
its own generator seeded by ``(seed, split, i)`` (train and test are different streams), so it does not
depend on how many images are made. The same arguments give the same JSON and the same PNG bytes
(with the same Pillow/zlib build).

    .venv/bin/python -m llava_deft.tasks.scenes --out data/tasks/scenes --n-train 6000 --n-test 600
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..modality import PLACEHOLDERS
from . import qa_record, task_parser

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (240, 215, 0),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "black": (20, 20, 20),
}
"""The six colours and their RGB (each name one token of the tiny tokenizer after a space)."""

SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, tuple[float, float]] = {"small": (0.08, 0.12), "large": (0.20, 0.28)}
"""Size class -> range of an object's extent (diameter, side, triangle base and height) as a share of the side."""

RELATIONS = ("left of", "right of", "above", "below")
QUESTION_TYPES = ("relation_color", "shape", "color", "count", "presence")
SPLITS = {"train": 0, "test": 1}
GENERATOR_VERSION = 1
"""Bumped whenever the same arguments would give different images or questions."""

MIN_SIZE = 64
"""Smallest canvas: small objects are then 5-8 px across."""
MAX_OBJECTS = 8
"""Most objects per image (more large ones do not fit without overlapping often)."""
RELATION_MARGIN = 0.1
"""Share of the side two centres must be apart along a relation's axis for it to hold (or clearly not)."""

_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased, still deterministic
_GAP = 0.03  # free space kept between two objects' boxes, as a share of the side
_BORDER = 1.0  # pixels kept free between an object and the canvas edge
_PLACE_TRIES = 200  # positions tried per object before the scene is drawn again
_SCENE_TRIES = 100  # scenes tried before giving up (never reached with MAX_OBJECTS and the sizes above)


@dataclass(frozen=True)
class SceneObject:
    """One object. ``extent`` and ``center`` are in output pixels; its box is ``center ± extent / 2``."""

    shape: str
    color: str
    size: str  # "small" | "large"
    extent: float
    center: tuple[float, float]  # (x, y); y grows downwards

    def box(self) -> tuple[float, float, float, float]:
        h = self.extent / 2
        return (self.center[0] - h, self.center[1] - h, self.center[0] + h, self.center[1] + h)


@dataclass(frozen=True)
class SceneSpec:
    """Everything that defines one image."""

    size: int
    background: int  # gray level of the background
    noise: int  # per-pixel noise is uniform in [-noise, noise] (0: none)
    noise_seed: int
    objects: tuple[SceneObject, ...]


def check_args(size: int, min_objects: int, max_objects: int, noise: int = 0) -> None:
    """``ValueError`` naming the argument when the generator cannot use it."""
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} pixels (small objects are 8-12 % of it), got {size}")
    if min_objects < 2:
        raise ValueError(f"min_objects must be >= 2 (a relation needs two objects), got {min_objects}")
    if max_objects > MAX_OBJECTS:
        raise ValueError(f"max_objects must be <= {MAX_OBJECTS} (more do not fit without overlapping), got {max_objects}")
    if min_objects > max_objects:
        raise ValueError(f"min_objects ({min_objects}) must be <= max_objects ({max_objects})")
    if not 0 <= noise <= 32:
        raise ValueError(f"noise must be in [0, 32] gray levels, got {noise}")


def _apart(a: tuple[float, ...], b: tuple[float, ...], gap: float) -> bool:
    """Whether boxes ``a`` and ``b`` (x0, y0, x1, y1) are at least ``gap`` apart along x or y."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def sample_scene(rng: np.random.Generator, size: int = 96, min_objects: int = 3, max_objects: int = 6,
                 noise: int = 4) -> SceneSpec:
    """Draw one image's objects: shape, colour and size class uniform and independent, positions by
    rejection sampling (a new scene when an object finds no free place in ``_PLACE_TRIES`` tries)."""
    check_args(size, min_objects, max_objects, noise)
    n = int(rng.integers(min_objects, max_objects + 1))
    background = int(rng.integers(200, 236))
    level = int(rng.integers(0, noise + 1))
    noise_seed = int(rng.integers(2**32))
    gap = _GAP * size
    for _ in range(_SCENE_TRIES):
        objects: list[SceneObject] = []
        for _ in range(n):
            shape = SHAPES[rng.integers(len(SHAPES))]
            color = list(COLORS)[rng.integers(len(COLORS))]
            size_class = list(SIZES)[rng.integers(len(SIZES))]
            extent = float(rng.uniform(*SIZES[size_class]) * size)
            lo, hi = _BORDER + extent / 2, size - _BORDER - extent / 2
            for _ in range(_PLACE_TRIES):
                obj = SceneObject(shape, color, size_class, extent, (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))))
                if all(_apart(obj.box(), o.box(), gap) for o in objects):
                    objects.append(obj)
                    break
            else:
                break  # no room: draw the scene again
        if len(objects) == n:
            return SceneSpec(size=size, background=background, noise=level, noise_seed=noise_seed, objects=tuple(objects))
    raise RuntimeError(f"could not place {n} objects on a {size}px canvas in {_SCENE_TRIES} tries")


def render_scene(spec: SceneSpec) -> np.ndarray:
    """The image, ``(size, size, 3)`` uint8 RGB."""
    s, big = _SUPERSAMPLE, spec.size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), (spec.background,) * 3)
    draw = ImageDraw.Draw(img)
    for o in spec.objects:
        x0, y0, x1, y1 = (v * s for v in o.box())
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif o.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:  # pointing up: base along the box's bottom edge, apex at the middle of its top edge
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    out = np.asarray(img.resize((spec.size, spec.size), Image.Resampling.BOX))
    if spec.noise:
        jitter = np.random.default_rng(spec.noise_seed).integers(-spec.noise, spec.noise + 1, size=out.shape)
        out = np.clip(out.astype(np.int16) + jitter, 0, 255).astype(np.uint8)
    return out


def offset(a: SceneObject, b: SceneObject, relation: str) -> float:
    """How far ``a``'s centre lies in ``relation``'s direction from ``b``'s (negative: the other way)."""
    (ax, ay), (bx, by) = a.center, b.center
    return {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[relation]


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _relation_question(spec: SceneSpec, rng: np.random.Generator) -> tuple[str, str] | None:
    objs, margin = spec.objects, RELATION_MARGIN * spec.size
    shapes = Counter(o.shape for o in objs)
    color_shapes = Counter((o.color, o.shape) for o in objs)
    found = []  # (relation, referent index, anchor names, whether size + shape alone would be ambiguous)
    for ai, a in enumerate(objs):
        names = ([f"the {a.shape}"] if shapes[a.shape] == 1 else []) + (
            [f"the {a.color} {a.shape}"] if color_shapes[a.color, a.shape] == 1 else [])
        if not names:
            continue
        kinds = list(dict.fromkeys((o.size, o.shape) for i, o in enumerate(objs) if i != ai))  # ordered, no set
        for rel in RELATIONS:
            for size_class, shape in kinds:
                matches = [i for i, o in enumerate(objs) if i != ai and (o.size, o.shape) == (size_class, shape)]
                dists = [offset(objs[i], a, rel) for i in matches]
                if any(abs(d) <= margin for d in dists):
                    continue  # borderline: neither clearly on that side nor clearly not
                hits = [i for i, d in zip(matches, dists) if d > margin]
                if len(hits) == 1:
                    found.append((rel, hits[0], names, len(matches) > 1))
    pool = [f for f in found if f[3]] or found
    if not pool:
        return None
    rel = _pick(rng, [r for r in RELATIONS if any(f[0] == r for f in pool)])
    _, ri, names, _ = _pick(rng, [f for f in pool if f[0] == rel])
    ref = objs[ri]
    return f"what color is the {ref.size} {ref.shape} {rel} {_pick(rng, names)}?", ref.color


def _shape_question(spec: SceneSpec, rng: np.random.Generator) -> tuple[str, str] | None:
    colors = Counter(o.color for o in spec.objects)
    unique = [o for o in spec.objects if colors[o.color] == 1]
    if not unique:
        return None
    o = _pick(rng, unique)
    return f"what shape is the {o.color} object?", o.shape


def _color_question(spec: SceneSpec, rng: np.random.Generator) -> tuple[str, str] | None:
    kinds = Counter((o.size, o.shape) for o in spec.objects)
    unique = [o for o in spec.objects if kinds[o.size, o.shape] == 1]
    if not unique:
        return None
    o = _pick(rng, unique)
    return f"what color is the {o.size} {o.shape}?", o.color


def _count_question(spec: SceneSpec, rng: np.random.Generator) -> tuple[str, str]:
    objs = spec.objects
    asked = [(f"how many {c} shapes are there?", sum(o.color == c for o in objs)) for c in COLORS] + [
        (f"how many {s}s are there?", sum(o.shape == s for o in objs)) for s in SHAPES]
    value = _pick(rng, sorted({n for _, n in asked}))
    return _pick(rng, [q for q, n in asked if n == value]), str(value)


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _presence_question(spec: SceneSpec, rng: np.random.Generator) -> tuple[str, str]:
    present = list(dict.fromkeys((o.color, o.shape) for o in spec.objects))
    if rng.random() < 0.5:
        color, shape = _pick(rng, present)
        return f"is there {_a(color)} {color} {shape}?", "yes"
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    colors, shapes = {c for c, _ in present}, {s for _, s in present}
    color, shape = _pick(rng, [(c, s) for c, s in absent if c in colors and s in shapes] or absent)
    return f"is there {_a(color)} {color} {shape}?", "no"


_ASK = {"relation_color": _relation_question, "shape": _shape_question, "color": _color_question,
        "count": _count_question, "presence": _presence_question}


_ROWS = ("top", "", "bottom")
_COLS = ("left", "", "right")
CAPTION_PROMPT = "describe the scene."
"""The question of every caption record (``<split>_captions.json``)."""


def _cell(obj: SceneObject, size: int) -> tuple[int, int]:
    """(row, column) of the 3x3 grid cell that ``obj``'s centre falls in."""
    col, row = (min(int(3 * v / size), 2) for v in obj.center)
    return row, col


def where(obj: SceneObject, size: int) -> str:
    """The cell of a 3x3 grid that ``obj``'s centre falls in: "top left", "top", ..., "center", ..., "bottom right"."""
    row, col = _cell(obj, size)
    return " ".join(w for w in (_ROWS[row], _COLS[col]) if w) or "center"


def scene_caption(spec: SceneSpec) -> str:
    """Every object of ``spec`` as "<size> <colour> <shape> at <where>", in reading order (by the 3x3 row of
    its centre, then left to right), e.g. "small red circle at top left, large blue square at center."
    Dense supervision of what each question type needs (an alignment stage, as LLaVA's captions)."""
    order = sorted(spec.objects, key=lambda o: (_cell(o, spec.size)[0], o.center[0]))
    parts = [f"{o.size} {o.color} {o.shape} at {where(o, spec.size)}" for o in order]
    return ", ".join(parts) + "."


def scene_questions(spec: SceneSpec, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """``(question_type, question, answer)`` for each type of :data:`QUESTION_TYPES` that ``spec`` can
    answer unambiguously, in that order."""
    out = []
    for qtype in QUESTION_TYPES:
        qa = _ASK[qtype](spec, rng)
        if qa is not None:
            out.append((qtype, *qa))
    return out


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def make_scene(seed: int, split: str, index: int, size: int = 96, min_objects: int = 3, max_objects: int = 6,
               noise: int = 4) -> tuple[SceneSpec, list[tuple[str, str, str]]]:
    """Image ``index`` of ``split``: its scene and its questions, exactly as :func:`generate_split` writes them."""
    rng = _image_rng(seed, split, index)
    spec = sample_scene(rng, size=size, min_objects=min_objects, max_objects=max_objects, noise=noise)
    return spec, scene_questions(spec, rng)


def generate_split(
    out: str | Path, split: str, n: int, size: int = 96, min_objects: int = 3, max_objects: int = 6, noise: int = 4,
    seed: int = 0, progress: bool = True, captions: bool = True,
) -> Path:
    """Render and write ``n`` images of ``split`` under ``out/split/images/``, their questions to
    ``out/split.json`` and (``captions``) one caption per image (:func:`scene_caption`) to
    ``out/split_captions.json``; returns the questions' JSON path."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    check_args(size, min_objects, max_objects, noise)
    out = Path(out)
    image_dir = out / split / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    records, caption_records = [], []
    for i in tqdm(range(n), desc=f"scenes {split}", unit="image", disable=not progress):
        spec, questions = make_scene(seed, split, i, size, min_objects, max_objects, noise)
        rel = f"{split}/images/{i:06d}.png"
        Image.fromarray(render_scene(spec)).save(out / rel, format="PNG")
        for qtype, question, answer in questions:
            records.append(qa_record(f"scenes-{split}-{i:06d}-{qtype}", "image", rel, qtype, question, answer, PLACEHOLDERS["image"]))
        if captions:
            caption_records.append(qa_record(f"scenes-{split}-{i:06d}-caption", "image", rel, "caption", CAPTION_PROMPT,
                                             scene_caption(spec), PLACEHOLDERS["image"]))
    json_path = out / f"{split}.json"
    json_path.write_text(json.dumps(records, ensure_ascii=False))
    if captions:
        (out / f"{split}_captions.json").write_text(json.dumps(caption_records, ensure_ascii=False))
    return json_path


def make_scenes_task(
    out: str | Path, n_train: int = 6000, n_test: int = 600, size: int = 96, min_objects: int = 3,
    max_objects: int = 6, noise: int = 4, seed: int = 0, progress: bool = True, captions: bool = True,
) -> dict[str, Path]:
    """Generate both splits and ``meta.json``; returns ``{"train": json_path, "test": json_path}``."""
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    check_args(size, min_objects, max_objects, noise)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kw = {"size": size, "min_objects": min_objects, "max_objects": max_objects, "noise": noise, "seed": seed,
          "progress": progress, "captions": captions}
    paths = {split: generate_split(out, split, n, **kw) for split, n in (("train", n_train), ("test", n_test))}
    meta = {
        "generator": "llava_deft.tasks.scenes", "version": GENERATOR_VERSION, "seed": seed, "n_train": n_train,
        "n_test": n_test, "captions": captions, "size": size, "min_objects": min_objects, "max_objects": max_objects, "noise": noise,
        "question_types": list(QUESTION_TYPES), "colors": list(COLORS), "shapes": list(SHAPES),
        "sizes": {k: list(v) for k, v in SIZES.items()}, "relation_margin": RELATION_MARGIN,
        "numpy": np.__version__, "pillow": PIL.__version__,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = task_parser(__doc__, "output folder (train.json, test.json, {train,test}/images/)",
                         "train images (up to 5 questions each)", "test images (up to 5 questions each)")
    parser.set_defaults(n_train=6000, n_test=600)
    for flag, default, what in (("size", 96, "image width and height in pixels"),
                                ("min-objects", 3, "fewest objects per image"),
                                ("max-objects", 6, f"most objects per image (<= {MAX_OBJECTS})"),
                                ("noise", 4, "largest per-pixel noise, in gray levels (0: none)")):
        parser.add_argument(f"--{flag}", type=int, default=default, help=what)
    parser.add_argument("--no-captions", dest="captions", action="store_false",
                        help="do not write {train,test}_captions.json (one 'describe the scene.' record per image)")
    args = parser.parse_args(argv)
    try:
        check_args(args.size, args.min_objects, args.max_objects, args.noise)
    except ValueError as err:
        parser.error(str(err))
    t0 = time.perf_counter()
    paths = make_scenes_task(args.out, n_train=args.n_train, n_test=args.n_test, size=args.size,
                             min_objects=args.min_objects, max_objects=args.max_objects, noise=args.noise,
                             seed=args.seed, captions=args.captions)
    n_q = {s: len(json.loads(p.read_text())) for s, p in paths.items()}
    print(f"wrote {args.n_train} train / {args.n_test} test images ({n_q['train']} / {n_q['test']} questions) "
          f"to {args.out} in {time.perf_counter() - t0:.1f}s")
    return paths


if __name__ == "__main__":
    main()
