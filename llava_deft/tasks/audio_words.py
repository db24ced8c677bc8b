"""Audio QA task: short phrases spoken by espeak-ng, one-word answers (colour, shape or number).

Each clip speaks one of three phrase kinds, in easy-VQA's vocabulary:

    "the red circle"           -> what color is said? red      / what shape is said? circle
    "seven"                    -> what number is said? seven
    "three blue triangles"     -> colour, shape and number questions

Every question of a clip is one sample. Everything (phrase, voice, speed, pitch, question wording)
is a pure function of ``(seed, split, index)``, and espeak-ng's output is deterministic for fixed
arguments, so a run is reproducible byte for byte on the same espeak-ng version (recorded in
``meta.json``). Output, with media paths relative to ``out`` (the JSON's folder, LLaVA's default)::

    out/train/clips/000000.wav ...   16 kHz mono PCM-16 (``audio_format="flac"``: lossless FLAC, about half the bytes)
    out/train.json                   [{"id", "audio": "train/clips/000000.wav", "conversations": [...]}]
    out/train_clips.json             per clip: path, text, voice, speed, pitch, seconds
    out/meta.json                    arguments, counts and the espeak-ng version

    .venv/bin/python scripts/make_audio_task.py --out data/audio_words --n-train 2000 --n-test 500 --seed 0
"""

from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from ..encoders.audio import SAMPLING_RATE, load_audio
from ..modality import PLACEHOLDERS
from . import task_parser

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LANGUAGES = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
SPEED_RANGE = (130, 190)  # words per minute
PITCH_RANGE = (30, 70)  # espeak-ng 0..99
QUESTIONS = {
    "color": ("what color is said?", "which color do you hear?", "what color is mentioned?"),
    "shape": ("what shape is said?", "which shape do you hear?", "what shape is mentioned?"),
    "number": ("what number is said?", "which number do you hear?", "what number is mentioned?"),
}
KINDS = {"color_shape": ("color", "shape"), "number": ("number",), "count": ("number", "color", "shape")}
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one clip: its words and espeak-ng's voice, speed and pitch."""

    kind: str
    text: str
    answers: dict[str, str]  # question type -> one-word answer
    voice: str
    speed: int
    pitch: int


def clip_spec(seed: int, split: str, index: int) -> ClipSpec:
    """The clip ``index`` of ``split`` for ``seed`` (pure; string seeding is stable across runs)."""
    rng = random.Random(f"audio_words:{seed}:{split}:{index}")
    kind = rng.choice(sorted(KINDS))
    color, shape, number = rng.choice(COLORS), rng.choice(SHAPES), rng.choice(NUMBERS)
    if kind == "color_shape":
        text = f"the {color} {shape}"
    elif kind == "number":
        text = number
    else:
        text = f"{number} {color} {shape}{'' if number == 'one' else 's'}"
    answers = {"color": color, "shape": shape, "number": number}
    voice = f"{rng.choice(LANGUAGES)}+{rng.choice(VARIANTS)}"
    return ClipSpec(
        kind=kind,
        text=text,
        answers={q: answers[q] for q in KINDS[kind]},
        voice=voice,
        speed=rng.randint(*SPEED_RANGE),
        pitch=rng.randint(*PITCH_RANGE),
    )


def clip_samples(spec: ClipSpec, seed: int, split: str, index: int, audio_path: str) -> list[dict]:
    """One LLaVA record per question of the clip (wording chosen by the seed)."""
    rng = random.Random(f"audio_words-q:{seed}:{split}:{index}")
    return [
        {
            "id": f"audio_words-{split}-{index:06d}-{qtype}",
            "audio": audio_path,
            "conversations": [
                {"from": "human", "value": f"{PLACEHOLDERS['audio']}\n{rng.choice(QUESTIONS[qtype])}"},
                {"from": "gpt", "value": answer},
            ],
        }
        for qtype, answer in spec.answers.items()
    ]


