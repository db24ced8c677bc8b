"""Deterministic task generators (synthetic data written to disk in LLaVA's conversation JSON).

    video_shapes  moving-shape video QA          (video_shapes.py, PyAV + decord)
    audio_words   spoken colour/shape/number QA  (audio_words.py, espeak-ng)
    passkey       long-text pass-key retrieval   (passkey.py)

``python -m llava_deft.tasks --out data/tasks`` prepares all three in one folder (``prepare.py``);
each task lands in ``<out>/<task>/`` with ``train.json``, ``test.json`` and ``meta.json``.
This module imports nothing heavy: configs and error messages use the names below.
"""

from __future__ import annotations

import argparse
from pathlib import Path

TASK_NAMES = ("video_shapes", "audio_words", "passkey")
"""The generated tasks, by the folder each is written to under the prepare command's ``--out``."""

DEFAULT_TASKS_DIR = "data/tasks"


def prepare_command(out: str | Path = DEFAULT_TASKS_DIR) -> str:
    """The command that writes every generated task under ``out`` (named in missing-data errors)."""
    return f"python -m llava_deft.tasks --out {out}"


def task_parser(doc: str, out_help: str, train_help: str, test_help: str) -> argparse.ArgumentParser:
    """The flags every single-task generator takes: ``--out``, ``--n-train`` (2,000), ``--n-test`` (500), ``--seed``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0].split("\n")[0])
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--n-train", type=int, default=2000, help=train_help)
    p.add_argument("--n-test", type=int, default=500, help=test_help)
    p.add_argument("--seed", type=int, default=0)
    return p
