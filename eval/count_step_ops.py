"""Count the tensor operations one training step (forward + backward) dispatches, by part of the model.

    python eval/count_step_ops.py                                   # the DeFT comparison model at 0.25
    python eval/count_step_ops.py --pipeline configs/pipeline/pool.yaml --ratio 0.11 --batch-size 64

On a GPU each counted op is (about) one kernel launch, and the tiny models of the easy-VQA comparison
are launch-bound, so this count, not FLOPs, sets their steps per second. Views and other
metadata-only ops (``view``, ``t``, ``expand``, ``detach``, ...) launch nothing and are left out.
Runs on the CPU; the count does not depend on the device. Prints one line per part and the total.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llava_deft.data import EasyVQADataset, build_collator  # noqa: E402
from llava_deft.model import LlavaDeftForCausalLM  # noqa: E402

aten = torch.ops.aten
METADATA_OPS = {
    aten.detach.default, aten.view.default, aten._unsafe_view.default, aten.t.default, aten.expand.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.transpose.int, aten.permute.default, aten.slice.Tensor,
    aten.select.int, aten.alias.default, aten.reshape.default, aten.as_strided.default, aten.split.Tensor,
    aten.unbind.int,
}


class OpCounter(TorchDispatchMode):
    """Counts every non-metadata op under the label on top of ``self.stack``."""

    def __init__(self):
        super().__init__()
        self.stack = ["model glue (splice, loss, ...)"]
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in METADATA_OPS:
            self.counts[self.stack[-1]] += 1
        return func(*args, **(kwargs or {}))


def main(argv=None) -> dict[str, int]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-config", default="configs/model/easyvqa_cs64.yaml")
    p.add_argument("--pipeline", default="configs/pipeline/deft.yaml", help="pipeline YAML")
    p.add_argument("--ratio", type=float, default=0.25, help="retention ratio of the pipeline's reducers")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)

    cfg = yaml.safe_load((REPO / args.model_config).read_text())
    cfg["pipeline"] = yaml.safe_load((REPO / args.pipeline).read_text())
    model = LlavaDeftForCausalLM(cfg).train()
    if any(hasattr(s, "retention_ratio") for s in model.pipeline.stages):
        model.pipeline.set_retention(args.ratio)
    data = EasyVQADataset("train", limit=args.batch_size)
    collate = build_collator(model.processors)
    batch = collate([data[i] for i in range(args.batch_size)])

    counter = OpCounter()
    parts = [("vision", model.vision), ("projector", model.projector), ("llm", model.llm)]
    parts += [(f"pipeline.{s.stage_name}", s) for s in model.pipeline.stages]
    def enter(name):
        def hook(module, inputs):
            counter.stack.append(name)
        return hook

    def leave(module, inputs, output):  # returns None: the output is left as it is
        counter.stack.pop()

    for name, module in parts:
        module.register_forward_pre_hook(enter(name))
        module.register_forward_hook(leave)
    model(**batch).loss.backward()  # warm-up: lazy initialisation is not part of a step
    model.zero_grad()
    with counter:
        loss = model(**batch).loss
        counter.stack.append("backward (all parts)")
        loss.backward()
    for name, n in counter.counts.most_common():
        print(f"{name:32s} {n:6d}")
    total = sum(counter.counts.values())
    print(f"{'total (forward + backward)':32s} {total:6d}")
    return dict(counter.counts)


if __name__ == "__main__":
    main()
