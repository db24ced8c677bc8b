"""Fused kernels the reduction library (``pipeline/``, torch-only by contract) can use when they exist.

``register_kernels()`` (called when ``llava_deft.model.llava`` is imported) adds, where Triton is
installed (it ships with PyTorch's CUDA builds), ``"triton"`` to
:data:`pipeline.stages.divprune.GREEDY_KERNELS`: DivPrune's greedy max-min loop as ONE Triton kernel, a
program per row that keeps the row's distances to its picks in registers (each pick: an argmax over the
row and a read of one distance row), where the PyTorch loop launches about a dozen kernels per pick.
Triton is imported on the first call only, so importing the model costs nothing on a machine without a
GPU, and Triton's CPU interpreter (``TRITON_INTERPRET=1`` set before that call) runs the same kernel on
the CPU (tests/test_divprune_triton.py checks it against the loop).
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch
from torch import Tensor

from pipeline.stages.divprune import GREEDY_KERNELS


@cache
def _greedy_kernel():
    """The Triton kernel, compiled lazily (``triton.jit`` reads ``TRITON_INTERPRET`` when it wraps it)."""
    import triton
    import triton.language as tl

    @triton.jit
    def greedy_picks(dist_ptr, nearest_ptr, mask_ptr, keep_ptr, out_ptr, n, picks, BLOCK: tl.constexpr):
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

    return greedy_picks, triton.next_power_of_2


def triton_greedy_picks(dist: Tensor, nearest: Tensor, mask: Tensor, keep: Tensor, picks: int) -> Tensor:
    """(B, N) bool: row ``b``'s ``keep[b]`` greedy max-min picks (``dist`` (B, N, N) and ``nearest`` (B, N)
    float32 as ``pipeline.stages.divprune.max_min_select`` computes them; ``picks`` >= every ``keep``)."""
    kernel, next_power_of_2 = _greedy_kernel()
    b, n = mask.shape
    out = torch.empty((b, n), dtype=torch.int8, device=mask.device)
    block = next_power_of_2(max(n, 1))
    kernel[(b,)](dist.contiguous(), nearest.contiguous(), mask.to(torch.int8).contiguous(),
                 keep.to(torch.int32).contiguous(), out, n, picks, BLOCK=block,
                 num_warps=4 if block <= 1024 else 8 if block <= 4096 else 16)
    return out.bool()


def register_kernels() -> None:
    """Make the fused kernels available to ``pipeline/`` where their compiler is installed."""
    if importlib.util.find_spec("triton") is not None:
        GREEDY_KERNELS.setdefault("triton", triton_greedy_picks)
