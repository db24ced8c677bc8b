"""What an evaluation (or a sweep) is scored on: a built-in task or any LLaVA-JSON train/test pair.

    EvalData(task="scenes")                                      # data/tasks/scenes/{train,test}.json
    EvalData(task="easyvqa")                                     # the bundled easy-VQA
    EvalData(train="my/train.json", test="my/test.json", image_folder="my")   # a user's own pair
    load_dataset(spec, model, split="test")                      # items with their question_type

Built-in tasks are ``easyvqa`` and the generated ones (:data:`llava_deft.tasks.TASK_NAMES`, written by
``python -m llava_deft.tasks --out <tasks_dir>``). A record's question type is its ``question_type``
key (for the audio task, whose records have none, the last part of its id).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from torch.utils.data import Dataset

from ..config.base import Strict
from ..data import EasyVQADataset, LlavaJsonDataset
from ..errors import TaskDataError
from ..tasks import DEFAULT_TASKS, DEFAULT_TASKS_DIR, TASK_NAMES, prepare_command
from .loop import first

__all__ = ["BUILTIN_TASKS", "EvalData", "TaskSplit", "load_dataset", "question_type", "task_json"]

BUILTIN_TASKS = (*TASK_NAMES, "easyvqa")
"""Tasks known by name: the generated ones, then the bundled easy-VQA."""


class EvalData(Strict):
    """The data of an evaluation: ``task`` (a built-in name) or ``train``/``test`` (LLaVA-JSON files,
    media relative to ``image_folder``, by default each file's folder). ``limit``: first N test
    questions, after the first ``skip`` (a held-out part of the test split: choose settings on one part,
    report on another). ``train`` is what a sweep's training runs learn from (with ``task``: the recipe's data)."""

    task: str | None = None
    tasks_dir: str = DEFAULT_TASKS_DIR
    train: str | None = None
    test: str | None = None
    image_folder: str | None = None
    limit: int | None = Field(None, gt=0)
    skip: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _one_source(self) -> EvalData:
        if self.task is None and self.test is None:
            raise ValueError("data needs `task` (one of " + ", ".join(BUILTIN_TASKS) + ") or a `test` LLaVA-JSON file")
        if self.task is not None and (self.test is not None or self.train is not None):
            raise ValueError("data: give `task` or `train`/`test` files, not both")
        if self.task is not None and self.task not in BUILTIN_TASKS:
            raise ValueError(f"data.task {self.task!r} is not a built-in task; choose one of {list(BUILTIN_TASKS)} "
                             f"or give `train`/`test` LLaVA-JSON files")
        return self

    @property
    def label(self) -> str:
        return self.task or Path(self.test).parent.name or Path(self.test).stem

    def check(self, split: str = "test") -> None:
        """Raise :class:`TaskDataError` naming the file (and the command that writes a task) when the split's
        JSON is missing; nothing is loaded."""
        if self.task == "easyvqa":
            return
        if self.task is not None:
            task_json(Path(self.tasks_dir), self.task, split)
            return
        path = self.test if split == "test" else self.train
        if path is None:
            raise TaskDataError(f"data has no `{split}` file; set data.{split} to a LLaVA-JSON file")
        if not Path(path).is_file():
            raise TaskDataError(f"data.{split} '{path}' does not exist; give the LLaVA-JSON file of the {split} split")

    def train_overrides(self) -> list[str]:
        """Overrides that make a training recipe learn from ``train`` (none for a built-in task: the recipe
        names its own data)."""
        if self.task is not None or self.train is None:
            return []
        spec = {"type": "llava_json", "path": str(Path(self.train).resolve())}
        if self.image_folder is not None:
            spec["image_folder"] = str(Path(self.image_folder).resolve())
        return ["data=" + json.dumps(spec)]


class TaskSplit(Dataset):
    """A LLaVA-JSON split whose items carry their ``question_type``."""

    def __init__(self, task: str, base: LlavaJsonDataset):
        self.task, self.base = task, base
        raw = json.loads(base.json_path.read_text())
        # records are (index in the file, id, conversations, media); skip_invalid may have left some out
        self.question_types = [question_type(task, raw[rec[0]]) for rec in base.records]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.base[index], "question_type": self.question_types[index]}


def question_type(task: str, record: dict) -> str:
    """A record's question type: its ``question_type`` key; for the audio task (whose records have
    none) the last part of its id (``audio_words-test-000000-color`` -> ``color``)."""
    if "question_type" in record:
        return str(record["question_type"])
    if task == "audio_words":
        return str(record["id"]).rsplit("-", 1)[-1]
    return "all"


def task_json(tasks_dir: Path, task: str, split: str) -> Path:
    """``<tasks_dir>/<task>/<split>.json``; :class:`TaskDataError` naming the command that writes it."""
    path = Path(tasks_dir) / task / f"{split}.json"
    if not path.is_file():
        where = "the folder does not exist" if not (Path(tasks_dir) / task).is_dir() else f"it has no {split}.json"
        raise TaskDataError(
            f"task {task!r}: '{path}' does not exist ({where}); generate the tasks with "
            f"`{prepare_command(tasks_dir, task)}` (or `bash scripts/make_tasks.sh --out {tasks_dir}"
            f"{'' if task in DEFAULT_TASKS else f' --only {task}'}`), "
            f"or point --tasks-dir at the folder that holds them"
        )
    return path


def load_task(model, task: str, tasks_dir: str | Path, split: str, limit: int | None, skip: int = 0) -> Dataset:
    """The dataset of a built-in ``task``'s ``split``; videos and audio are read the way the model's config says."""
    if task == "easyvqa":
        ds: Dataset = EasyVQADataset(split)
    else:
        tasks_dir = Path(tasks_dir)
        ds = TaskSplit(task, LlavaJsonDataset(task_json(tasks_dir, task, split), tasks_dir / task,
                                              options=model.processors.media))
    return first(ds, limit, skip)


def load_dataset(spec: EvalData, model, split: str = "test") -> Dataset:
    """The items of ``spec``'s ``split`` (the first ``spec.limit`` of the test split), read the way the
    model's config says; each carries its ``question_type``."""
    spec.check(split)
    if spec.task is not None:
        test = split == "test"
        return load_task(model, spec.task, spec.tasks_dir, split, spec.limit if test else None, spec.skip if test else 0)
    path = Path(spec.test if split == "test" else spec.train)
    folder = Path(spec.image_folder) if spec.image_folder is not None else None
    ds = TaskSplit(spec.label, LlavaJsonDataset(path, folder, options=model.processors.media))
    return first(ds, spec.limit if split == "test" else None, spec.skip if split == "test" else 0)
