"""Pass-key passages generated on the fly as a training source (no disk)."""

from __future__ import annotations

from torch.utils.data import Dataset

from ..config.train import check_passkey_lengths
from ..tasks.passkey import SPLITS, make_sample
from ..modality import MODALITIES
from .records import parse_llava_record


class PasskeyDataset(Dataset):
    """``size`` pass-key passages generated on the fly, no disk: item ``i`` is
    ``make_sample(seed, split, i, min_tokens, max_tokens, needles)`` as a training sample, exactly what
    ``LlavaJsonDataset`` gives for that record in a JSON written by :func:`generate_split` (same id,
    messages and ``"texts"``; no images, videos or audios).

    A training source as large as wanted: the written train split holds 2,000 passages, few enough to
    be memorised. About 3 ms an item (128-512 tokens, one CPU core; about 22 ms at 8,192 tokens).
    ``needles=k > 1`` hides k labelled keys in each passage and asks for one of them (multi-needle
    retrieval, see :mod:`llava_deft.tasks.passkey`).

        ds = PasskeyDataset(100_000, split="train")   # ds[i]["texts"] == [passage i]
        ds = PasskeyDataset(100_000, min_tokens=2048, max_tokens=8192, needles=4)
    """

    def __init__(self, size: int, split: str = "train", seed: int = 0, min_tokens: int = 128, max_tokens: int = 512,
                 needles: int = 1):
        if size <= 0:
            raise ValueError(f"size must be > 0, got {size}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        check_passkey_lengths(min_tokens, max_tokens, needles)
        self.size, self.split, self.seed = size, split, seed
        self.min_tokens, self.max_tokens, self.needles = min_tokens, max_tokens, needles

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} pass-key passages")
        index %= self.size
        record = make_sample(self.seed, self.split, index, self.min_tokens, self.max_tokens, self.needles)
        where = f"pass-key generator (split {self.split!r}, seed {self.seed})"
        sample_id, messages, media = parse_llava_record(record, index, where)
        return {"id": sample_id, "messages": messages, **{kind.sample_key: list(media[key]) for key, kind in MODALITIES.items()}}
