"""``divprune``: keep the most diverse tokens of each row (greedy max-min diversity).

Reference: Alvar, Singh, Akbari & Zhang, "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models", CVPR 2025, https://arxiv.org/abs/2503.02175 (code: github.com/vbdi/divprune).

DivPrune casts pruning as the Max-Min Diversity Problem: keep ``k`` tokens whose minimum pairwise
cosine distance ``1 - cos(x_i, x_j)`` is as large as possible, solved greedily as in the paper's
code: the first pick is the token with the largest distance to its nearest other token; each
later pick is the unpicked token whose distance to its nearest picked token is largest (ties: the
earlier token). The paper's code takes the first pick's "nearest other token" as the second
smallest entry of its distance column (the smallest being the token itself); here the diagonal is
left out explicitly, which is the same up to rounding. The paper keeps ``round(ratio * n)`` tokens
(0.098 by default); here ``ceil(retention_ratio * n)``, the pipeline's budget.

The greedy picks are sequential by nature, so the stage loops over the ``max_b k_b`` picks; every
pick is batched over rows and tokens (a row that has its ``k_b`` stops changing). Memory: the
``(B, N, N)`` distance matrix, computed once. Selection only, no parameters: kept tokens are input
rows, sorted by original index, and the others go to ``pruned``.

On CUDA (float32 distances, Triton importable) the loop over picks runs inside ONE Triton kernel, a
program per row holding the row's distances to its picks in registers: each pick is an argmax over
the row and a read of one distance row, where the PyTorch loop launches about a dozen kernels per
pick (278 picks at LLaVA-1.5's 576 tokens and retention 0.482: thousands of launches, the stage's
whole cost at batch 8). Both give the same picks (the same float32 distances, the first maximum on
ties); ``backend="torch"`` forces the loop. The kernel is checked against the loop on the CPU by
Triton's interpreter (``TRITON_INTERPRET=1``, tests/test_divprune_triton.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # the fused greedy loop on CUDA (Triton ships with PyTorch's CUDA builds)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without triton use the PyTorch loop
    triton = None

from ..batch import TokenBatch
from ..ops import budget, budget_widths, split_by_mask
from ..registry import register
from ..types import Ratio


MAX_TRITON_TOKENS = 16384
"""Rows longer than this use the PyTorch loop (a Triton program keeps a whole row in registers)."""

if triton is not None:
    @triton.jit
    def _greedy_picks(dist_ptr, nearest_ptr, mask_ptr, keep_ptr, out_ptr, n, picks, BLOCK: tl.constexpr):
        """Row ``program_id(0)``'s greedy max-min picks (the loop of :func:`max_min_select`), into ``out``."""
        b = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        inside = offs < n
        real = tl.load(mask_ptr + b * n + offs, mask=inside, other=0) != 0
        nearest = tl.load(nearest_ptr + b * n + offs, mask=inside, other=0.0)
        keep = tl.load(keep_ptr + b)
        to_selected = tl.full([BLOCK], float("inf"), tl.float32)
        selected = tl.zeros([BLOCK], dtype=tl.int32)
        for i in range(0, picks):
            score = tl.where(i == 0, nearest, to_selected)
            score = tl.where(real & (selected == 0), score, float("-inf"))
            pick = tl.argmax(score, axis=0, tie_break_left=True)  # the first maximum, as torch.argmax
            active = i < keep
            selected = tl.where((offs == pick) & active, 1, selected)
            row = tl.load(dist_ptr + (b * n + pick) * n + offs, mask=inside & active, other=float("inf"))
            to_selected = tl.minimum(to_selected, row)
        tl.store(out_ptr + b * n + offs, selected.to(tl.int8), mask=inside)


def _triton_picks(dist: Tensor, nearest: Tensor, mask: Tensor, keep: Tensor, picks: int) -> Tensor:
    b, n = mask.shape
    out = torch.empty((b, n), dtype=torch.int8, device=mask.device)
    block = triton.next_power_of_2(n)
    _greedy_picks[(b,)](dist.float().contiguous(), nearest.float().contiguous(), mask.to(torch.int8).contiguous(),
                        keep.to(torch.int32).contiguous(), out, n, picks, BLOCK=block,
                        num_warps=4 if block <= 1024 else 8 if block <= 4096 else 16)
    return out.bool()


