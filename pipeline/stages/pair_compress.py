"""Pair compression of the context inside the LLM (issue 17, seed 002), as a layer stage.

Defaults are seed 002's (``layer_idx=[10], T_w=100, r=0.8, M=100``). After decoder layer ``layer - 1``
(0-based) every row's context is split into the last ``window`` columns
(``T_w``, kept as they are) and the memory before them. Memory columns are paired from the window
backwards -- ``(m-2, m-1), (m-4, m-3), ...`` -- so that left padding only ever meets a row's earliest token:
a pair of two real tokens is merged by a :class:`~pipeline.pair_compress.TokenCompressor`; a pair of a
padding column and a real token keeps the real token as it is (the odd remainder of a row, the seed's
"odd length keeps its token"); an odd first column stays alone. The window's queries then score the
merged memory (:class:`~pipeline.pair_compress.WindowAttentionScore`, padding masked) and the
``selection_count(T', window, ratio, memory_floor)`` highest-scoring merged tokens (``T'`` = the merged
sequence's length counted per row over its real tokens, at most its whole pairs) are expanded back to their
two original tokens (:func:`~pipeline.pair_compress.interleave_selected_pure_tensor`); a row that expands
fewer than the batch's most is left-padded, so a row gives the same tokens in a batch as alone. Layers
``layer..`` compute and cache the result: one token fewer per merged pair, one more per expanded pair.

RoPE positions, original indices and kinds of a merged token are those of its first real token (the
earlier of the two, or the only real one); an expanded pair keeps its two tokens' own. After a merging
stage (``LayerState.size`` set, e.g. ``recursive_compression_llm`` at an earlier layer) a merged pair
stands for the sum of its halves' sizes (the layers after add ``log(size)`` to its key) and every other
token keeps its own. With ``ratio: 1``
every merged token is expanded again and the layers after see exactly the tokens (and hidden states)
they would without the stage (the stage hands the state on untouched): the model is the base model.

The compressor's MLP and in-pair embeddings train through the merged hidden states; the scorer's q/k
projections choose through a hard top-k and get no gradient from it (as the seed's selection).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from ..llm import TEXT_KIND, AttentionProbe, LayerStage, LayerState
from ..pair_compress import TokenCompressor, WindowAttentionScore, interleave_selected_pure_tensor, selection_count
from ..registry import register
from ..types import NonNegInt, PosInt

Share = Annotated[float, Field(ge=0, le=1)]


@register("pair_compress")
class PairCompress(LayerStage):
    def __init__(self, dim: int, layer: PosInt = 10, window: PosInt = 100, ratio: Share = 0.8,
                 memory_floor: NonNegInt = 100, hidden_dim: PosInt | None = None, num_heads: PosInt = 8):
        super().__init__(layer)
        self.window, self.ratio, self.memory_floor = window, ratio, memory_floor
        self.compressor = TokenCompressor(dim, hidden_dim)
        self.scorer = WindowAttentionScore(dim, num_heads)

    def expansions(self, merged_len: Tensor, whole: Tensor) -> Tensor:
        """Pairs each row expands: :func:`~pipeline.pair_compress.selection_count` of the row's real merged
        length ``merged_len`` (B,), on the device, at most the row's whole pairs ``whole`` (B,)."""
        memory = (merged_len - self.window).clamp(min=0).double()
        value = self.ratio * memory + self.memory_floor * (1.0 - self.ratio) / 2.0
        count = torch.minimum(torch.floor(value + 0.5).clamp(min=0), memory).long()
        return torch.minimum(count, whole)

    def reduce(self, state: LayerState, attention: AttentionProbe) -> LayerState:
        b, length, d = state.hidden.shape
        memory = length - self.window
        n = max(memory, 0) // 2
        if n == 0 or self.ratio >= 1.0:  # ratio 1 expands every pair again: the very same tokens
            self.last_stats = {"tokens_in": length, "tokens_out": length, "pairs": n, "expanded_max": n}
            return state
        lead = memory - 2 * n  # 1 when the memory is odd: its first column stays alone
        mask, h = state.mask, state.hidden
        first, second = mask[:, lead:memory:2], mask[:, lead + 1:memory:2]  # (B, n) validity of each pair's halves
        whole = first & second
        merged_h = self.compressor(h[:, lead:memory], 0)  # (B, n, D): every pair merged
        merged_h = torch.where(whole.unsqueeze(-1), merged_h, h[:, lead + 1:memory:2])  # (pad, real): the real one

        def merge(x: Tensor, pairs: Tensor) -> Tensor:  # (B, L[, D]) -> (B, L - n[, D]) around merged pairs
            return torch.cat([x[:, :lead], pairs, x[:, memory:]], 1)

        def first_real(x: Tensor) -> Tensor:  # a merged token's position / index / kind: its first real token's
            return torch.where(first, x[:, lead:memory:2], x[:, lead + 1:memory:2])

        merged_hidden, merged_mask = merge(h, merged_h), merge(mask, first | second)
        # the window scores the merged memory; only whole pairs can expand, the best first
        scores = self.scorer.ImportanceScore(merged_hidden, self.window, merged_mask)[:, lead:]  # (B, n)
        scores = torch.where(whole, scores, torch.full_like(scores, -1.0))  # below every real score (>= 0)
        k = min(selection_count(length - n, self.window, self.ratio, self.memory_floor), n)  # static bound
        picked = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # (B, k)
        per_row = self.expansions(merged_mask.sum(1), whole.sum(1))  # (B,) <= k
        use = torch.arange(k, device=h.device) < per_row.unsqueeze(1)  # (B, k)

        def expand(full: Tensor, merged: Tensor) -> Tensor:
            out = interleave_selected_pure_tensor(full[:, lead:], merged[:, lead:], picked, use)
            return torch.cat([full[:, :lead], out], 1)

        hidden = expand(h, merged_hidden)
        meta = torch.stack([state.positions, state.index, state.kind, mask.long()], -1).double()  # exact small ints
        merged_meta = torch.stack([merge(state.positions, first_real(state.positions)),
                                   merge(state.index, first_real(state.index)),
                                   merge(state.kind, first_real(state.kind)), merged_mask.long()], -1).double()
        size = None
        if state.size is not None:  # an earlier merging stage's sizes: a merged pair stands for both halves'
            sz = torch.where(mask, state.size, 0).double()
            pair_size = sz[:, lead:memory:2] + sz[:, lead + 1:memory:2]
            size = expand(sz.unsqueeze(-1), merge(sz, pair_size).unsqueeze(-1)).squeeze(-1)  # (B, L')
        out = expand(meta, merged_meta).round().long()  # (B, L', 4)
        valid = out[..., 3].bool()
        self.last_stats = {"tokens_in": length, "tokens_out": hidden.shape[1], "pairs": n, "expanded_max": k}
        if self.record_assignment:  # tracing only (pipeline.llm.LayerStage): a merged pair's two tokens share a column
            cols = torch.arange(length, device=h.device).expand(b, length)  # (B, L) each input column's own id
            merged_src = torch.stack([merge(cols, cols[:, lead:memory:2]), merge(cols, cols[:, lead + 1:memory:2])], -1)
            src = expand(torch.stack([cols, cols], -1).double(), merged_src.double()).round().long()  # (B, L', 2)
            self.last_assignment = assignment_of(src, valid, mask)
        return LayerState(hidden=hidden * valid.unsqueeze(-1).to(hidden.dtype), mask=valid,
                          positions=torch.where(valid, out[..., 0], 0), index=torch.where(valid, out[..., 1], -1),
                          kind=torch.where(valid, out[..., 2], TEXT_KIND),
                          size=None if size is None else torch.where(valid, size, 1.0).to(state.size.dtype))

    def extra_repr(self) -> str:
        return (f"layer={self.layer}, window={self.window}, ratio={self.ratio}, memory_floor={self.memory_floor}, "
                f"hidden_dim={self.compressor.mlp[0].out_features}, num_heads={self.scorer.num_heads}")


def assignment_of(src: Tensor, valid: Tensor, mask: Tensor) -> Tensor:
    """Input column -> output column from the sources of each output column.

    ``src`` (B, L', 2) long: the two input columns each output column holds (the same column twice for a
    token as it was); ``valid`` (B, L') its real output columns; ``mask`` (B, L) the real input columns.
    Returns (B, L) long, -1 on padding and on input columns no output column holds."""
    b, width, _ = src.shape
    length = mask.shape[1]
    out_col = torch.arange(width, device=src.device).view(1, width, 1).expand(b, width, 2)
    target = torch.where(valid.unsqueeze(-1), src, length)  # padding columns write into a spare last column
    assign = torch.full((b, length + 1), -1, dtype=torch.long, device=src.device)
    assign = assign.scatter(1, target.flatten(1), out_col.flatten(1))
    return torch.where(mask, assign[:, :length], -1)
