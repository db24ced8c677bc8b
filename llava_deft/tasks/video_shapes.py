"""The generated video-QA task: short clips of one easy-VQA-style shape moving across the frame.

Each clip (default 16 frames of 64×64 at 8 fps) shows one circle, rectangle or triangle in one of
easy-VQA's 8 colours on a light background, moving left, right, up or down in a straight line; in
about half of the clips the shape changes colour once, somewhere in the middle half of the clip.
Every clip gets five single-word questions::

    direction    which way does the shape move?                   left | right | up | down
    shape        what shape is it?                                circle | rectangle | triangle
    color_first  what color is the shape in the first frame?      one of the 8 colours
    color_last   what color is the shape in the last frame?       one of the 8 colours
    color_change does the shape change color?                     yes | no

Output (LLaVA conversation JSON with a ``video`` key; paths relative to the JSON's folder)::

    <out>/meta.json                  the generator's arguments and library versions
    <out>/train.json, <out>/test.json
    <out>/train/clips/00000.mp4 ...  <out>/test/clips/00000.mp4 ...

    {"id": "video-train-00000-direction", "video": "train/clips/00000.mp4", "question_type": "direction",
     "conversations": [{"from": "human", "value": "<video>\\nwhich way does the shape move?"},
                       {"from": "gpt", "value": "left"}]}

Clips are H.264 in MP4 written by PyAV with ``libx264rgb`` at ``crf 0``: lossless RGB, so decord
decodes exactly the rendered frames. Everything is a function of ``seed`` (clip ``i`` of a split
draws from its own generator seeded by ``(seed, split, i)``, so it does not depend on how many clips
are made): the same arguments give the same JSON, the same frames and, with the same PyAV/x264
build, the same clip bytes.

    .venv/bin/python scripts/make_video_task.py --out data/video_shapes   # 2,000 train / 500 test clips
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..modality import PLACEHOLDERS
from . import qa_record, task_parser

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
}
"""easy-VQA's 8 colours and the RGB its images use for them."""

