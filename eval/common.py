"""Shared helpers of the eval scripts: run metadata (device, date, commit) and result writing."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path

import torch


def git_commit() -> str:
    """Short commit of the code (``-dirty`` with uncommitted changes); ``LLAVA_DEFT_COMMIT`` overrides it
    where the checkout's git metadata is not the code's (e.g. a copied working tree on a GPU box)."""
    if os.environ.get("LLAVA_DEFT_COMMIT"):
        return os.environ["LLAVA_DEFT_COMMIT"]
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    if out.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=Path(__file__).parent)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_metadata(device: torch.device) -> dict:
    import transformers

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def exact_match(prediction: str, reference: str | None) -> bool:
    """The eval scripts' answer check: equal after ``strip().lower()``."""
    return prediction.strip().lower() == (reference or "").strip().lower()
