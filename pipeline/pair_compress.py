"""Pair compression of a decoder's context (issue 17, seed 002): the pieces, as plain tensor functions.

Inside a chosen decoder layer the older part of the context -- everything before a window of the last
``T_w`` tokens, the *memory* -- is merged pairwise, the window scores the merged memory by attention, and
the important merged tokens are expanded back to their original pairs:

1. :class:`TokenCompressor` merges memory tokens ``(2j, 2j+1)`` into one (an MLP over the pair with
   learnable in-pair positional embeddings, added to the pair's mean); an odd memory keeps its last token
   as it is; the window is untouched.
2. :meth:`WindowAttentionScore.ImportanceScore` lets the window's queries attend to the memory tokens
   (its own q/k projections, one softmax per head and query) and gives each memory token the attention it
   receives, averaged over heads and window queries.
3. :func:`select_tokens` keeps the :func:`selection_count` highest-scoring memory tokens, in their order.
4. :func:`interleave_selected_pure_tensor` writes, for every merged token, either the merged token or --
   where selected -- its two original tokens, with a different selection per batch row, by scatters only.

Every function is batched, loop-free over tokens and rows, and differentiable where its output is a
tensor of features; tests/test_pair_compress.py holds a slow loop-based reference of each.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["TokenCompressor", "WindowAttentionScore", "interleave_selected_pure_tensor", "select_tokens",
           "selection_count"]


def _check_window(t_w: int, where: str) -> None:
    if isinstance(t_w, bool) or not isinstance(t_w, int) or t_w < 0:
        raise ValueError(f"{where}: T_w must be an integer >= 0 (the window of recent tokens), got {t_w!r}")


class TokenCompressor(nn.Module):
    """Merge consecutive memory pairs: ``(B, T, D)`` -> ``(B, T - floor((T - T_w) / 2), D)``.

    Memory = tokens ``0 .. T-T_w-1``; pair ``j`` = tokens ``2j, 2j+1``. Merged token ``j`` =
    ``(x_2j + x_2j+1) / 2 + mlp([x_2j + p_0, x_2j+1 + p_1])`` with learnable in-pair embeddings ``p`` (2, D)
    and ``mlp`` = Linear(2D, hidden) -> GELU -> Linear(hidden, D), whose last layer starts at zero (a new
    compressor starts as mean pooling of pairs). Output order: the merged pairs, then an odd memory's last
    token unchanged, then the ``T_w`` window tokens unchanged. ``T_w >= T - 1`` leaves nothing to pair and
    returns ``x`` itself.
    """

    def __init__(self, dim: int, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or 2 * dim
        self.pos = nn.Parameter(torch.randn(2, dim) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    @staticmethod
    def num_pairs(length: int, t_w: int) -> int:
        """Pairs merged in a sequence of ``length`` tokens with a window of ``t_w``."""
        return max(length - t_w, 0) // 2

    def forward(self, x: Tensor, T_w: int) -> Tensor:  # noqa: N803 (the seed's name)
        _check_window(T_w, "TokenCompressor")
        b, t, d = x.shape
        n = self.num_pairs(t, T_w)
        if n == 0:
            return x
        pairs = x[:, : 2 * n].reshape(b, n, 2, d)  # (B, n, 2, D)
        merged = pairs.mean(2) + self.mlp((pairs + self.pos).flatten(2))  # (B, n, D)
        return torch.cat([merged, x[:, 2 * n:]], dim=1)


class WindowAttentionScore(nn.Module):
    """The window's attention to the memory, per memory token (see the module docstring)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"WindowAttentionScore: dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)

    def ImportanceScore(self, x: Tensor, T_w: int, mask: Tensor | None = None) -> Tensor:  # noqa: N802, N803
        """``x`` (B, T, D), optional validity ``mask`` (B, T) bool -> (B, T - T_w) float: the softmax
        attention each memory token receives from the window's queries, averaged over heads and over the
        window's valid queries (a row whose window has none scores 0). Invalid memory tokens get 0 and no
        share of the softmax. ``T_w >= T``: no memory, an empty (B, 0) result and no work; ``T_w = 0``: no
        window to score with, ``ValueError``."""
        _check_window(T_w, "ImportanceScore")
        b, t, _ = x.shape
        m = t - T_w
        if m <= 0:
            return x.new_zeros(b, 0)
        if T_w == 0:
            raise ValueError("ImportanceScore: T_w = 0 leaves no window to score the memory with; give T_w >= 1")
        h, hd = self.num_heads, self.head_dim
        q = self.q(x[:, m:]).view(b, T_w, h, hd).transpose(1, 2)  # (B, H, T_w, hd)
        k = self.k(x[:, :m]).view(b, m, h, hd).transpose(1, 2)  # (B, H, M, hd)
        logits = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, H, T_w, M)
        if mask is None:
            return logits.softmax(-1).mean((1, 2))
        mem_ok, win_ok = mask[:, :m].bool(), mask[:, m:].bool()
        logits = logits.masked_fill(~mem_ok[:, None, None, :], float("-inf"))
        attn = logits.softmax(-1).nan_to_num(0.0)  # a query with no valid memory token gives zeros
        attn = attn * win_ok[:, None, :, None]
        queries = win_ok.sum(1).clamp(min=1) * h  # (B,)
        return attn.sum((1, 2)) / queries[:, None]


