"""Deterministic task generators (synthetic data written to disk in LLaVA's conversation JSON).

    video_shapes  moving-shape video QA          (video_shapes.py, PyAV + decord)
    audio_words   spoken colour/shape/number QA  (audio_words.py, espeak-ng)
    passkey       long-text pass-key retrieval   (passkey.py)

``python -m llava_deft.tasks --out data/tasks`` prepares all three in one folder (``prepare.py``);
each task lands in ``<out>/<task>/`` with ``train.json``, ``test.json`` and ``meta.json``.
This module imports nothing heavy: configs and error messages use the names below.
"""

from __future__ import annotations

from pathlib import Path

TASK_NAMES = ("video_shapes", "audio_words", "passkey")
"""The generated tasks, by the folder each is written to under the prepare command's ``--out``."""

DEFAULT_TASKS_DIR = "data/tasks"


def prepare_command(out: str | Path = DEFAULT_TASKS_DIR) -> str:
    """The command that writes every generated task under ``out`` (named in missing-data errors)."""
    return f"python -m llava_deft.tasks --out {out}"
