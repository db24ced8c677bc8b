"""The one evaluation loop every eval script and the sweep share: greedy answers through the one
collator factory, exact-match scoring by question type, and time to first token.

    preds = predict(model, dataset, batch_size=64, max_new_tokens=8, device="cuda")
    result = score(preds)            # {"accuracy": {"all": .., <type>: ..}, "counts": .., "media_tokens_per_sample": ..}
    result["correct"]                # "0110..." one character per question, dataset order (paired statistics)
    ttft = time_to_first_token(model, dataset, batch_size=1, device="cuda")   # median ms over repeats

A dataset item is a sample of :mod:`llava_deft.data` (``messages``, media, ``id``) and may carry a
``question_type``; answers are compared after ``strip().lower()``.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections import defaultdict
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..data import build_collator
from ..modality import MODALITIES

__all__ = ["exact_match", "ids_digest", "predict", "score", "time_to_first_token"]


def exact_match(prediction: str, reference: str | None) -> bool:
    """The answer check of every eval: equal after ``strip().lower()``."""
    return prediction.strip().lower() == (reference or "").strip().lower()


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def predict(model, dataset: Dataset, batch_size: int, max_new_tokens: int, device, desc: str = "eval",
            workers: int = 0, progress: bool = True, **generate_kwargs) -> list[dict]:
    """Greedy answers: one ``{"id", "question_type", "prediction", "reference", "media_tokens", "media_items"}``
    per item in dataset order; ``media_tokens`` is what the sample's media gave the LLM after reduction,
    ``media_items`` how many media items the sample has. With LLM stages that count what they keep
    (``last_stats`` ``tokens_in`` / ``tokens_out``: recursive_compression_llm, progressive_compression,
    pair_compress) each item also gets ``llm_tokens``: ``{"<stage>@<layer>": (in, out)}``, its batch's mean
    tokens per row going into and out of the stage's prefill. ``generate_kwargs`` go to ``model.generate``."""
    collate = build_collator(model.processors, generation=True)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=lambda s: (collate(s), [x.get("question_type", "all") for x in s]))
    out = []
    for batch, qtypes in tqdm(loader, desc=desc, dynamic_ncols=True, disable=not progress):
        batch = _to(batch, device)
        ids, n_media = model.generate(**batch, max_new_tokens=max_new_tokens, return_media_tokens=True, **generate_kwargs)
        preds = model.tokenizer.batch_decode(ids, skip_special_tokens=True)
        items = _media_items(batch, len(preds))
        llm = _llm_tokens(model)
        for sid, qtype, pred, ref, n, k in zip(batch["ids"], qtypes, preds, batch["references"], n_media.tolist(), items):
            out.append({"id": sid, "question_type": qtype, "prediction": pred.strip(), "reference": ref,
                        "media_tokens": int(n), "media_items": int(k), **({"llm_tokens": llm} if llm else {})})
    return out


def _llm_tokens(model) -> dict[str, tuple[float, float]]:
    """``{"<stage>@<layer>": (tokens_in, tokens_out)}`` of the LLM stages whose last prefill counted them."""
    found = {}
    for stage in getattr(getattr(model, "pipeline", None), "llm", None) or ():
        stats = getattr(stage, "last_stats", None) or {}
        if "tokens_in" in stats and "tokens_out" in stats:
            name = f"{getattr(stage, 'stage_name', type(stage).__name__)}@{getattr(stage, 'layer', '?')}"
            found[name] = (float(stats["tokens_in"]), float(stats["tokens_out"]))
    return found


def _media_items(batch: dict, n: int) -> list[int]:
    """Media items per sample of a collated batch (images + videos + audio clips + passages)."""
    total = torch.zeros(n, dtype=torch.long)
    for kind in MODALITIES.values():
        counts = batch.get(kind.counts_key)
        if isinstance(counts, torch.Tensor):
            total += counts.detach().cpu().long()
    return total.tolist()


def ids_digest(ids: list[str]) -> str:
    """First 12 hex digits of sha256 over the question ids in order: two rows' per-question scores pair
    up only when their digests are equal."""
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:12]


def score(predictions: list[dict]) -> dict:
    """Exact match overall ("all") and per question type, counts, media tokens per sample and per media
    item, the per-question record ``correct`` ("0"/"1" per question in order) with ``ids_digest``, and,
    where items carry ``llm_tokens``, ``llm_token_share``: per LLM stage, the tokens it let through over
    those it got (summed over items)."""
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    bits = []
    for p in predictions:
        ok = int(exact_match(p["prediction"], p["reference"]))
        bits.append(str(ok))
        for key in {"all", p["question_type"]}:
            correct[key] += ok
            total[key] += 1
    n = max(1, len(predictions))
    items = sum(p.get("media_items", 1) for p in predictions)
    flows: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for p in predictions:
        for name, (t_in, t_out) in p.get("llm_tokens", {}).items():
            flows[name][0] += t_in
            flows[name][1] += t_out
    share = {name: (t_out / t_in if t_in else None) for name, (t_in, t_out) in flows.items()}
    return {
        "accuracy": {k: correct[k] / total[k] for k in sorted(total)},
        "counts": dict(sorted(total.items())),
        "media_tokens_per_sample": sum(p["media_tokens"] for p in predictions) / n,
        "tokens_per_item": sum(p["media_tokens"] for p in predictions) / max(1, items),
        "correct": "".join(bits),
        "ids_digest": ids_digest([p["id"] for p in predictions]),
        **({"llm_token_share": share} if share else {}),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_to_first_token(model, dataset: Dataset, batch_size: int, device, repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time (ms) of ``model.generate(max_new_tokens=1)`` on the dataset's first
    ``batch_size`` items (encoders, pipeline and prefill), after ``warmup`` untimed calls; the batch is
    collated and on ``device`` before the clock starts, the device synchronised before it stops."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_to_first_token: repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = torch.device(device)
    n = min(batch_size, len(dataset))
    if n == 0:
        raise ValueError("time_to_first_token: the dataset is empty")
    collate = build_collator(model.processors, generation=True)
    batch = _to(collate([dataset[i] for i in range(n)]), device)
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        model.generate(**batch, max_new_tokens=1)
        _sync(device)
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def first(dataset: Dataset, limit: int | None, skip: int = 0) -> Dataset:
    """The first ``limit`` items (all with None) after the first ``skip``."""
    if not limit and not skip:
        return dataset
    stop = len(dataset) if not limit else min(skip + limit, len(dataset))
    return Subset(dataset, range(min(skip, stop), stop))


Sample = dict[str, Any]
