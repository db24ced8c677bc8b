"""Collation cost per sample with ``MultimodalCollator``'s caches on and off.

N easy-VQA train samples (a seeded random subset, as a shuffled epoch draws them) are collated in
batches of 64, twice: pass 1 starts from empty caches (cold), pass 2 finds them filled (warm). The
image transform is the one of ``configs/model/easyvqa_cs64.yaml``'s vision tower, the tokenizer the
bundled tiny one. Samples are decoded before timing: only the collator is timed. One torch thread by
default, as in a DataLoader worker.

    python eval/bench_collate.py                 # 4,096 samples
    python eval/bench_collate.py --n 0           # the whole train split (38,575)
    python eval/bench_collate.py --group-by-image
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `python eval/bench_collate.py` finds llava_deft
    sys.path.insert(0, str(ROOT))

from llava_deft.config import load_model_config  # noqa: E402
from llava_deft.data import EasyVQADataset, MultimodalCollator, build_collator  # noqa: E402
from llava_deft.model import create_model_and_processors  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "configs/model/easyvqa_cs64.yaml"), help="model config YAML")
    p.add_argument("--n", type=int, default=4096, help="samples per pass (0: the whole split)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cache-size", type=int, default=100_000, help="cache_size of the cached collator")
    p.add_argument("--group-by-image", action="store_true", help="one multi-turn conversation per image")
    p.add_argument("--generation", action="store_true", help="collate for generation (left padding)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a DataLoader worker)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def time_pass(collate: MultimodalCollator, batches: list[list[dict]]) -> float:
    """Seconds to collate every batch once."""
    t0 = time.perf_counter()
    for batch in batches:
        collate(batch)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_model_config(args.model)
    _, processors = create_model_and_processors(cfg)
    ds = EasyVQADataset("train", group_by_image=args.group_by_image)
    n = len(ds) if args.n <= 0 else min(args.n, len(ds))
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed))[:n].tolist()
    samples = [ds[i] for i in order]
    batches = [samples[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
    n_conv = len({tuple(m["content"] for m in s["messages"]) for s in samples})
    n_img = len({k for s in samples for k in s["image_keys"]})
    print(
        f"{n} easy-VQA train samples{' (grouped by image)' if args.group_by_image else ''}, "
        f"{n_conv} distinct conversations, {n_img} distinct images, batches of {args.batch_size}, "
        f"{args.threads} torch thread(s)"
    )

    rows = []
    for label, cache_size in (("off", 0), ("on", args.cache_size)):
        collate = build_collator(processors, generation=args.generation, cache_size=cache_size)
        for pas in ("1 (cold)", "2 (warm)"):
            tok_hits, img_hits = collate.token_cache.hits, collate.image_cache.hits
            seconds = time_pass(collate, batches)
            rows.append({
                "cache": label, "pass": pas, "ms_per_sample": 1e3 * seconds / n,
                "token_hits": (collate.token_cache.hits - tok_hits) / n,
                "image_hits": (collate.image_cache.hits - img_hits) / n,
            })

    base = {r["pass"]: r["ms_per_sample"] for r in rows if r["cache"] == "off"}
    print("\n| cache | pass | ms / sample | vs off | token-cache hits | image-cache hits |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['cache']} | {r['pass']} | {r['ms_per_sample']:.3f} | {base[r['pass']] / r['ms_per_sample']:.1f}x "
            f"| {100 * r['token_hits']:.0f} % | {100 * r['image_hits']:.0f} % |"
        )
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
