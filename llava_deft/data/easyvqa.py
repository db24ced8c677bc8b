"""easy-VQA (shipped in the ``easy_vqa`` package): the dataset, its question types, and an export to LLaVA JSON."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import easy_vqa
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..modality import PLACEHOLDERS, load_rgb

EASYVQA_SHAPES = frozenset({"circle", "rectangle", "triangle"})
"""The shape words among easy-VQA's answers; the other non yes/no answers are colours."""



def easyvqa_question_types(answers: Sequence[str]) -> dict[str, str]:
    """Map each answer of the easy-VQA vocabulary to its question type: "yes/no", "shape" or "color"."""
    types = {}
    for answer in answers:
        if answer in ("yes", "no"):
            types[answer] = "yes/no"
        elif answer in EASYVQA_SHAPES:
            types[answer] = "shape"
        else:
            types[answer] = "color"
    return types


def _easyvqa_split(split: str) -> tuple[list[str], list[str], list[int], dict[int, str]]:
    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"easy-VQA split must be 'train' or 'test', got {split!r}")
    return list(questions), list(answers), [int(i) for i in image_ids], dict(paths)


def _easyvqa_messages(question: str, answer: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": f"{PLACEHOLDERS['image']}\n{question}"},
        {"role": "assistant", "content": answer},
    ]


class EasyVQADataset(Dataset):
    """The easy-VQA dataset shipped in the ``easy_vqa`` package (38,575 train / 9,673 test questions on
    4,000 / 1,000 64×64 images). Items are samples plus ``question_type`` ("shape", "color", "yes/no").

    ``group_by_image=True`` makes one multi-turn conversation per image (its questions in a fixed
    shuffled order, the image once in the first turn), as LLaVA's instruction data is: the image is
    encoded once for all its questions, which makes an epoch several times cheaper. Items then carry
    ``question_type`` "mixed". Evaluation uses the default, one question per item.

    Decoded images are cached in memory on first use (at most 5,000 small PNGs).
    """

    def __init__(self, split: str = "train", limit: int | None = None, group_by_image: bool = False, seed: int = 0):
        questions, answers, image_ids, self._paths = _easyvqa_split(split)
        if limit is not None:
            questions, answers, image_ids = questions[:limit], answers[:limit], image_ids[:limit]
        self.split = split
        self.questions, self.targets, self.image_ids = questions, answers, image_ids
        self.answers: list[str] = list(easy_vqa.get_answers())
        """The answer vocabulary (13 words)."""
        types = easyvqa_question_types(self.answers)
        self.question_types: list[str] = [types[a] for a in answers]
        self._cache: dict[int, Image.Image] = {}
        self.group_by_image = group_by_image
        self.groups: list[list[int]] = []
        if group_by_image:
            by_image: dict[int, list[int]] = {}
            for q, img in enumerate(image_ids):
                by_image.setdefault(img, []).append(q)
            g = torch.Generator().manual_seed(seed)
            self.groups = [
                [qs[j] for j in torch.randperm(len(qs), generator=g).tolist()] for _, qs in sorted(by_image.items())
            ]

    def __len__(self) -> int:
        return len(self.groups) if self.group_by_image else len(self.questions)

    def image(self, image_id: int) -> Image.Image:
        """The decoded RGB image ``image_id`` (cached; a copy is returned so callers may modify it)."""
        if image_id not in self._cache:
            self._cache[image_id] = load_rgb(Path(self._paths[image_id]))
        return self._cache[image_id].copy()

    def image_key(self, image_id: int) -> str:
        """The cache key of image ``image_id`` (a sample's ``image_keys`` entry)."""
        return f"easyvqa/{self.split}/{image_id}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for easy-VQA {self.split} ({len(self)} items)")
        index %= len(self)
        if self.group_by_image:
            qs = self.groups[index]
            messages = _easyvqa_messages(self.questions[qs[0]], self.targets[qs[0]])
            for q in qs[1:]:
                messages += [{"role": "user", "content": self.questions[q]}, {"role": "assistant", "content": self.targets[q]}]
            image_id = self.image_ids[qs[0]]
            return {
                "id": f"easyvqa-{self.split}-image{image_id}",
                "messages": messages,
                "images": [self.image(image_id)],
                "image_keys": [self.image_key(image_id)],
                "question_type": "mixed",
            }
        image_id = self.image_ids[index]
        return {
            "id": f"easyvqa-{self.split}-{index}",
            "messages": _easyvqa_messages(self.questions[index], self.targets[index]),
            "images": [self.image(image_id)],
            "image_keys": [self.image_key(image_id)],
            "question_type": self.question_types[index],
        }


def export_easyvqa(out_dir: str | Path, split: str = "train", limit: int | None = None) -> Path:
    """Write easy-VQA ``split`` as LLaVA conversation JSON: ``{out_dir}/{split}.json`` with images
    copied to ``{out_dir}/images/{split}/``. Returns the JSON path; load it with
    ``LlavaJsonDataset(path, Path(out_dir) / "images")`` (same ids and messages as ``EasyVQADataset``).
    """
    out_dir = Path(out_dir)
    questions, answers, image_ids, paths = _easyvqa_split(split)
    if limit is not None:
        questions, answers, image_ids = questions[:limit], answers[:limit], image_ids[:limit]
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    for image_id in sorted(set(image_ids)):
        shutil.copyfile(paths[image_id], image_dir / f"{image_id}.png")
    records = [
        {
            "id": f"easyvqa-{split}-{i}",
            "image": f"{split}/{image_id}.png",
            "conversations": [
                {"from": "human", "value": f"{PLACEHOLDERS['image']}\n{q}"},
                {"from": "gpt", "value": a},
            ],
        }
        for i, (q, a, image_id) in enumerate(zip(questions, answers, image_ids))
    ]
    json_path = out_dir / f"{split}.json"
    json_path.write_text(json.dumps(records, ensure_ascii=False))
    return json_path
