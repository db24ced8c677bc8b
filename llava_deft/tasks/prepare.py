"""Prepare the generated tasks (video QA, audio QA, pass-key; scenes, small-object video) in one folder, deterministically.

    python -m llava_deft.tasks --out data/tasks                   # preset "full": the GPU recipe's data
    python -m llava_deft.tasks --out data/tasks_small --preset small   # a few dozen samples each (CPU smoke)
    python -m llava_deft.tasks --out data/tasks --only passkey --force
    python -m llava_deft.tasks --out data/tasks --only scenes video_small   # the tasks not made by default
    bash scripts/make_tasks.sh                                     # the same, with the venv's python

Layout (each task's files are the ones its generator writes; see its module)::

    <out>/video_shapes/{train,test}.json, {train,test}/clips/*.mp4, meta.json
    <out>/audio_words/{train,test}.json, {train,test}/clips/*.wav, {train,test}_clips.json, meta.json
    <out>/passkey/{train,test}.json, meta.json
    <out>/scenes/{train,test}.json, {train,test}/images/*.png, meta.json
    <out>/video_small/  as video_shapes (shapes at half the size)
    <out>/tasks.json     what was asked for and what each task holds (records per split)

Without ``--only`` (``tasks=None``) the three of :data:`~llava_deft.tasks.DEFAULT_TASKS` are prepared
(configs/train/mix_tiny.yaml's data); ``scenes`` and ``video_small`` only when named.

The generators are the existing ones (``video_shapes.make_video_task``, ``audio_words.generate_audio_task``,
``passkey.make_passkey_task``, ``scenes.make_scenes_task``); this module picks their arguments by preset and caches: a task
folder whose ``meta.json`` records the same arguments is left as it is (``--force`` regenerates).
Before a task is regenerated its previous outputs are removed, so no clip of an older, larger run
survives. Every output is a function of the arguments (``--seed``), so two runs give the same files.

The audio task needs the ``espeak-ng`` program. Without it the command stops with
:class:`MissingToolError` saying how to install it, before anything is written; ``--skip-missing``
prepares the other tasks instead (the test suite uses the committed ``tests/fixtures/audio_task``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import LlavaDeftError
from . import DEFAULT_TASKS, TASK_NAMES

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The data of configs/train/mix_tiny.yaml. Pass-key passages are 128-512 tokens (the generator's
    # default is 256-1024) so that a sample fits configs/model/mix_tiny.yaml's max_length of 640.
    "full": {
        "video_shapes": {"n_train": 2000, "n_test": 500, "frames": 16, "fps": 8, "size": 64},
        "audio_words": {"n_train": 2000, "n_test": 500},
        "passkey": {"n_train": 2000, "n_test": 500, "min_tokens": 128, "max_tokens": 512},
        # 6,000 train / 600 test images with up to 5 questions each (one per type): about 29,000 / 2,900
        # questions, easy-VQA's order of magnitude; configs/train/scenes_deft.yaml trains on them.
        "scenes": {"n_train": 6000, "n_test": 600, "size": 96, "min_objects": 3, "max_objects": 6, "noise": 4,
                   "captions": True},
        "video_small": {"n_train": 2000, "n_test": 500, "frames": 16, "fps": 8, "size": 64, "object_scale": 0.5},
    },
    # A few dozen samples per task: the CPU smoke run of the mixed recipe, and quick eval checks.
    "small": {
        "video_shapes": {"n_train": 16, "n_test": 8, "frames": 16, "fps": 8, "size": 64},
        "audio_words": {"n_train": 24, "n_test": 8},
        "passkey": {"n_train": 32, "n_test": 8, "min_tokens": 96, "max_tokens": 192},
        "scenes": {"n_train": 32, "n_test": 8, "size": 96, "min_objects": 3, "max_objects": 6, "noise": 4, "captions": True},
        "video_small": {"n_train": 16, "n_test": 8, "frames": 16, "fps": 8, "size": 64, "object_scale": 0.5},
    },
}
"""Preset -> task -> keyword arguments of the task's generator (``seed`` is added from ``--seed``)."""

ESPEAK_INSTALL = (
    "install it (Debian/Ubuntu: `sudo apt-get install -y espeak-ng`; Fedora: `sudo dnf install espeak-ng`; "
    "macOS: `brew install espeak-ng`)"
)


class MissingToolError(LlavaDeftError, RuntimeError):
    """A program a task generator runs (espeak-ng) is not installed."""


def espeak_available() -> bool:
    """Whether the ``espeak-ng`` program is on PATH (checked without importing the audio generator, whose
    soundfile import a machine without audio libraries lacks)."""
    return shutil.which("espeak-ng") is not None


def _outputs(folder: Path) -> list[Path]:
    """What a generator wrote into a task folder (removed before regenerating it)."""
    names = ["meta.json", "train.json", "test.json", "train_clips.json", "test_clips.json", "train_captions.json",
             "test_captions.json", "train", "test"]
    return [folder / n for n in names if (folder / n).exists()]