def max_min_select(keys: Tensor, mask: Tensor, keep: Tensor, picks: int | None = None,
                   backend: str = "auto") -> Tensor:
    """Bool (B, N): ``keep[b]`` real tokens of row ``b`` picked by greedy max-min cosine distance.

    ``keys (B, N, S)`` (padding ignored, whatever its value), ``mask (B, N)`` bool, ``keep (B,)`` long
    (at most the row's real tokens). ``picks``: how many greedy steps to run, a bound of ``keep`` known
    from shapes (rows with fewer stop picking); None reads ``keep.max()`` (a host synchronisation).
    ``backend``: ``"auto"`` (the Triton kernel on CUDA for float32 distances and rows of at most
    :data:`MAX_TRITON_TOKENS`, else the loop), ``"torch"`` or ``"triton"`` (also on the CPU under
    ``TRITON_INTERPRET=1``).
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"max_min_select: backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "triton" and triton is None:
        raise RuntimeError("max_min_select: backend 'triton' asked for, but triton is not installed")
    b, n = mask.shape
    if n == 0:
        return mask.clone()
    dev = mask.device
    dtype = torch.promote_types(keys.dtype, torch.float32)
    k = torch.where(mask[..., None], keys.detach().to(dtype), torch.zeros((), dtype=dtype, device=dev))
    k = F.normalize(k, dim=-1)
    inf = torch.full((), float("inf"), dtype=dtype, device=dev)  # a fill kernel, not a host-to-device copy
    dist = 1 - k @ k.transpose(1, 2)  # (B, N, N) cosine distance
    dist = torch.where(mask[:, None, :] & mask[:, :, None], dist, inf)  # padding is never anyone's nearest
    eye = torch.eye(n, dtype=torch.bool, device=dev)
    nearest = dist.masked_fill(eye, float("inf")).amin(-1)  # (B, N) distance to the nearest other token
    rows = torch.arange(b, device=dev)
    selected = torch.zeros_like(mask)
    to_selected = torch.full((b, n), float("inf"), dtype=dtype, device=dev)  # distance to the nearest pick
    if picks is None:
        picks = int(keep.max()) if keep.numel() else 0
    if backend == "triton" or (backend == "auto" and triton is not None and dist.is_cuda
                               and dist.dtype == torch.float32 and n <= MAX_TRITON_TOKENS):
        return _triton_picks(dist, nearest, mask, keep, picks) & mask
    for i in range(picks):  # the greedy picks; rows and tokens batched
        score = nearest if i == 0 else to_selected
        pick = score.masked_fill(~mask | selected, float("-inf")).argmax(1)  # (B,) first maximum on ties
        active = i < keep  # (B,) rows still picking
        selected = selected | (F.one_hot(pick, n).bool() & active[:, None])
        to_selected = torch.where(active[:, None], torch.minimum(to_selected, dist[rows, pick]), to_selected)
    return selected


@register("divprune")
class DivPrune(nn.Module):
    """Keep ``ceil(retention_ratio * n)`` tokens per row maximising their minimum pairwise cosine distance.

    Greedy max-min (farthest-point) selection, see the module docstring. ``use_features``: measure
    distances on ``batch.features`` (written by ``sam``) instead of the tokens. Kept tokens are input
    rows in original order; ``dim`` is accepted for a uniform builder call and unused.
    """

    selects_tokens = True  # kept tokens are input rows

    def __init__(self, dim: int | None = None, retention_ratio: Ratio = 0.25, use_features: bool = False):
        super().__init__()
        self.retention_ratio = retention_ratio
        self.use_features = use_features

    def forward(self, batch: TokenBatch) -> TokenBatch:
        keys = batch.tokens
        if self.use_features:
            if batch.features is None:
                raise ValueError("divprune was built with use_features=True but the batch has no `features`; "
                                 "put a feature stage such as 'sam' before it")
            keys = batch.features
        width, drop_width = budget_widths(batch.mask.shape[1], self.retention_ratio)
        keep = max_min_select(keys, batch.mask, budget(batch.lengths, self.retention_ratio), picks=width)
        return split_by_mask(batch, keep, self.stage_name, width, drop_width)
