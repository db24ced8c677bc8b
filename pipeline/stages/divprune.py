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

On CUDA (float32 distances, a kernel in :data:`GREEDY_KERNELS`: ``llava_deft.model.kernels`` registers
its Triton one, as the model is imported) the loop over picks runs inside ONE kernel, a program per row
holding the row's distances to its picks in registers: each pick is an argmax over
the row and a read of one distance row, where the PyTorch loop launches about a dozen kernels per
pick (278 picks at LLaVA-1.5's 576 tokens and retention 0.482: thousands of launches, the stage's
whole cost at batch 8). Both give the same picks (the same float32 distances, the first maximum on
ties); ``backend="torch"`` forces the loop. The kernel is checked against the loop on the CPU by
Triton's interpreter (``TRITON_INTERPRET=1``, tests/test_divprune_triton.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batch import TokenBatch
from ..ops import budget, budget_widths, split_by_mask
from ..registry import register
from ..types import Ratio


GREEDY_KERNELS: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor]] = {}
"""Fused implementations of the greedy loop, by name: ``fn(dist, nearest, mask, keep, picks) -> (B, N) bool``
(float32 ``dist`` (B, N, N) and ``nearest`` (B, N) as :func:`max_min_select` computes them). This library
imports only torch; ``llava_deft.model.kernels`` registers ``"triton"`` (one Triton program per row) when
Triton is installed, and :func:`max_min_select` uses it on CUDA."""

MAX_FUSED_TOKENS = 16384
"""Rows longer than this use the PyTorch loop (a fused program keeps a whole row in registers)."""


def max_min_select(keys: Tensor, mask: Tensor, keep: Tensor, picks: int | None = None,
                   backend: str = "auto") -> Tensor:
    """Bool (B, N): ``keep[b]`` real tokens of row ``b`` picked by greedy max-min cosine distance.

    ``keys (B, N, S)`` (padding ignored, whatever its value), ``mask (B, N)`` bool, ``keep (B,)`` long
    (at most the row's real tokens). ``picks``: how many greedy steps to run, a bound of ``keep`` known
    from shapes (rows with fewer stop picking); None reads ``keep.max()`` (a host synchronisation).
    ``backend``: ``"auto"`` (a registered :data:`GREEDY_KERNELS` entry on CUDA for float32 distances and
    rows of at most :data:`MAX_FUSED_TOKENS`, else the loop), ``"torch"`` (the loop) or a registered
    kernel's name (e.g. ``"triton"``, also on the CPU under ``TRITON_INTERPRET=1``).
    """
    if backend not in ("auto", "torch", *GREEDY_KERNELS):
        raise ValueError(f"max_min_select: backend must be 'auto', 'torch' or a registered kernel "
                         f"({sorted(GREEDY_KERNELS) or 'none registered; importing llava_deft.model.kernels adds triton'}), "
                         f"got {backend!r}")
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
    if backend == "auto" and GREEDY_KERNELS and dist.is_cuda and dist.dtype == torch.float32 and n <= MAX_FUSED_TOKENS:
        backend = next(iter(GREEDY_KERNELS))
    if backend in GREEDY_KERNELS:
        return GREEDY_KERNELS[backend](dist.float(), nearest.float(), mask, keep, picks) & mask
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
