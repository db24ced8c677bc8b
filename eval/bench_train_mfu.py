"""Training throughput as model FLOPs utilisation (MFU) of the training entry (issue 16, item 4).

Runs ``python -m llava_deft.train`` (DeepSpeed, the recipe's ZeRO config) on a recipe -- by default
``configs/train/mfu_1b.yaml``: a Llama-3.2-1B-shaped decoder (0.97B parameters) in bf16 on pass-key passages
of 1,024 tokens, batch 8 -- and turns its ``train_log.jsonl`` into a rate between the first logged step
after ``--skip`` steps (start-up, DeepSpeed's first steps and the data workers' warm-up left out) and the
last:

- tokens/s = the LLM's real (unpadded) input tokens per second (``llm_tokens`` of the log: prompt +
  spliced passage), and the padded count the GPU computes on;
- model FLOPs per token = ``6 * N + 12 * L * d * S`` (PaLM's appendix B): N = the parameters the step
  multiplies with for every token -- the LLM's decoder layers and ``lm_head``, not the input embedding table
  (a lookup) nor the frozen, unused vision tower; L layers of width d; S = the mean padded sequence length
  (the attention term counts the full S x S scores, as PaLM does, though causal kernels skip half);
- MFU = model FLOPs per second / the device's dense bf16 peak (H100 / H200 SXM: 989.4 TFLOP/s).

    python eval/bench_train_mfu.py                                  # GPU, 60 steps of the ~1B recipe
    python eval/bench_train_mfu.py --steps 200 --skip 20 stages.0.lr=3e-4 per_device_batch_size=16
    python eval/bench_train_mfu.py --smoke --out /tmp/mfu           # CPU, the tiny model, a few steps
    python eval/bench_train_mfu.py --profile 5                      # then 5 more steps under torch.profiler

``--profile N`` runs N steps after the timed ones under torch.profiler (the training entry's
``profile_steps``; they are not in the rate) and writes ``<name>_profile.txt`` (ops by device time, then
by host time) and ``<name>_profile.json.gz`` (the trace): what holds the MFU down.

Extra ``key=value`` arguments are the training entry's overrides. Writes ``<out>/<name>.json`` and
``<name>.md`` with device, date, commit, the command, and the run's stage record (parameter counts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python eval/bench_train_mfu.py` from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from eval.common import run_metadata, write_json  # noqa: E402
from llava_deft.config.model import load_model_config  # noqa: E402
from llava_deft.config.train import load_train_config  # noqa: E402

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense bf16 FLOP/s of the SXM parts

SMOKE = ["model.llm.config.hidden_size=64", "model.llm.config.intermediate_size=128",
         "model.llm.config.num_hidden_layers=2", "model.llm.config.num_attention_heads=4",
         "model.llm.config.num_key_value_heads=2", "data.min_tokens=64", "data.max_tokens=64",
         "per_device_batch_size=2", "bf16=false", "num_workers=0", "log_steps=1"]


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/train/mfu_1b.yaml"))
    p.add_argument("--steps", type=int, default=60, help="optimizer steps to run")
    p.add_argument("--skip", type=int, default=10, help="steps left out of the rate (start-up); a multiple of log_steps")
    p.add_argument("--smoke", action="store_true", help="a tiny model on the CPU for 4 steps: checks the script runs")
    p.add_argument("--out", default="eval/results")
    p.add_argument("--name", default=None, help="default train_mfu_<device>")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="then N more steps under torch.profiler (not timed): <name>_profile.txt and .json.gz")
    p.add_argument("overrides", nargs="*", help="the training entry's key.path=value overrides")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.skip = 4, 1
        args.overrides = SMOKE + args.overrides
    if not 0 <= args.skip < args.steps:
        p.error(f"--skip must be in [0, --steps), got {args.skip} with --steps {args.steps}")
    if args.profile < 0:
        p.error(f"--profile must be >= 0 steps, got {args.profile}")
    return args, args.overrides


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def matmul_params(llm: dict, vocab: int) -> int:
    """Parameters multiplied with for every token: decoder layers (attention, MLP, norms) and lm_head."""
    d, inter, layers = llm["hidden_size"], llm["intermediate_size"], llm["num_hidden_layers"]
    heads = llm["num_attention_heads"]
    kv = llm.get("num_key_value_heads") or heads
    head_dim = llm.get("head_dim") or d // heads
    attn = d * heads * head_dim * 2 + d * kv * head_dim * 2  # q, o and k, v projections
    mlp = 3 * d * inter  # gate, up, down
    return layers * (attn + mlp + 2 * d) + d + vocab * d  # + layer norms, final norm, lm_head


def train(args, overrides: list[str], run_dir: Path) -> None:
    extra = [f"profile_steps=[{args.steps},{args.steps + args.profile}]"] if args.profile else []
    cmd = [sys.executable, "-m", "llava_deft.train", "--config", args.config, f"output_dir={run_dir}",
           f"stages.0.max_steps={args.steps + args.profile}", *extra, *overrides]
    print("[mfu] " + " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def measure(args, overrides: list[str], run_dir: Path) -> dict:
    from llava_deft.config.base import apply_overrides

    cfg = load_train_config(args.config)
    data = apply_overrides(cfg.model_dump(), [f"stages.0.max_steps={args.steps}", *overrides])
    model_cfg = load_model_config(data["model"])
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    log = [r for r in log if r["step"] <= args.steps]  # the profiled steps after them are not timed
    first = next((r for r in log if r["step"] >= args.skip), None)
    last = log[-1] if log else None
    if last is not None and last["step"] != args.steps:
        raise RuntimeError(f"the log has no record at step {args.steps} (its steps: {[r['step'] for r in log]}); "
                           f"make --steps a multiple of log_steps")
    if first is None or first is last:
        raise RuntimeError(f"the log has no step >= {args.skip} before its last ({[r['step'] for r in log]}); "
                           f"run more --steps or log more often (log_steps)")
    seconds = last["elapsed_s"] - first["elapsed_s"]
    steps = last["step"] - first["step"]
    real = last["llm_tokens"] - first["llm_tokens"]
    padded = last["llm_tokens_padded"] - first["llm_tokens_padded"]
    samples = steps * data["per_device_batch_size"] * data["gradient_accumulation_steps"]
    llm = model_cfg.llm.config
    record = sorted(run_dir.glob("stage0_*/stage.json"))  # the training entry's stage record (parameter counts)
    stage = json.loads(record[0].read_text()) if record else {}
    from llava_deft.model.tokenizer import load_model_tokenizer

    vocab = len(load_model_tokenizer(model_cfg.tokenizer, model_cfg.llm.path))
    n = matmul_params(llm, vocab)
    seq = padded / samples  # mean padded sequence length
    per_token = 6 * n + 12 * llm["num_hidden_layers"] * llm["hidden_size"] * seq
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    peak = peak_flops(device)
    flops = per_token * real / seconds
    return {
        "steps_timed": steps, "seconds": seconds, "steps_per_s": steps / seconds, "samples_per_s": samples / seconds,
        "tokens_per_s": real / seconds, "padded_tokens_per_s": padded / seconds, "mean_padded_seq": seq,
        "matmul_params": n, "total_params": stage.get("total_params"), "trainable_params": stage.get("trainable_params"),
        "flops_per_token": per_token, "model_tflops_per_s": flops / 1e12, "peak_tflops": None if peak is None else peak / 1e12,
        "mfu": None if peak is None else flops / peak,
        "mfu_padded": None if peak is None else per_token * padded / seconds / peak,
        "loss_first": first["loss"], "loss_last": last["loss"], "device": device,
    }


def markdown(res: dict, meta: dict, command: str) -> str:
    f = lambda v, p=1: "—" if v is None else f"{v:,.{p}f}"  # noqa: E731
    pct = lambda v: "—" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    return "\n".join([
        f"# Training MFU of the training entry ({meta['device']})", "",
        f"{meta['date']}, commit {meta['commit']}, torch {meta['torch']}; `{command}`", "",
        "| steps timed | s | samples/s | tokens/s (real) | tokens/s (padded) | mean seq | matmul params | "
        "TFLOP/s (model) | peak | MFU | MFU on padded |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {res['steps_timed']} | {f(res['seconds'], 2)} | {f(res['samples_per_s'])} | {f(res['tokens_per_s'], 0)} | "
        f"{f(res['padded_tokens_per_s'], 0)} | {f(res['mean_padded_seq'], 0)} | {res['matmul_params'] / 1e6:,.1f}M | "
        f"{f(res['model_tflops_per_s'])} | {f(res['peak_tflops'])} | {pct(res['mfu'])} | {pct(res['mfu_padded'])} |", "",
        "Model FLOPs per token = 6 N + 12 L d S (N: decoder layers and lm_head; S: mean padded length); MFU = model "
        "FLOP/s on real tokens / the dense bf16 peak."
        + (f" Where the time goes: `{res['profile']}` (torch.profiler over the steps after the timed ones)."
           if res.get("profile") else ""), ""])


def main(argv=None) -> dict:
    args, overrides = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = args.name or f"train_mfu_{'cpu' if device.type == 'cpu' else 'gpu'}"
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="mfu_") as tmp:
        run_dir = Path(tmp) / "run"
        train(args, overrides, run_dir)
        res = measure(args, overrides, run_dir)
        if args.profile:
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(run_dir / "profile_stage0.txt", out / f"{name}_profile.txt")
            shutil.copy(run_dir / "profile_stage0.json.gz", out / f"{name}_profile.json.gz")
            res["profile"] = f"{name}_profile.txt"
    meta = run_metadata(device)
    command = "python eval/bench_train_mfu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_json(out / f"{name}.json", {"meta": meta, "command": command, "config": args.config, "overrides": overrides,
                                      "result": res})
    md = markdown(res, meta, command)
    (out / f"{name}.md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
