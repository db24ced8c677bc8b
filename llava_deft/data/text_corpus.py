"""Plain-text corpora as causal-LM training and evaluation data (issue 18: the seeds' text LMs).

A corpus is a UTF-8 text file of documents -- paragraphs separated by blank lines, or, for a file in
the ``fortune`` format, entries separated by lines holding only ``%`` -- or the named default corpus
``fortunes``: the English quotations and literature excerpts of Debian's ``fortunes`` package
(``apt-get install fortunes``: about 2.5 MB of text in ``/usr/share/games/fortunes``; the offensive
``off/`` set of ``fortunes-off`` is never read). Nothing is generated and nothing is downloaded.

:class:`TextCorpusDataset` splits the documents into train and test by a seeded permutation (a
document is wholly in one split), tokenizes each document once, joins them with the tokenizer's
end-of-sequence id between documents and cuts the stream into blocks of ``block_tokens`` ids, as
transformers' ``run_clm.py`` groups texts; the last, shorter block is kept (the collator pads it), so no
token of the split is dropped. An item is a pre-tokenized LM sample::

    {"id": "fortunes/train/17", "input_ids": [...]}     # the collator's labels = its input ids

    ds = TextCorpusDataset("fortunes", tokenizer, block_tokens=256, split="test")
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

from torch.utils.data import Dataset

from ..errors import DatasetFormatError

FORTUNES_DIR = Path(os.environ.get("LLAVA_DEFT_FORTUNES_DIR", "/usr/share/games/fortunes"))
"""Where Debian's ``fortunes`` package puts its files (``LLAVA_DEFT_FORTUNES_DIR`` overrides it)."""

NAMED_CORPORA = {"fortunes": "Debian's `fortunes` package (apt-get install fortunes)"}
SPLITS = ("train", "test")
_SEPARATOR = re.compile(r"^%\s*$", re.MULTILINE)
_BLANK = re.compile(r"\n\s*\n")
MAX_CORPUS_BYTES = 1 << 30
"""A corpus file is read whole; larger ones belong in a ``.jsonl`` LLaVA source (read lazily)."""


def fortunes_files(folder: Path | None = None) -> list[Path]:
    """The English fortune files of ``folder`` (regular files; not the ``.dat`` indexes, not the ``.u8``
    links, not the ``off/`` subfolder), sorted by name (default folder: ``FORTUNES_DIR``).
    ``FileNotFoundError`` says how to install them."""
    folder = FORTUNES_DIR if folder is None else Path(folder)
    files = sorted(p for p in folder.glob("*") if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))
    if not files:
        raise FileNotFoundError(f"the default text corpus 'fortunes' is missing: no fortune files in '{folder}'; "
                                f"install Debian's package with `sudo apt-get install fortunes` (or point "
                                f"data.path at a text file of your own)")
    return files


def split_documents(text: str) -> list[str]:
    """Documents of a corpus text: ``%``-separated entries when the text has such lines, else paragraphs
    (blank-line separated); stripped, empty ones left out."""
    parts = _SEPARATOR.split(text) if _SEPARATOR.search(text) else _BLANK.split(text)
    return [p.strip() for p in parts if p.strip()]


def read_documents(source: str | Path) -> tuple[str, list[str]]:
    """(name, documents) of a named corpus or a text file. Errors name the file and the fix."""
    if str(source) in NAMED_CORPORA:
        docs = [d for f in fortunes_files() for d in split_documents(f.read_text(encoding="utf-8", errors="replace"))]
        return str(source), docs
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"text corpus '{path}' does not exist (give a UTF-8 text file or one of "
                                f"{sorted(NAMED_CORPORA)})")
    if path.stat().st_size > MAX_CORPUS_BYTES:
        raise DatasetFormatError(f"text corpus '{path}' is {path.stat().st_size} bytes, over {MAX_CORPUS_BYTES}; "
                                 f"split it or convert it to a .jsonl LLaVA source, which is read lazily")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetFormatError(f"text corpus '{path}' is not UTF-8 text (byte {err.start}): {err.reason}") from None
    docs = split_documents(text)
    if not docs:
        raise DatasetFormatError(f"text corpus '{path}' holds no text")
    return path.stem, docs


def split_indices(n: int, split: str, test_share: float, seed: int) -> list[int]:
    """The documents of ``split``: a seeded permutation of ``range(n)``, its first ``round(test_share * n)``
    (at least 1 when n > 1) are test, the rest train; each list in ascending document order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if not 0 < test_share < 1:
        raise ValueError(f"test_share must be in (0, 1), got {test_share}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = min(max(1, round(test_share * n)), n - 1) if n > 1 else 0
    chosen = order[:n_test] if split == "test" else order[n_test:]
    return sorted(chosen)


class TextCorpusDataset(Dataset):
    """Blocks of ``block_tokens`` token ids of one split of a text corpus (see the module docstring).

    Args:
        source: ``"fortunes"`` or a text file's path.
        tokenizer: the model's tokenizer (its ``eos_token_id`` separates documents).
        block_tokens: ids per item (the model's ``max_length`` in training).
        split: ``"train"`` or ``"test"``; ``test_share`` of the documents (seeded by ``seed``) are test.
        limit: keep only the first ``limit`` blocks.
    """

    def __init__(self, source: str | Path, tokenizer, block_tokens: int, split: str = "train",
                 test_share: float = 0.05, seed: int = 0, limit: int | None = None):
        if block_tokens < 2:
            raise ValueError(f"block_tokens must be >= 2 (a block predicts its ids from the ones before), got {block_tokens}")
        self.name, docs = read_documents(source)
        self.split, self.block_tokens = split, int(block_tokens)
        picked = [docs[i] for i in split_indices(len(docs), split, test_share, seed)]
        if not picked:
            raise DatasetFormatError(f"text corpus '{source}' has {len(docs)} document(s): too few for a {split} split")
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos token to separate documents")
        stream: list[int] = []
        # split_special_tokens: a document's "<image>" or "</s>" is text, never a placeholder or an end
        for ids in tokenizer(picked, add_special_tokens=False, split_special_tokens=True)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
        self.num_documents, self.num_tokens = len(picked), len(stream)
        self.blocks = [stream[i:i + self.block_tokens] for i in range(0, len(stream), self.block_tokens)]
        if limit is not None:
            self.blocks = self.blocks[:limit]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"block {i} of {len(self)}")
        i %= len(self)
        return {"id": f"{self.name}/{self.split}/{i}", "input_ids": list(self.blocks[i])}
