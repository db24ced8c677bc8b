"""Where a model or a result came from: the code's commit, and the record a training run leaves in its export.

A run's ``final/`` holds, beside the model, ``train_config.yaml`` (the resolved recipe) and
``training.json`` (:func:`training_record`): the command that reproduces it, the commit, device,
world size, steps and final loss per stage, and dates. Eval scripts copy that record into their results (:func:`read_training_record`).
"""

from __future__ import annotations

import datetime as _dt
import gzip
import json
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

TRAINING_RECORD = "training.json"
TRAIN_CONFIG = "train_config.yaml"


def git_commit() -> str:
    """Short commit of the code (``-dirty`` with uncommitted changes); ``LLAVA_DEFT_COMMIT`` overrides it
    where the checkout's git metadata is not the code's (e.g. a copied working tree on a GPU box)."""
    if os.environ.get("LLAVA_DEFT_COMMIT"):
        return os.environ["LLAVA_DEFT_COMMIT"]
    here = Path(__file__).parent
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here)
    if out.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=here)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def device_name(device) -> str:
    """A result row's device: the GPU's name, or the CPU and its thread count."""
    import platform

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_metadata(device) -> dict:
    """What every result row records: date, commit, device, torch and transformers versions."""
    import torch
    import transformers

    return {"date": utc_now(), "commit": git_commit(), "device": device_name(device), "torch": torch.__version__,
            "transformers": transformers.__version__}


def training_record(argv: list[str], started: str, world_size: int, device: str, stages: list[dict]) -> dict:
    """What ``final/training.json`` holds; ``command`` re-runs the training from the repo root."""
    launcher = ["python"] if world_size == 1 else ["deepspeed", "--num_gpus", str(world_size)]
    return {
        "command": shlex.join([*launcher, "-m", "llava_deft.train", *_without_local_rank(argv)]),
        "commit": git_commit(),
        "started": started,
        "finished": utc_now(),
        "device": device,
        "world_size": world_size,
        "stages": stages,  # per stage: {"steps", "final_loss"} (train_log.jsonl's last line of it)
        "train_config": TRAIN_CONFIG,
    }


def _without_local_rank(argv: list[str]) -> list[str]:
    """``argv`` less the ``--local_rank`` a launcher adds to every rank's command line."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--local_rank", "--local-rank"):
            skip = True
        elif not a.startswith(("--local_rank=", "--local-rank=")):
            out.append(a)
    return out


def read_training_record(model_dir: str | Path) -> dict | None:
    """The ``training.json`` of a training export, or None for a model saved some other way."""
    path = Path(model_dir) / TRAINING_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"'{path}' is not valid JSON ({e}); delete it or re-export the model") from None
    if not isinstance(record, dict):
        raise ValueError(f"'{path}' must hold a JSON object, got {type(record).__name__}")
    return record


def describe_training(record: dict | None) -> str | None:
    """One markdown line for a result file: how the evaluated model was trained."""
    if record is None:
        return None
    stages = record.get("stages") or []
    steps = " + ".join(str(s.get("steps")) for s in stages) or "?"
    loss = stages[-1].get("final_loss") if stages else None
    return (f"Trained by `{record.get('command')}` (commit {record.get('commit')}, {record.get('device')}, "
            f"world size {record.get('world_size')}, {steps} steps"
            + (f", final training loss {loss:.4f}" if isinstance(loss, (int, float)) else "")
            + f", finished {record.get('finished')}).")


def save_gzipped_trace(prof, path: str | Path) -> Path:
    """Write a finished ``torch.profiler.profile``'s timeline to ``path`` as gzipped Chrome trace JSON
    (chrome://tracing, Perfetto); the uncompressed export goes through a temporary folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        with raw.open("rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return path