def espeak_version() -> str | None:
    """espeak-ng's version line, or None when it is not installed."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    return out.split("Data at:")[0].strip()


AUDIO_FORMATS = ("wav", "flac")
"""Clip file formats the generator writes; both are lossless 16 kHz mono PCM-16 (same samples)."""


def synthesize(spec: ClipSpec, path: Path) -> float:
    """Speak ``spec`` with espeak-ng, write ``path`` as 16 kHz mono PCM-16 (wav or flac, by its
    suffix); return its seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"  # espeak-ng writes 22,050 Hz
        subprocess.run(
            ["espeak-ng", "-v", spec.voice, "-s", str(spec.speed), "-p", str(spec.pitch), "-w", str(raw), spec.text],
            check=True,
            capture_output=True,
        )
        wave = load_audio(raw, SAMPLING_RATE).numpy()
    if path.suffix == ".flac":
        # quantise exactly as the wav does (libsndfile's float -> PCM-16 rounding differs by format),
        # then store those int16 samples losslessly: a flac clip decodes to its wav twin's samples
        buf = io.BytesIO()
        sf.write(buf, wave, SAMPLING_RATE, subtype="PCM_16", format="WAV")
        buf.seek(0)
        pcm, _ = sf.read(buf, dtype="int16")
        sf.write(str(path), pcm, SAMPLING_RATE, subtype="PCM_16", format="FLAC")
    else:
        sf.write(str(path), wave, SAMPLING_RATE, subtype="PCM_16", format="WAV")
    return len(wave) / SAMPLING_RATE


def generate_audio_task(
    out: str | Path,
    n_train: int = 2000,
    n_test: int = 500,
    seed: int = 0,
    workers: int = 8,
    progress: bool = True,
    force: bool = False,
    audio_format: str = "wav",
) -> dict:
    """Write the task to ``out`` (see the module docstring); returns the metadata written to ``meta.json``.

    ``audio_format`` is ``"wav"`` or ``"flac"`` (lossless, about half the size: what to carry when
    bytes are scarce); the samples, and so training and evaluation, are the same either way.

    A folder whose ``meta.json`` records the same arguments and espeak-ng version is left as it is
    (the cache) unless ``force``. Raises ``RuntimeError`` when espeak-ng is not installed.
    """
    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"audio_format={audio_format!r}: choose one of {list(AUDIO_FORMATS)}")
    version = espeak_version()
    if version is None:
        raise RuntimeError("espeak-ng is not installed (Debian/Ubuntu: apt-get install -y espeak-ng)")
    out = Path(out)
    args = {"n_train": n_train, "n_test": n_test, "seed": seed, "espeak_ng": version}
    if audio_format != "wav":  # recorded only when not the default, so existing wav caches stay valid
        args["audio_format"] = audio_format
    meta_path = out / "meta.json"
    if not force and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in args.items()):
            return meta
    start = time.perf_counter()
    meta = {**args, "sampling_rate": SAMPLING_RATE, "splits": {}}
    for split, n in zip(SPLITS, (n_train, n_test)):
        clip_dir = out / split / "clips"
        if clip_dir.exists():
            shutil.rmtree(clip_dir)
        clip_dir.mkdir(parents=True)
        specs = [clip_spec(seed, split, i) for i in range(n)]
        rel = [f"{split}/clips/{i:06d}.{audio_format}" for i in range(n)]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            jobs = pool.map(lambda i: synthesize(specs[i], out / rel[i]), range(n))
            seconds = list(tqdm(jobs, total=n, desc=f"audio_words {split}", disable=not progress))
        records = [r for i, s in enumerate(specs) for r in clip_samples(s, seed, split, i, rel[i])]
        clips = [{"audio": rel[i], **asdict(s), "seconds": seconds[i]} for i, s in enumerate(specs)]
        (out / f"{split}.json").write_text(json.dumps(records, indent=1))
        (out / f"{split}_clips.json").write_text(json.dumps(clips, indent=1))
        meta["splits"][split] = {
            "clips": n,
            "samples": len(records),
            "max_seconds": max(seconds, default=0.0),
        }
    meta["generation_seconds"] = round(time.perf_counter() - start, 2)
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def main(argv: list[str] | None = None) -> int:
    p = task_parser(__doc__, "output folder", "train clips (1 to 3 questions each)", "test clips")
    p.add_argument("--workers", type=int, default=8, help="espeak-ng processes at once")
    p.add_argument("--force", action="store_true", help="regenerate even if meta.json matches")
    p.add_argument("--audio-format", default="wav", choices=AUDIO_FORMATS, help="clip files (flac: lossless, ~half the size)")
    a = p.parse_args(argv)
    meta = generate_audio_task(a.out, a.n_train, a.n_test, a.seed, a.workers, force=a.force, audio_format=a.audio_format)
    print(json.dumps(meta, indent=1))
    return 0
