"""A recorder of host synchronisations on CPU: the calls that read a device value on the host.

On a GPU each of them waits for every queued kernel, and CUDA-graph capture refuses them; on the CPU
nothing waits, so a test records the calls instead (``torch.cuda.set_sync_debug_mode("error")`` is the
GPU-side check). Recorded: ``.item()``, ``.tolist()``, ``bool()`` / ``float()`` / ``int()`` / index use
of a tensor (every data-dependent Python branch goes through one), ``nonzero`` / ``argwhere`` /
``masked_select`` / ``unique`` (their output size is data-dependent), indexing with a boolean tensor, and
``torch.tensor`` / ``torch.as_tensor`` (Python data copied to the device). A ``.to(device)`` of a CPU
tensor is a copy too, but on the CPU it is a no-op the recorder cannot tell apart: the GPU test catches it.

    with HostSyncRecorder() as rec:
        stage(batch)
    assert not rec.calls, rec.report()
"""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode

SYNCING = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "argwhere",
           "masked_select", "unique", "unique_consecutive", "numpy",
           "tensor", "as_tensor"}  # a tensor from Python data: a synchronous host-to-device copy on a GPU


def _bool_index(args) -> bool:
    if len(args) < 2:
        return False
    idx = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx)


class HostSyncRecorder(TorchFunctionMode):
    """Records ``(call, 'file:line')`` of each host-synchronising tensor call made inside the block."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in SYNCING or (name == "__getitem__" and _bool_index(args)):
            frame = traceback.extract_stack(limit=2)[0]  # the caller of the tensor method
            where = "/".join(frame.filename.replace("\\", "/").split("/")[-2:])
            self.calls.append((name, f"{where}:{frame.lineno}"))
        return func(*args, **(kwargs or {}))

    def report(self) -> str:
        return "host synchronisations: " + ", ".join(f"{n} at {where}" for n, where in dict.fromkeys(self.calls))
