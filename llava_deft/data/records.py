"""LLaVA conversation records: validation of one record into (id, messages, media).

Light on purpose (json-level checks, no media decoding): the pass-key generator uses it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DatasetFormatError
from ..modality import MODALITIES

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
"""LLaVA JSON ``from`` value → chat-template role."""


def record_error(json_path: Path, index: int, sample_id: Any, what: str,
                 cls: type[DatasetFormatError] = DatasetFormatError) -> DatasetFormatError:
    """``{json_path}: record {index} (id {sample_id!r}): {what}`` as a ``cls`` (id left out when None)."""
    who = f"record {index}" + (f" (id {sample_id!r})" if sample_id is not None else "")
    return cls(f"{json_path}: {who}: {what}")


def parse_llava_record(record: Any, index: int, json_path: Path) -> tuple[str, list[dict], dict[str, list[str]]]:
    """Validate one LLaVA record; return (id, messages, media) where ``media`` maps each modality key
    (``MODALITIES``) to the record's items: relative paths for media read from files, the passages
    themselves for ``text``. A system turn may only come first, and the conversation must hold one
    placeholder per item of each kind (``<image>`` per image, ...)."""

    def fail(what: str, sample_id: Any = None) -> DatasetFormatError:
        return record_error(json_path, index, sample_id, what)

    if not isinstance(record, dict):
        raise fail(f"expected an object with 'id' and 'conversations', got {type(record).__name__}")
    if "id" not in record:
        raise fail("key 'id' is missing")
    sample_id = record["id"]
    if not isinstance(sample_id, (str, int)) or isinstance(sample_id, bool):
        raise fail(f"key 'id' must be a string or integer, got {type(sample_id).__name__}")
    sample_id = str(sample_id)
    if "conversations" not in record:
        raise fail("key 'conversations' is missing", sample_id)
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise fail("key 'conversations' must be a non-empty list of turns", sample_id)
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise fail(f"conversations[{j}] must be an object with 'from' and 'value'", sample_id)
        for key in ("from", "value"):
            if key not in turn:
                raise fail(f"key 'conversations[{j}].{key}' is missing", sample_id)
        if turn["from"] not in LLAVA_ROLES:
            raise fail(
                f"key 'conversations[{j}].from' has unknown role {turn['from']!r}; "
                f"expected one of {sorted(LLAVA_ROLES)}",
                sample_id,
            )
        if not isinstance(turn["value"], str):
            raise fail(f"key 'conversations[{j}].value' must be a string", sample_id)
        if turn["from"] == "system" and j > 0:
            raise fail(f"conversations[{j}] is a 'system' turn; a system turn may only come first", sample_id)
        messages.append({"role": LLAVA_ROLES[turn["from"]], "content": turn["value"]})
    media = {}
    for kind in MODALITIES.values():
        key = kind.record_key
        items = record.get(key, [])
        if isinstance(items, str):
            items = [items]
        if not isinstance(items, list) or not all(isinstance(p, str) and p for p in items):
            what = "a path string or a list of path strings" if kind.from_files else "a non-empty passage string or a list of them"
            raise fail(f"key '{key}' must be {what}", sample_id)
        media[kind.key] = items
        n = sum(m["content"].count(kind.placeholder) for m in messages)
        if n != len(items):
            raise fail(
                f"the conversation has {n} {kind.placeholder} placeholder(s) but key '{key}' gives {len(items)} "
                f"item(s); put exactly one {kind.placeholder} in the text per item", sample_id,
            )
    return sample_id, messages, media
