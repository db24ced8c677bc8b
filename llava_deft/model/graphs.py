"""Replay a function's kernels from CUDA graphs, one graph per input signature (inference only, issue 16).

At batch 1 a 7B LLaVA's time to first token is launch-bound: the vision tower, the reduction pipeline
and the LLM's prefill launch ~1,000 small kernels, and the host needs longer to launch them than the GPU
to run them. :class:`CapturedCall` wraps a function of tensors (nested in tuples, lists, dicts and
dataclasses such as ``pipeline.TokenBatch``) so that on CUDA, without autograd:

- the first call with a given signature (the structure, each tensor's shape / dtype / device, every
  other leaf's value, and a caller-given ``version`` of the function's state) runs eagerly on a side
  stream (the warm-up a capture needs);
- the second is captured by ``torch.cuda.graph`` (its inputs copied into static buffers) and replayed;
- later calls copy their tensors into those buffers, replay, and return a fresh structure around the
  graph's output tensors (valid until the next replay of the same graph: read it before calling again).

A function that reads a device value on the host is found in its warm-up (run with
``torch.cuda.set_sync_debug_mode("error")``), logged once for that signature and run eagerly from then on,
without a capture attempt: a capture that fails inside CUDA can leave the process unable to capture or
replay other graphs correctly (seen on an H100: later graphs of the same process gave other tokens). A
capture that still fails (an unregistered random generator) is logged the same way. The last
``max_graphs`` signatures are kept.
Everything else (CPU, grad mode, no tensor, an unhashable leaf) runs ``fn`` as is.

:class:`GraphSlot` holds such state on a module: it is emptied, never copied, by ``copy.deepcopy`` and
pickling (a CUDA graph cannot be copied; a copy captures its own).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["CapturedCall", "GraphSlot", "HostSyncError", "flatten", "unflatten", "warm_up"]

logger = logging.getLogger("llava_deft.generate")

_TENSOR = "<tensor>"


def flatten(obj: Any, leaves: list[Tensor]) -> Any:
    """Append ``obj``'s tensors to ``leaves`` and return a hashable spec of everything else."""
    if isinstance(obj, Tensor):
        leaves.append(obj)
        return (_TENSOR, tuple(obj.shape), obj.dtype, obj.device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return ("dataclass", type(obj), tuple((f.name, flatten(getattr(obj, f.name), leaves))
                                              for f in dataclasses.fields(obj)))
    if isinstance(obj, (list, tuple)):
        return ("seq", type(obj), tuple(flatten(x, leaves) for x in obj))
    if isinstance(obj, dict):
        return ("dict", tuple((k, flatten(v, leaves)) for k, v in obj.items()))
    hash(obj)  # TypeError for an unhashable leaf: the caller runs eagerly
    return ("leaf", obj)


def unflatten(spec: Any, tensors: list[Tensor]) -> Any:
    """Rebuild the structure of ``spec`` around ``tensors`` (consumed in :func:`flatten`'s order)."""
    it = iter(tensors)

    def build(s):
        tag = s[0]
        if tag == _TENSOR:
            return next(it)
        if tag == "dataclass":
            obj = object.__new__(s[1])  # no __init__ / __post_init__: the fields are set as they were
            for name, sub in s[2]:
                object.__setattr__(obj, name, build(sub))
            return obj
        if tag == "seq":
            items = [build(x) for x in s[2]]
            return s[1](items) if s[1] in (list, tuple) else s[1](*items)
        if tag == "dict":
            return {k: build(v) for k, v in s[1]}
        return s[1]

    return build(spec)


class HostSyncError(RuntimeError):
    """A function read a device value on the host during its warm-up: capturing it would fail."""


def warm_up(device: torch.device, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` once on a side stream (the warm-up a capture needs) with host synchronisations turned into
    errors (``torch.cuda.set_sync_debug_mode("error")``): a function that reads a device value on the host
    raises :class:`HostSyncError` here, eagerly, instead of failing inside a capture -- a failed capture
    can leave the process's CUDA state unusable for later captures. ``fn`` must be safe to run again."""
    previous = torch.cuda.get_sync_debug_mode()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            out = fn()
    except RuntimeError as e:
        if "synchroniz" not in str(e).lower():
            raise
        raise HostSyncError(str(e).splitlines()[0]) from e
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.current_stream(device).wait_stream(side)
    return out


class CapturedCall:
    """``fn(*args)`` replayed from a CUDA graph per input signature (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any], what: str, max_graphs: int = 4):
        self.fn, self.what, self.max_graphs = fn, what, max_graphs
        self.entries: OrderedDict[Any, Any] = OrderedDict()  # signature -> "warm" | "eager" | (graph, inputs, spec, outputs)
        self.pool = None  # one memory pool for this call's graphs (they never run at once)

    def __call__(self, *args: Any, version: Any = ()) -> Any:
        leaves: list[Tensor] = []
        try:
            spec = flatten(args, leaves)
            key = (version, spec)
            hash(key)
        except TypeError:
            return self.fn(*args)
        if not leaves or leaves[0].device.type != "cuda" or torch.is_grad_enabled():
            return self.fn(*args)
        device = leaves[0].device
        state = self.entries.pop(key, None)
        if state is None:  # warm-up: cuBLAS handles, autotuning, lazily built buffers; a host sync is found here
            try:
                out = warm_up(device, lambda: self.fn(*args))
                state = "warm"
            except HostSyncError as e:
                logger.warning("%s cannot be captured in a CUDA graph (%s); it runs eagerly for these inputs",
                               self.what, e)
                state, out = "eager", self.fn(*args)
        elif state == "eager":
            out = self.fn(*args)
        elif state == "warm":
            state, out = self._capture(device, spec, leaves, args)
        else:
            graph, inputs, out_spec, outputs = state
            for buf, x in zip(inputs, leaves):
                buf.copy_(x)
            graph.replay()
            out = unflatten(out_spec, outputs)
        self.entries[key] = state
        while len(self.entries) > self.max_graphs:
            self.entries.pop(next(iter(self.entries)))
        return out

    def _capture(self, device: torch.device, spec: Any, leaves: list[Tensor], args: tuple) -> tuple[Any, Any]:
        inputs = [x.clone() for x in leaves]
        static_args = unflatten(spec, inputs)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                result = self.fn(*static_args)
            outputs: list[Tensor] = []
            out_spec = flatten(result, outputs)
        except (RuntimeError, TypeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            logger.warning("capturing %s in a CUDA graph failed (%s); it runs eagerly for these inputs", self.what,
                           reason)
            torch.cuda.synchronize(device)
            return "eager", self.fn(*args)
        graph.replay()
        return (graph, inputs, out_spec, outputs), unflatten(out_spec, outputs)


class GraphSlot:
    """A holder for CUDA-graph state on a module; ``copy.deepcopy`` and pickling give an empty one."""

    def __init__(self, value: Any = None):
        self.value = value

    def __deepcopy__(self, memo) -> "GraphSlot":
        return GraphSlot()

    def __getstate__(self) -> dict:
        return {"value": None}
