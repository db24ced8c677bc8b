"""LLaVA's conversation JSON as a dataset (records and media files checked up front, media decoded
lazily, every path inside the media folder)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..config.model import LimitsConfig
from ..encoders.audio import SAMPLING_RATE
from ..errors import DatasetFormatError, MediaFileError, MediaPathError
from ..modality import MODALITIES, MediaOptions
from .records import parse_llava_record, record_error

MAX_LISTED = 10
"""Bad records a ``DatasetFormatError`` lists (the rest are counted)."""

_TRUST = "set trusted_paths: true in the data spec (LlavaJsonDataset(trusted_paths=True)) if you trust this file's paths"


@dataclass(frozen=True)
class SkippedRecord:
    """A record ``skip_invalid`` left out: its position in the JSON list, its id (None when it has no
    valid one) and why."""

    index: int
    id: str | None
    reason: str


class LlavaJsonDataset(Dataset):
    """LLaVA's conversation JSON: a list of ``{"id", "image" (str | list, optional), "video" (str |
    list, optional), "audio" (str | list, optional), "text" (str | list, optional), "conversations":
    [{"from": "human"|"gpt"|"system", "value": str}]}`` with image, video and audio paths relative to
    ``image_folder`` (the media folder) and ``text`` the passage(s) themselves.

    Every record is validated when the dataset is built, all at once, and so is every media file it
    names (a stat, no decoding): each path must lie inside the media folder once resolved (no
    absolute path, no ``..`` or symlink leading out: ``MediaPathError``, whose message never says
    whether the outside path exists) and be an existing regular file. All bad records are reported
    in one ``DatasetFormatError`` (the first ``MAX_LISTED``, each naming the JSON file, the record's
    index and id and the key, then a count; a ``MediaPathError`` when every problem is a path that
    leads out), or, with ``skip_invalid=True``, left out: ``skipped`` lists them and
    ``skipped_summary()`` says how many and why. ``trusted_paths=True`` accepts absolute paths and
    paths out of the media folder (a file you wrote yourself).

    Media are decoded lazily in ``__getitem__`` (the path checked again; ``MediaFileError`` naming
    the file, the sample id and the JSON file when one cannot be decoded; a video or audio file that
    exists but cannot be used raises ``VideoError`` / ``AudioError``, one over ``limits``
    (``LimitsConfig``, the model config's ``limits:``) ``MediaLimitError``, also naming them). Videos
    are read with ``load_video(path, num_frames, fps, max_frames)`` into ``VideoClip``s under the
    sample's ``"videos"``, audio with ``load_audio(path, sampling_rate)`` into ``(S,)`` float32
    waveforms under ``"audios"``; passages go to ``"texts"`` as they are. JSON only: nothing is ever
    unpickled.
    """

    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path | None = None,
        num_frames: int = 8,
        fps: float | None = None,
        max_frames: int | None = None,
        sampling_rate: int = SAMPLING_RATE,
        *,
        limits: LimitsConfig | None = None,
        skip_invalid: bool = False,
        trusted_paths: bool = False,
        options: MediaOptions | None = None,
    ):
        # ``options`` (a model's ``processors.media``) replaces the four reading arguments before it
        self.options = options or MediaOptions(num_frames, fps, max_frames, int(sampling_rate), limits or LimitsConfig())
        self.json_path = Path(json_path)
        self.image_folder = Path(image_folder) if image_folder is not None else self.json_path.parent
        self.trusted_paths = bool(trusted_paths)
        if not self.json_path.is_file():
            raise FileNotFoundError(f"LLaVA JSON file '{self.json_path}' does not exist")
        try:
            data = json.loads(self.json_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetFormatError(f"{self.json_path}: not valid JSON ({err})") from err
        except RecursionError as err:
            raise DatasetFormatError(f"{self.json_path}: not valid JSON (nested too deeply to parse)") from err
        if not isinstance(data, list):
            raise DatasetFormatError(
                f"{self.json_path}: expected a JSON list of records, got {type(data).__name__}"
            )
        parsed, problems = [], []
        for i, r in enumerate(data):
            try:
                parsed.append((i, *parse_llava_record(r, i, self.json_path)))
            except DatasetFormatError as err:
                problems.append((i, _record_id(r), err))
        has_files = any(media[k] for *_, media in parsed for k, kind in MODALITIES.items() if kind.from_files)
        if has_files and not self.image_folder.is_dir():
            raise MediaFileError(
                f"image folder '{self.image_folder}' (for {self.json_path}) does not exist"
            )
        self.root = self.image_folder.resolve()
        self.records: list[tuple[int, str, list[dict], dict[str, list[str]]]] = []
        for record in parsed:
            try:
                self._check_files(record)
            except DatasetFormatError as err:
                problems.append((record[0], record[1], err))
                continue
            self.records.append(record)
        problems.sort(key=lambda p: p[0])
        prefix = f"{self.json_path}: "
        self.total = len(data)
        self.skipped = [SkippedRecord(i, sid, str(err).removeprefix(prefix)) for i, sid, err in problems]
        """The records left out by ``skip_invalid``, in file order."""
        if problems and not skip_invalid:
            raise _invalid_records(self.json_path, len(data), [err for *_, err in problems])

    def media_path(self, index: int, sample_id: str, key: str, item: str) -> Path:
        """The resolved file of a record's media path ``item`` (under ``key``), refused with
        ``MediaPathError`` when it is absolute or leads outside the media folder (unless
        ``trusted_paths``). Nothing is opened; the message is the same whether the outside path
        exists or not."""
        def refuse(what: str, cls=MediaPathError) -> DatasetFormatError:
            return record_error(self.json_path, index, sample_id, f"key '{key}' path {item!r} {what}", cls)

        inside = f"media paths must lie inside the media folder '{self.image_folder}'; {_TRUST}"
        if not self.trusted_paths:
            if os.path.isabs(item):
                raise refuse(f"is absolute: {inside}")
            norm = os.path.normpath(item)
            if norm == os.pardir or norm.startswith(os.pardir + os.sep):
                raise refuse(f"leads outside the media folder: {inside}")
        try:
            path = (self.root / item).resolve()
        except (OSError, ValueError, RuntimeError) as err:  # a NUL byte, a symlink loop
            raise refuse(f"is not a usable path ({type(err).__name__})", DatasetFormatError) from err
        if not self.trusted_paths and not path.is_relative_to(self.root):
            raise refuse(f"leads outside the media folder: {inside}")
        return path

    def _check_files(self, record) -> None:
        """Every media file of a parsed record: inside the media folder and an existing regular file."""
        index, sample_id, _, media = record
        for key, kind in MODALITIES.items():
            if not kind.from_files:
                continue
            for item in media[key]:
                path = self.media_path(index, sample_id, key, item)
                if not path.is_file():
                    what = "is not a regular file" if path.exists() else "does not exist"
                    raise record_error(self.json_path, index, sample_id,
                                       f"key '{key}' file {item!r} {what} (in the media folder '{self.image_folder}')")

    def skipped_summary(self) -> str:
        """How many records ``skip_invalid`` left out and why (the first reasons), or '' when none."""
        if not self.skipped:
            return ""
        reasons = "; ".join(s.reason for s in self.skipped[:3]) + ("; ..." if len(self.skipped) > 3 else "")
        return f"skipped {len(self.skipped)} of {self.total} record(s) of '{self.json_path}' as invalid: {reasons}"

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._sample(self.records[index])

    def _sample(self, record: tuple[int, str, list[dict], dict[str, list[str]]]) -> dict[str, Any]:
        """A parsed record -> the collator's sample (media decoded, each path checked again)."""
        record_index, sample_id, messages, media = record
        where = f"(sample {sample_id!r} of {self.json_path})"
        sample: dict[str, Any] = {"id": sample_id, "messages": [dict(m) for m in messages]}
        for key, kind in MODALITIES.items():
            items = media[key]
            sample[kind.sample_key] = [
                kind.load(self.media_path(record_index, sample_id, key, p), self.options, where) for p in items
            ] if kind.from_files else list(items)
        return sample


def _record_id(record: Any) -> str | None:
    """A raw record's id for ``SkippedRecord``, when it has a usable one."""
    sample_id = record.get("id") if isinstance(record, dict) else None
    return str(sample_id) if isinstance(sample_id, (str, int)) and not isinstance(sample_id, bool) else None


def _invalid_records(json_path: Path, total: int, errors: list[DatasetFormatError]) -> DatasetFormatError:
    """One error for every bad record of ``json_path``: of their common type (``MediaPathError`` when
    every one is a path leading out, else ``DatasetFormatError``), the first ``MAX_LISTED`` listed."""
    cls = type(errors[0]) if all(type(e) is type(errors[0]) for e in errors) else DatasetFormatError
    skip = "skip_invalid: true in the data spec, LlavaJsonDataset(skip_invalid=True)"
    if len(errors) == 1:  # one line
        err = cls(f"{errors[0]} (1 of {total} record(s) is invalid: fix it, or leave it out with {skip})")
    else:
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        err = cls(
            f"{json_path}: {len(errors)} of {total} record(s) are invalid (fix them, or leave them out with {skip}):\n  "
            + "\n  ".join(str(e) for e in errors[:MAX_LISTED]) + more
        )
    err.problems = list(errors)
    return err


class LlavaJsonlDataset(LlavaJsonDataset):
    """LLaVA records one per line (JSON Lines), read lazily: for corpora larger than memory.

    Building it scans the file once for where each non-blank line starts (8 bytes a record, no parsing);
    ``__getitem__`` seeks to the line, parses and validates that one record exactly as
    :class:`LlavaJsonDataset` validates every record up front (errors name the file, the line, the id and
    the key; media paths stay inside the media folder unless ``trusted_paths``) and decodes its media. A
    map-style dataset: the trainer's resumable sampler, shuffling and worker processes work unchanged
    (each process opens its own handle). ``skip_invalid`` needs every record checked at start and is
    refused here: validate the file first, or keep it a ``.json`` list.
    """

    def __init__(self, json_path: str | Path, image_folder: str | Path | None = None, *,
                 limits: LimitsConfig | None = None, trusted_paths: bool = False,
                 options: MediaOptions | None = None, **reading: Any):
        self.options = options or MediaOptions(reading.get("num_frames", 8), reading.get("fps"),
                                               reading.get("max_frames"), int(reading.get("sampling_rate", SAMPLING_RATE)),
                                               limits or LimitsConfig())
        self.json_path = Path(json_path)
        self.image_folder = Path(image_folder) if image_folder is not None else self.json_path.parent
        self.root = self.image_folder.resolve()
        self.trusted_paths = bool(trusted_paths)
        if not self.json_path.is_file():
            raise FileNotFoundError(f"LLaVA JSON Lines file '{self.json_path}' does not exist")
        offsets, lines, pos = [], [], 0
        with self.json_path.open("rb") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(pos)
                    lines.append(number)
                pos += len(line)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._lines = np.asarray(lines, dtype=np.int64)
        self.total, self.skipped = len(offsets), []
        self._handle = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self._offsets)

    def _file(self):
        if self._handle is None or self._pid != os.getpid():  # one handle per (worker) process
            self._handle, self._pid = self.json_path.open("rb"), os.getpid()
        return self._handle

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None, "_pid": None}

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records of '{self.json_path}'")
        index %= len(self)
        f = self._file()
        f.seek(int(self._offsets[index]))
        raw = f.readline()
        where = f"{self.json_path}: line {int(self._lines[index])}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            why = "nested too deeply to parse" if isinstance(err, RecursionError) else str(err)
            raise DatasetFormatError(f"{where}: not a JSON record ({why})") from None
        try:
            parsed = (index, *parse_llava_record(record, index, self.json_path))
            self._check_files(parsed)
        except DatasetFormatError as err:
            raise type(err)(f"{where}: {str(err).removeprefix(f'{self.json_path}: ')}") from None
        return self._sample(parsed)

