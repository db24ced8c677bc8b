"""Deterministic task generators (synthetic data written to disk in LLaVA's conversation JSON).

    video_shapes  moving-shape video QA          (video_shapes.py, PyAV + decord)
    audio_words   spoken colour/shape/number QA  (audio_words.py, espeak-ng)
    passkey       long-text pass-key retrieval   (passkey.py)
    scenes        multi-object image QA: relations, counts, attributes (scenes.py, Pillow)
    video_small   video_shapes with half-size shapes (video_shapes.py, ``object_scale=0.5``)

``python -m llava_deft.tasks --out data/tasks`` prepares the first three (:data:`DEFAULT_TASKS`, the
mixed recipe's data) in one folder (``prepare.py``); ``--only scenes video_small`` the others. Each task
lands in ``<out>/<task>/`` with ``train.json``, ``test.json`` and ``meta.json``.
This module imports nothing heavy: configs and error messages use the names below.
"""

from __future__ import annotations

import argparse
from pathlib import Path

TASK_NAMES = ("video_shapes", "audio_words", "passkey", "scenes", "video_small")
"""The generated tasks, by the folder each is written to under the prepare command's ``--out``."""

DEFAULT_TASKS = ("video_shapes", "audio_words", "passkey")
"""The tasks prepared (and scored by eval/tasks.py) when none are named: configs/train/mix_tiny.yaml's data."""

DEFAULT_TASKS_DIR = "data/tasks"


def prepare_command(out: str | Path = DEFAULT_TASKS_DIR, task: str | None = None) -> str:
    """The command that writes the default tasks under ``out`` (named in missing-data errors); with a
    ``task`` outside :data:`DEFAULT_TASKS`, the one that writes that task."""
    only = f" --only {task}" if task is not None and task not in DEFAULT_TASKS else ""
    return f"python -m llava_deft.tasks --out {out}{only}"


def qa_record(sample_id: str, media_key: str, path: str, question_type: str, question: str, answer: str,
              placeholder: str) -> dict:
    """One LLaVA conversation record of a generated task: a media file, one question and its answer."""
    return {
        "id": sample_id,
        media_key: path,
        "question_type": question_type,
        "conversations": [
            {"from": "human", "value": f"{placeholder}\n{question}"},
            {"from": "gpt", "value": answer},
        ],
    }


def task_parser(doc: str, out_help: str, train_help: str, test_help: str) -> argparse.ArgumentParser:
    """The flags every single-task generator takes: ``--out``, ``--n-train`` (2,000), ``--n-test`` (500), ``--seed``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0].split("\n")[0])
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--n-train", type=int, default=2000, help=train_help)
    p.add_argument("--n-test", type=int, default=500, help=test_help)
    p.add_argument("--seed", type=int, default=0)
    return p
