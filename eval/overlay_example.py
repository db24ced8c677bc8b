"""An example kept-tokens overlay: DeFT at retention 0.25 on an easy-VQA test image.

    python eval/overlay_example.py                                        # random-init tiny model
    python eval/overlay_example.py --model runs/easyvqa_tiny/final --rtd-mode fast --out kept.png

Without ``--model`` the model is the tiny default of the demo (``configs/model/easyvqa_cpu.yaml``),
randomly initialised from ``--seed``: its sam / fgcs / rtd stages are untrained, so the picture shows
what the overlay looks like, not what a trained DeFT keeps. ``--rtd-mode hybrid`` (the default here)
lets rtd bring pruned tokens back, so the picture has a panel for fgcs and one for rtd. Prints the
question, the answer and each panel's kept/total.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llava_deft.data import EasyVQADataset  # noqa: E402
from llava_deft.inference import LlavaDeft, load_model, reducing_stages  # noqa: E402
from llava_deft.model import LlavaDeftForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a saved model directory (default: random-init tiny model)")
    p.add_argument("--model-config", default=str(ROOT / "configs/model/easyvqa_cpu.yaml"),
                   help="model config of the random-init model (without --model)")
    p.add_argument("--pipeline", default=str(ROOT / "configs/pipeline/deft.yaml"), help="reduction pipeline YAML")
    p.add_argument("--rtd-mode", choices=["fast", "hybrid", "adaptive"], default="hybrid", help="the pipeline's rtd mode")
    p.add_argument("--retention", type=float, default=0.25, help="fgcs retention ratio")
    p.add_argument("--index", type=int, default=0, help="which easy-VQA test question (its image is drawn)")
    p.add_argument("--seed", type=int, default=0, help="init seed of the random-init model")
    p.add_argument("--out", default=str(ROOT / "eval/results/overlay_example.png"), help="PNG to write")
    args = p.parse_args(argv)

    if args.model is not None:
        api = load_model(args.model, device="cpu")
    else:
        torch.manual_seed(args.seed)
        api = LlavaDeft(LlavaDeftForCausalLM(args.model_config), device="cpu")
    pipeline = yaml.safe_load(Path(args.pipeline).read_text())
    for stage in pipeline["stages"]:
        if stage["name"] == "rtd":
            stage["mode"] = args.rtd_mode
    sample = EasyVQADataset("test", limit=args.index + 1)[args.index]
    image = sample["images"][0]
    question = sample["messages"][0]["content"].replace("<image>", "").strip()
    answer, info = api.generate(question, images=[image], pipeline=pipeline, retention=args.retention,
                                max_new_tokens=8, return_stats=True)
    reduction = info.media[0][0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    api.draw_reduction(image, reduction).save(out)
    print(f"question: {question}\nanswer: {answer!r} (reference: {sample['messages'][1]['content']})")
    for name, kept in reducing_stages(reduction):
        print(f"{name}: {len(kept)}/{reduction.total} tokens")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
