"""Shared checks: a mixed batch behaves exactly like its samples run one at a time.

``collate(items) -> batch`` is the test file's own collator call (its media and max_length).
"""

from __future__ import annotations

import torch


def assert_logits_match_one_at_a_time(model, items, collate, together, attention_mask) -> None:
    """``together`` (B, L, V): the batch's logits; each sample's real positions equal its own run."""
    for i, item in enumerate(items):
        one = model(**collate([item])).logits[0]
        real = attention_mask[i].bool()
        assert int(real.sum()) == one.shape[0], f"sample {item['id']} has a different length when batched"
        torch.testing.assert_close(together[i][real], one, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"sample {item['id']}: {m}")


def assert_generate_matches_one_at_a_time(model, items, collate, max_new_tokens: int = 5) -> None:
    """Greedy generation of the batch equals each sample's own, then padding."""
    together = model.generate(**collate(items), max_new_tokens=max_new_tokens)
    for i, item in enumerate(items):
        one = model.generate(**collate([item]), max_new_tokens=max_new_tokens)
        n = one.shape[1]
        assert torch.equal(together[i, :n], one[0]), f"sample {item['id']} differs when batched"
        assert torch.all(together[i, n:] == model.tokenizer.pad_token_id)


def pipeline_inputs(model, batch) -> list:
    """The TokenBatch of every pipeline call made by one forward of ``batch`` (no grad)."""
    seen = []
    hook = model.pipeline.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
    return seen