def selection_count(length: int, t_w: int, r: float, m: float) -> int:
    """How many memory tokens :func:`select_tokens` keeps: ``r * (T - T_w) + M * (1 - r) / 2``.

    ``T`` = ``length`` (all tokens given, window included), ``T - T_w`` the memory; ``r`` in [0, 1] the
    share of the memory kept; ``M`` a floor on the memory kept as ``r`` falls: at ``r = 0`` the count is
    ``M / 2`` (the seed's default ``M = 100``). The value is rounded half up (``floor(v + 0.5)``) and
    clipped to ``[0, T - T_w]``: never negative, never more than the memory holds.
    """
    _check_window(t_w, "selection_count")
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"selection_count: r is the share of the memory kept, in [0, 1]; got {r}")
    if m < 0:
        raise ValueError(f"selection_count: M is a memory floor >= 0; got {m}")
    memory = max(length - t_w, 0)
    value = r * memory + m * (1.0 - r) / 2.0
    return int(min(max(math.floor(value + 0.5), 0), memory))


def select_tokens(x: Tensor, scores: Tensor, T_w: int, r: float, M: float = 0.0) -> tuple[Tensor, Tensor]:  # noqa: N803
    """Keep the :func:`selection_count` ``(T, T_w, r, M)`` highest-``scores`` memory tokens of ``x`` per row,
    in their original order: ``x`` (B, T, D), ``scores`` (B, T - T_w) -> ``(kept (B, k, D), indices (B, k))``.
    Ties go to the earlier token. The window is not part of the selection (the caller keeps it whole)."""
    _check_window(T_w, "select_tokens")
    b, t, d = x.shape
    memory = max(t - T_w, 0)
    if scores.shape != (b, memory):
        raise ValueError(f"select_tokens: scores must be (B, T - T_w) = {(b, memory)}, got {tuple(scores.shape)}")
    k = selection_count(t, T_w, r, M)
    # a stable descending order (ties: lower index first), then the first k indices put back in order
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    idx = order.sort(dim=1).values  # (B, k)
    return x.gather(1, idx.unsqueeze(-1).expand(b, k, d)), idx


def interleave_selected_pure_tensor(x: Tensor, x_compressed: Tensor, selected_indices: Tensor,
                                    selected_mask: Tensor | None = None) -> Tensor:
    """Expand the selected merged tokens back to their original pairs.

    ``x`` (B, T, D) the uncompressed tokens; ``x_compressed`` (B, T - n, D) their :class:`TokenCompressor`
    output with ``n`` merged pairs (``n`` = ``T - x_compressed.shape[1]``); ``selected_indices`` (B, k)
    distinct indices in ``[0, n)`` of merged tokens to expand, any order, a different set per row. Returns
    (B, T - n + k, D): merged token ``j`` in place, or ``x[2j], x[2j+1]`` where ``j`` is selected, then the
    rest of ``x_compressed`` (an odd memory's last token and the window). Scatters only: no loop over rows
    or tokens. Applied to an index tensor (``x`` = positions as (B, T, 1)) it gives where each output token
    came from.

    ``selected_mask`` (B, k) bool, optional: only the selections where it is True expand; a row that expands
    ``k_b < k`` pairs is left-padded with ``k - k_b`` zero columns, so every row's last token stays in the
    last column (left padding, as the decoder's prompts).
    """
    b, t, d = x.shape
    if x_compressed.shape[0] != b or x_compressed.shape[2] != d or x_compressed.shape[1] > t:
        raise ValueError(f"interleave: x_compressed {tuple(x_compressed.shape)} is not a compression of x {tuple(x.shape)}")
    n = t - x_compressed.shape[1]
    k = selected_indices.shape[1]
    if selected_indices.shape[0] != b or k > n:
        raise ValueError(f"interleave: selected_indices {tuple(selected_indices.shape)} must be (B, k <= {n} merged pairs)")
    if selected_mask is not None and selected_mask.shape != selected_indices.shape:
        raise ValueError(f"interleave: selected_mask {tuple(selected_mask.shape)} must match selected_indices "
                         f"{tuple(selected_indices.shape)}")
    if n == 0:
        return x_compressed
    dev = x.device
    marks = torch.ones_like(selected_indices, dtype=torch.bool) if selected_mask is None else selected_mask.bool()
    chosen = torch.zeros(b, n, dtype=torch.bool, device=dev).scatter(1, selected_indices.long(), marks)  # (B, n)
    width = 1 + chosen.long()  # output slots per merged token
    shift = k - chosen.sum(1, keepdim=True)  # (B, 1) left padding of rows that expand fewer than k
    start = width.cumsum(1) - width + shift  # (B, n) first output slot of merged token j
    trash = n + k  # one extra slot takes what a branch does not write
    merged_at = torch.where(chosen, trash, start)
    first_at = torch.where(chosen, start, trash)
    second_at = torch.where(chosen, start + 1, trash)
    out = x.new_zeros(b, n + k + 1, d)

    def put(buf: Tensor, at: Tensor, src: Tensor) -> Tensor:
        return buf.scatter(1, at.unsqueeze(-1).expand(b, n, d), src)

    out = put(out, first_at, x[:, 0: 2 * n: 2])
    out = put(out, second_at, x[:, 1: 2 * n: 2])
    out = put(out, merged_at, x_compressed[:, :n])  # last: the trash slot ends with something; it is cut
    return torch.cat([out[:, : n + k], x_compressed[:, n:]], dim=1)