def _clear(folder: Path) -> None:
    for p in _outputs(folder):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _cached(folder: Path, args: dict[str, Any]) -> bool:
    """True when ``folder/meta.json`` records ``args`` and both splits' JSON files exist."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file() or not all((folder / f"{s}.json").is_file() for s in ("train", "test")):
        return False
    meta = json.loads(meta_path.read_text())
    return all(meta.get(k) == v for k, v in args.items())


def _generate(task: str, folder: Path, args: dict[str, Any], progress: bool) -> None:
    if task in ("video_shapes", "video_small"):  # video_small: the same generator, object_scale 0.5
        from .video_shapes import make_video_task

        make_video_task(folder, progress=progress, **args)
    elif task == "audio_words":
        from .audio_words import generate_audio_task

        generate_audio_task(folder, progress=progress, force=True, workers=args.pop("workers", 8), **args)
    elif task == "passkey":
        from .passkey import make_passkey_task

        make_passkey_task(folder, progress=progress, **args)
    elif task == "scenes":
        from .scenes import make_scenes_task

        make_scenes_task(folder, progress=progress, **args)
    else:
        raise ValueError(f"unknown task {task!r}; the tasks are {list(TASK_NAMES)}")


def _records(folder: Path) -> dict[str, int]:
    return {s: len(json.loads((folder / f"{s}.json").read_text())) for s in ("train", "test")}


def prepare_tasks(
    out: str | Path,
    preset: str = "full",
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    force: bool = False,
    skip_missing: bool = False,
    progress: bool = True,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Generate ``tasks`` (default: :data:`~llava_deft.tasks.DEFAULT_TASKS`) under ``out`` with ``preset``'s arguments (per task, updated
    by ``overrides[task]``). Returns what is written to ``out/tasks.json``: per task its status
    ("generated", "cached" or "skipped" with the reason), its arguments and its records per split.

    Raises :class:`MissingToolError` when espeak-ng is missing and the audio task is asked for
    (unless ``skip_missing``), before any task is generated.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; the presets are {sorted(PRESETS)}")
    tasks = list(DEFAULT_TASKS if tasks is None else tasks)
    unknown = sorted(set(tasks) - set(TASK_NAMES)) + sorted(set(overrides or {}) - set(TASK_NAMES))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the tasks are {list(TASK_NAMES)}")
    out = Path(out)
    manifest: dict[str, Any] = {"preset": preset, "seed": seed, "tasks": {}}
    if "audio_words" in tasks:
        if not espeak_available():
            msg = f"espeak-ng is not installed: the audio task (audio_words) speaks its clips with it; {ESPEAK_INSTALL}"
            if not skip_missing:
                raise MissingToolError(f"{msg}, or pass --skip-missing to prepare the other tasks without it")
            tasks.remove("audio_words")
            manifest["tasks"]["audio_words"] = {"status": "skipped", "reason": msg}
    for task in tasks:
        args = {**PRESETS[preset][task], **(overrides or {}).get(task, {}), "seed": seed}
        folder = out / task
        t0 = time.perf_counter()
        if not force and _cached(folder, args):
            status = "cached"
        else:
            _clear(folder)
            _generate(task, folder, dict(args), progress)
            status = "generated"
        manifest["tasks"][task] = {
            "status": status, "folder": str(folder), "args": args, "records": _records(folder),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    out.mkdir(parents=True, exist_ok=True)
    # no timings in the file: the same arguments write the same bytes
    stable = {**manifest, "tasks": {t: {k: v for k, v in m.items() if k != "seconds"} for t, m in manifest["tasks"].items()}}
    (out / "tasks.json").write_text(json.dumps(stable, indent=1, sort_keys=True) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_deft.tasks", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder that receives one sub-folder per task")
    p.add_argument("--preset", default="full", choices=sorted(PRESETS), help="sizes (see PRESETS)")
    p.add_argument("--only", nargs="+", choices=TASK_NAMES,
                   help=f"prepare these tasks only (default: {' '.join(DEFAULT_TASKS)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="regenerate even when meta.json matches")
    p.add_argument("--skip-missing", action="store_true", help="skip the audio task when espeak-ng is missing")
    p.add_argument("--audio-format", default="wav", choices=("wav", "flac"),
                   help="audio clip files: flac is lossless and about half the size (same samples)")
    a = p.parse_args(argv)
    overrides = {"audio_words": {"audio_format": a.audio_format}} if a.audio_format != "wav" else None
    try:
        manifest = prepare_tasks(a.out, a.preset, a.only, a.seed, a.force, a.skip_missing, overrides=overrides)
    except MissingToolError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for task, m in manifest["tasks"].items():
        if m["status"] == "skipped":
            print(f"{task:13s} skipped: {m['reason']}")
        else:
            r = m["records"]
            print(f"{task:13s} {m['status']:9s} {r['train']:6d} train / {r['test']:5d} test records  {m['folder']}  ({m['seconds']:.1f}s)")
    print(f"wrote {Path(a.out) / 'tasks.json'}")
    return 0
