"""The training data a recipe's ``data:`` names (:class:`llava_deft.config.DataSpec`), as one dataset."""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any

from torch.utils.data import ConcatDataset, Subset

from ..config.model import LimitsConfig
from ..config.train import DataSpec
from ..errors import DatasetFormatError, MediaFileError
from ..tasks import TASK_NAMES, prepare_command
from .easyvqa import EasyVQADataset
from .llava_json import LlavaJsonDataset, LlavaJsonlDataset
from .passkey import PasskeyDataset
from .text_corpus import TextCorpusDataset


def build_dataset(spec: DataSpec, video: dict[str, Any] | None = None, sampling_rate: int | None = None,
                  limits: LimitsConfig | None = None, tokenizer=None, max_length: int | None = None):
    """The dataset a :class:`DataSpec` names. ``video`` is the model's frame sampling
    (``VideoConfig.sampling()``), ``sampling_rate`` its audio rate (``AudioConfig.sampling_rate()``)
    and ``limits`` its media limits (``ModelConfig.limits``; default ``LimitsConfig()``), for LLaVA
    JSON records with "image" / "video" / "audio" keys; ``tokenizer`` and ``max_length`` (the model's)
    cut a ``text`` source into blocks (``block_tokens``, default ``max_length``). A mix is a :class:`MixedDataset`; errors name
    the source (``data.sources.2 ('video_shapes', llava_json): ...``). A source that skipped invalid
    records (``skip_invalid``) prints how many and why."""
    if spec.type != "mix":
        return _build_source(spec, "data", video, sampling_rate, limits, tokenizer, max_length)
    parts = [_build_source(s, f"data.sources.{i}", video, sampling_rate, limits, tokenizer, max_length)
             for i, s in enumerate(spec.sources)]
    mixed = MixedDataset(parts, [s.label() for s in spec.sources])
    return _limit_repeat(mixed, spec.limit, spec.repeat)


def _build_source(spec: DataSpec, where: str, video: dict[str, Any] | None, sampling_rate: int | None,
                  limits: LimitsConfig | None = None, tokenizer=None, max_length: int | None = None):
    who = f"{where} ({spec.label()!r}, {spec.type})"
    if spec.type == "text":
        block = spec.block_tokens or max_length
        if tokenizer is None or block is None:
            raise ValueError(f"{who}: a text source needs the model's tokenizer and block_tokens (or max_length)")
        if max_length is not None and block > max_length:
            raise ValueError(f"{who}: block_tokens={block} is over the model's max_length={max_length}; lower it")
        try:
            ds = TextCorpusDataset(spec.path, tokenizer, block, split=spec.split, test_share=spec.test_share, seed=spec.seed)
        except (FileNotFoundError, DatasetFormatError) as err:
            raise type(err)(f"{who}: {err}") from err
        return _limit_repeat(ds, spec.limit, spec.repeat)
    if spec.type == "easyvqa":
        ds = EasyVQADataset(split=spec.split, limit=spec.limit, group_by_image=spec.group_by_image)
        return _limit_repeat(ds, None, spec.repeat)
    if spec.type == "passkey":
        ds = PasskeyDataset(spec.size, split=spec.split, seed=spec.seed, min_tokens=spec.min_tokens, max_tokens=spec.max_tokens,
                            needles=spec.needles)
        return _limit_repeat(ds, spec.limit, spec.repeat)
    path = Path(spec.path)
    if not path.is_file():
        hint = ""
        if path.parent.name in TASK_NAMES:
            hint = f"; generate the task data with `{prepare_command(path.parent.parent, path.parent.name)}`"
        raise FileNotFoundError(f"{who}: LLaVA JSON file '{path}' does not exist{hint}")
    kwargs: dict[str, Any] = dict(video or {})
    if sampling_rate is not None:
        kwargs["sampling_rate"] = sampling_rate
    if path.suffix == ".jsonl":  # one record per line, read lazily: corpora larger than memory
        if spec.skip_invalid:
            raise DatasetFormatError(f"{who}: skip_invalid checks every record at start, but a .jsonl source is read "
                                     f"lazily; validate the file first or drop skip_invalid")
        return _limit_repeat(LlavaJsonlDataset(path, spec.image_folder, **kwargs, limits=limits,
                                               trusted_paths=spec.trusted_paths), spec.limit, spec.repeat)
    try:
        ds = LlavaJsonDataset(path, spec.image_folder, **kwargs, limits=limits, skip_invalid=spec.skip_invalid,
                              trusted_paths=spec.trusted_paths)
    except (DatasetFormatError, MediaFileError) as err:
        raise type(err)(f"{who}: {err}") from err
    if ds.skipped:
        print(f"[data] {who}: {ds.skipped_summary()}")
    if len(ds) == 0:
        left = f" once {len(ds.skipped)} invalid record(s) were skipped" if ds.skipped else ""
        raise DatasetFormatError(f"{who}: '{path}' holds no records{left}; a source must give at least one sample")
    return _limit_repeat(ds, spec.limit, spec.repeat)


def _limit_repeat(ds, limit: int | None, repeat: int):
    if limit is not None and limit < len(ds):
        ds = Subset(ds, range(limit))
    return ConcatDataset([ds] * repeat) if repeat > 1 else ds


class MixedDataset(ConcatDataset):
    """Several training sources as one dataset: the concatenation of their items, in source order.

    ``names[i]`` and ``sizes[i]`` describe source ``i`` (its items after ``limit`` and ``repeat``);
    ``source_of(index)`` says which source an item comes from.
    """

    def __init__(self, parts: list, names: list[str]):
        super().__init__(parts)
        self.names = list(names)
        self.sizes = [len(p) for p in parts]

    def source_of(self, index: int) -> str:
        return self.names[bisect.bisect_right(self.cumulative_sizes, index % len(self))]

    def summary(self) -> str:
        return ", ".join(f"{n} {k}" for n, k in zip(self.names, self.sizes))