SHAPES = ("circle", "rectangle", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
"""Direction → (dx, dy) in image coordinates (y grows downwards)."""

QUESTIONS: dict[str, tuple[str, ...]] = {
    "direction": ("which way does the shape move?", "in which direction is the shape moving?"),
    "shape": ("what shape is it?", "what shape is in the video?"),
    "color_first": ("what color is the shape in the first frame?", "what color is the shape at the start?"),
    "color_last": ("what color is the shape in the last frame?", "what color is the shape at the end?"),
    "color_change": ("does the shape change color?", "does the color of the shape change?"),
}
"""Question type → its phrasings (one is drawn per clip)."""

SPLITS = {"train": 0, "test": 1}
GENERATOR_VERSION = 1
"""Bumped whenever the same arguments would give different clips or questions."""

_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased, still deterministic
_MARGIN = 2  # pixels kept free between the shape and the frame's edge


@dataclass(frozen=True)
class ClipSpec:
    """Everything that defines one clip. Positions and sizes are in output pixels."""

    shape: str
    direction: str
    first_color: str
    last_color: str
    change_frame: int | None  # first frame drawn in last_color; None when the colour never changes
    radius: float  # half the shape's extent
    aspect: float  # rectangle height / width (1 for the other shapes)
    start: tuple[float, float]  # centre (x, y) in frame 0
    step: float  # pixels moved per frame
    background: tuple[int, int, int]
    frames: int
    size: int

    def color_at(self, t: int) -> str:
        return self.last_color if self.change_frame is not None and t >= self.change_frame else self.first_color


def sample_clip(rng: np.random.Generator, frames: int = 16, size: int = 64, change_prob: float = 0.5,
                object_scale: float = 1.0) -> ClipSpec:
    """Draw one clip's parameters. The shape stays whole inside the frame for the whole clip and moves
    between about a third and a half of the frame in total. ``object_scale`` multiplies the shape's
    size (its radius is 11-17 % of the frame times it); 1 draws exactly what it always drew."""
    check_object_scale(object_scale)
    if frames < 2:
        raise ValueError(f"a clip needs at least 2 frames to show motion, got {frames}")
    if size < 32:
        raise ValueError(f"frame size must be >= 32 pixels, got {size}")
    shape = SHAPES[rng.integers(len(SHAPES))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    names = list(COLORS)
    first = names[rng.integers(len(names))]
    if rng.random() < change_prob:
        last = [c for c in names if c != first][rng.integers(len(names) - 1)]
        lo = max(1, math.ceil(frames / 4))  # the change happens in the middle half of the clip
        hi = max(lo, min(frames - 1, (3 * frames) // 4))
        change_frame = int(rng.integers(lo, hi + 1))
    else:
        last, change_frame = first, None
    radius = float(rng.uniform(0.11, 0.17) * size * object_scale)  # x 1.0 is exact: the same clips
    aspect = float(rng.uniform(0.55, 0.9)) if shape == "rectangle" else 1.0
    room = size - 2 * _MARGIN - 2 * radius  # free travel for the centre along an axis
    travel = float(rng.uniform(0.55, 0.95) * room)
    dx, dy = DIRECTIONS[direction]
    low = _MARGIN + radius
    along = float(rng.uniform(low, low + room - travel))  # start along the motion axis, moving +
    if dx + dy < 0:  # moving left or up: mirror so the whole path stays inside
        along = size - along
    across = float(rng.uniform(low, low + room))
    start = (along, across) if dx else (across, along)
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    return ClipSpec(
        shape=shape, direction=direction, first_color=first, last_color=last, change_frame=change_frame,
        radius=radius, aspect=aspect, start=start, step=travel / (frames - 1), background=background,
        frames=frames, size=size,
    )


def check_object_scale(object_scale: float) -> None:
    """``ValueError`` unless the shape keeps at least a few pixels and fits the frame."""
    if not 0.25 <= object_scale <= 2.0:
        raise ValueError(f"object_scale must be in [0.25, 2] (the shape's size relative to the default), got {object_scale}")


def render_clip(spec: ClipSpec) -> np.ndarray:
    """The clip's frames, ``(T, size, size, 3)`` uint8 RGB."""
    s, big = _SUPERSAMPLE, spec.size * _SUPERSAMPLE
    dx, dy = DIRECTIONS[spec.direction]
    out = np.empty((spec.frames, spec.size, spec.size, 3), dtype=np.uint8)
    for t in range(spec.frames):
        img = Image.new("RGB", (big, big), spec.background)
        draw = ImageDraw.Draw(img)
        cx = (spec.start[0] + dx * spec.step * t) * s
        cy = (spec.start[1] + dy * spec.step * t) * s
        r = spec.radius * s
        fill = COLORS[spec.color_at(t)]
        if spec.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif spec.shape == "rectangle":
            h = r * spec.aspect
            draw.rectangle([cx - r, cy - h, cx + r, cy + h], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        out[t] = np.asarray(img.resize((spec.size, spec.size), Image.Resampling.BOX))
    return out


def write_clip(frames: np.ndarray, path: str | Path, fps: int = 8) -> None:
    """Write ``frames (T, H, W, 3)`` uint8 as lossless H.264 (``libx264rgb``, ``crf 0``, RGB) in MP4."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    # bitexact: no "Lavf<version>" tag in the file, so the bytes do not change with PyAV's bundled FFmpeg
    with av.open(str(path), mode="w", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264rgb", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb24"
        stream.options = {"crf": "0", "preset": "medium"}
        stream.codec_context.thread_count = 1  # one encoder thread: same bytes on every machine size
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush
            container.mux(packet)


def clip_questions(spec: ClipSpec, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """``(question_type, question, answer)`` for every question type, phrasing drawn from ``rng``."""
    answers = {
        "direction": spec.direction,
        "shape": spec.shape,
        "color_first": spec.first_color,
        "color_last": spec.last_color,
        "color_change": "no" if spec.change_frame is None else "yes",
    }
    return [(qt, phrasings[rng.integers(len(phrasings))], answers[qt]) for qt, phrasings in QUESTIONS.items()]


def _clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def generate_split(
    out: str | Path, split: str, n: int, frames: int = 16, seed: int = 0, fps: int = 8, size: int = 64,
    progress: bool = True, object_scale: float = 1.0,
) -> Path:
    """Render and write ``n`` clips of ``split`` under ``out/split/clips/`` and their questions to
    ``out/split.json``; returns the JSON path."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    out = Path(out)
    clip_dir = out / split / "clips"
    clip_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in tqdm(range(n), desc=f"video {split}", unit="clip", disable=not progress):
        rng = _clip_rng(seed, split, i)
        spec = sample_clip(rng, frames=frames, size=size, object_scale=object_scale)
        rel = f"{split}/clips/{i:05d}.mp4"
        write_clip(render_clip(spec), out / rel, fps=fps)
        for qtype, question, answer in clip_questions(spec, rng):
            records.append(qa_record(f"video-{split}-{i:05d}-{qtype}", "video", rel, qtype, question, answer, PLACEHOLDERS["video"]))
    json_path = out / f"{split}.json"
    json_path.write_text(json.dumps(records, ensure_ascii=False))
    return json_path


def make_video_task(
    out: str | Path, n_train: int = 2000, n_test: int = 500, frames: int = 16, seed: int = 0, fps: int = 8,
    size: int = 64, progress: bool = True, object_scale: float = 1.0,
) -> dict[str, Path]:
    """Generate both splits and ``meta.json``; returns ``{"train": json_path, "test": json_path}``.
    ``object_scale`` < 1 makes every shape smaller (the ``video_small`` task: 0.5); ``meta.json``
    records it when it is not 1 (so the default writes the same files as before the option)."""
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    check_object_scale(object_scale)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        split: generate_split(out, split, n, frames=frames, seed=seed, fps=fps, size=size, progress=progress,
                              object_scale=object_scale)
        for split, n in (("train", n_train), ("test", n_test))
    }
    meta = {
        "generator": "llava_deft.tasks.video_shapes", "version": GENERATOR_VERSION, "seed": seed, "frames": frames,
        "fps": fps, "size": size, **({"object_scale": object_scale} if object_scale != 1.0 else {}),
        "n_train": n_train, "n_test": n_test,
        "questions_per_clip": len(QUESTIONS), "codec": "libx264rgb crf 0 rgb24 (lossless), mp4",
        "av": av.__version__, "numpy": np.__version__,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = task_parser(__doc__, "output folder (train.json, test.json, {train,test}/clips/)",
                         "train clips (5 questions each)", "test clips (5 questions each)")
    for flag, default, what in (("frames", 16, "frames per clip"), ("fps", 8, "frame rate written into the clips"),
                                ("size", 64, "frame width and height in pixels")):
        parser.add_argument(f"--{flag}", type=int, default=default, help=what)
    parser.add_argument("--object-scale", type=float, default=1.0,
                        help="shape size relative to the default (0.5: the video_small task's small shapes)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    paths = make_video_task(
        args.out, n_train=args.n_train, n_test=args.n_test, frames=args.frames, seed=args.seed, fps=args.fps,
        size=args.size, object_scale=args.object_scale,
    )
    print(
        f"wrote {args.n_train} train / {args.n_test} test clips ({len(QUESTIONS)} questions each) to "
        f"{args.out} in {time.perf_counter() - t0:.1f}s"
    )
    return paths
