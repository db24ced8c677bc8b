"""DivPrune's fused greedy loop (llava_deft.model.kernels' Triton kernel, used on CUDA) picks exactly what the
PyTorch loop picks.

The kernel runs here on the CPU under Triton's interpreter (``TRITON_INTERPRET=1`` must be set before
``triton.jit`` sees the kernel, so the check runs in a fresh interpreter): random rows with padding,
different budgets per row, duplicated tokens (ties), a row with one real token, an empty row, and a
row longer than one power of two; then the stage's output through ``backend`` both ways."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("triton")

CHECK = r"""
import torch
from llava_deft.model.kernels import register_kernels
from pipeline.stages.divprune import GREEDY_KERNELS, max_min_select

register_kernels()
assert "triton" in GREEDY_KERNELS

def case(b, n, s, seed, dup=False):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, n, s, generator=g)
    if dup:  # repeated tokens: equal distances, the first maximum must win in both
        keys[:, 1::3] = keys[:, 0::3][:, : keys[:, 1::3].shape[1]]
    lengths = torch.randint(0, n + 1, (b,), generator=g)
    lengths[0] = n
    if b > 2:
        lengths[1], lengths[2] = 1, 0
    mask = torch.arange(n)[None, :] < lengths[:, None]
    keep = (lengths.double() * torch.rand(b, generator=g, dtype=torch.float64)).ceil().long().clamp(max=lengths)
    keep[0] = max(int(keep[0]), 1)
    picks = int(keep.max())
    ref = max_min_select(keys, mask, keep, picks=picks, backend="torch")
    got = max_min_select(keys, mask, keep, picks=picks, backend="triton")
    assert got.dtype == torch.bool and got.shape == (b, n)
    assert torch.equal(got, ref), (b, n, s, seed, (got != ref).nonzero()[:5].tolist())
    assert torch.equal(got.sum(1), keep), (got.sum(1), keep)
    return int(got.sum())

total = 0
for b, n, s, seed, dup in [(4, 7, 5, 0, False), (3, 33, 8, 1, True), (5, 64, 16, 2, False), (2, 130, 12, 3, True),
                           (1, 1, 4, 4, False)]:
    total += case(b, n, s, seed, dup)
# a bound larger than every row's budget: rows stop picking at their own
g = torch.Generator().manual_seed(9)
keys, mask = torch.randn(3, 20, 6, generator=g), torch.ones(3, 20, dtype=torch.bool)
keep = torch.tensor([2, 5, 9])
ref = max_min_select(keys, mask, keep, picks=15, backend="torch")
assert torch.equal(max_min_select(keys, mask, keep, picks=15, backend="triton"), ref) and ref.sum(1).tolist() == [2, 5, 9]
print("picked", total)
"""


def test_triton_kernel_equals_the_torch_loop_under_the_interpreter():
    # the checkout first, then whatever the environment adds (an offline node's wheels live on PYTHONPATH)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("picked ")


def test_backend_is_checked():
    import torch

    from pipeline.stages.divprune import max_min_select

    with pytest.raises(ValueError, match=r"backend must be 'auto', 'torch' or a registered kernel \(.*\), got 'cuda'"):
        max_min_select(torch.randn(1, 3, 2), torch.ones(1, 3, dtype=torch.bool), torch.tensor([1]), backend="cuda")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_backend_on_cuda_uses_the_kernel_and_picks_as_the_loop():
    import torch

    importlib.import_module("llava_deft.model.llava")  # registers the Triton kernel
    from pipeline.stages.divprune import GREEDY_KERNELS, max_min_select

    assert "triton" in GREEDY_KERNELS
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(8, 576, 64, generator=g).cuda()
    mask = torch.ones(8, 576, dtype=torch.bool, device="cuda")
    mask[3, :100] = False
    keep = torch.full((8,), 278, device="cuda").clamp(max=mask.sum(1))
    ref = max_min_select(keys, mask, keep, picks=278, backend="torch")
    assert torch.equal(max_min_select(keys, mask, keep, picks=278), ref)
    assert torch.equal(ref.sum(1), keep)
