"""LLaVA's conversation JSON as a dataset (media read lazily, relative to the media folder)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..encoders.audio import SAMPLING_RATE
from ..errors import DatasetFormatError, MediaFileError
from ..modality import MODALITIES, MediaOptions
from .records import parse_llava_record


class LlavaJsonDataset(Dataset):
    """LLaVA's conversation JSON: a list of ``{"id", "image" (str | list, optional), "video" (str |
    list, optional), "audio" (str | list, optional), "text" (str | list, optional), "conversations":
    [{"from": "human"|"gpt"|"system", "value": str}]}`` with image, video and audio paths relative to
    ``image_folder`` (the media folder) and ``text`` the passage(s) themselves.

    The file and every record are validated here (``DatasetFormatError`` naming the file, the record
    index and id, and the key); media are loaded lazily in ``__getitem__`` (``MediaFileError`` naming
    the file, the sample id and the JSON file when one is missing or cannot be decoded; a video or
    audio file that exists but cannot be used raises ``VideoError`` / ``AudioError``, also naming
    them). Videos are read with ``load_video(path, num_frames, fps, max_frames)`` into ``VideoClip``s
    under the sample's ``"videos"``, audio with ``load_audio(path, sampling_rate)`` into ``(S,)``
    float32 waveforms under ``"audios"``; passages go to ``"texts"`` as they are. JSON only: nothing
    is ever unpickled.
    """

    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path | None = None,
        num_frames: int = 8,
        fps: float | None = None,
        max_frames: int | None = None,
        sampling_rate: int = SAMPLING_RATE,
    ):
        self.options = MediaOptions(num_frames, fps, max_frames, int(sampling_rate))
        self.json_path = Path(json_path)
        self.image_folder = Path(image_folder) if image_folder is not None else self.json_path.parent
        if not self.json_path.is_file():
            raise FileNotFoundError(f"LLaVA JSON file '{self.json_path}' does not exist")
        try:
            data = json.loads(self.json_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetFormatError(f"{self.json_path}: not valid JSON ({err})") from err
        if not isinstance(data, list):
            raise DatasetFormatError(
                f"{self.json_path}: expected a JSON list of records, got {type(data).__name__}"
            )
        self.records = [parse_llava_record(r, i, self.json_path) for i, r in enumerate(data)]
        has_files = any(media[k] for _, _, media in self.records for k, kind in MODALITIES.items() if kind.from_files)
        if has_files and not self.image_folder.is_dir():
            raise MediaFileError(
                f"image folder '{self.image_folder}' (for {self.json_path}) does not exist"
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample_id, messages, media = self.records[index]
        where = f"(sample {sample_id!r} of {self.json_path})"
        sample: dict[str, Any] = {"id": sample_id, "messages": [dict(m) for m in messages]}
        for key, kind in MODALITIES.items():
            items = media[key]
            sample[kind.sample_key] = (
                [kind.load(self.image_folder / p, self.options, where) for p in items] if kind.from_files else list(items)
            )
        return sample
