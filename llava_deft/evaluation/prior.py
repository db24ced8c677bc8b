"""The question prior: how well the text alone answers a test split, without looking at any media.

A reducer comparison only ranks reducers when the no-reduction base uses the media: if it scores no
better than answering each question with its most frequent training answer, every reducer ties with it
and nothing is decided. The prior answers a test question with the answer the training split gives most
often to the same question text (media placeholders removed, case and spaces normalised); a question
never seen in training gets its question type's most frequent answer, then the split's. It is scored
like a model (``correct`` per question, ``ids_digest``) so the report pairs it with the base.

    row = question_prior(train_records, test_records, limit=1000)   # None when train has no answers

Records are LLaVA-JSON objects (``id``, ``conversations`` with ``from`` human/gpt, optional
``question_type``); the pair scored is the last answer and the question before it.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

from ..errors import DatasetFormatError
from ..modality import PLACEHOLDERS
from .data import question_type
from .loop import exact_match, ids_digest

_PLACEHOLDER = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS.values()))


def question_key(text: str) -> str:
    """The question without media placeholders, lower-cased, spaces collapsed."""
    return " ".join(_PLACEHOLDER.sub(" ", text).lower().split())


def qa_pair(record: dict) -> tuple[str, str] | None:
    """(question, answer) of a record's last answer, or None when it has none."""
    turns = record.get("conversations") or []
    for i in range(len(turns) - 1, 0, -1):
        if turns[i].get("from") == "gpt" and turns[i - 1].get("from") == "human":
            return str(turns[i - 1].get("value", "")), str(turns[i].get("value", ""))
    return None


def question_prior(train: list[dict], test: list[dict], limit: int | None = None,
                   qtype: Callable[[dict], str] | None = None) -> dict | None:
    """Score the prior on the first ``limit`` scorable test records; None when ``train`` has no answer.
    ``qtype`` gives a record's question type (default :func:`.data.question_type`: its ``question_type``
    key, else "all")."""
    qtype = qtype or (lambda rec: question_type("", rec))
    by_question: dict[str, Counter] = defaultdict(Counter)
    by_type: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for rec in train:
        qa = qa_pair(rec)
        if qa is None:
            continue
        q, a = qa
        by_question[question_key(q)][a] += 1
        by_type[qtype(rec)][a] += 1
        overall[a] += 1
    if not overall:
        return None
    scored = [(rec, qa) for rec in test if (qa := qa_pair(rec)) is not None]
    if limit is not None:
        scored = scored[:limit]
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    bits, ids, seen = [], [], 0
    for rec, (q, ref) in scored:
        kind = qtype(rec)
        counts = by_question.get(question_key(q))
        seen += counts is not None
        counts = counts or by_type.get(kind) or overall
        ok = int(exact_match(counts.most_common(1)[0][0], ref))
        bits.append(str(ok))
        ids.append(str(rec.get("id")))
        for key in {"all", kind}:
            correct[key] += ok
            total[key] += 1
    return {
        "accuracy": {k: correct[k] / total[k] for k in sorted(total)},
        "counts": dict(sorted(total.items())),
        "correct": "".join(bits),
        "ids_digest": ids_digest(ids),
        "questions": len(bits),
        "questions_seen_in_train": seen,
        "train_answers": sum(overall.values()),
    }


def read_records(path: str | Path) -> list[dict]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise DatasetFormatError(f"{path}: a LLaVA-JSON file holds a list of records; got a JSON {type(data).__name__}")
    return data


__all__ = ["qa_pair", "question_key", "question_prior", "read_records"]
