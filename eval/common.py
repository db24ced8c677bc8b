"""Shared helpers of the eval scripts: run metadata (device, date, commit) and result writing."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from llava_deft.provenance import git_commit, utc_now


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_metadata(device: torch.device) -> dict:
    import transformers

    return {
        "date": utc_now(),
        "commit": git_commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_figure(fig, path: Path) -> None:
    """Lay out, write ``path`` (its folder created) at 100 dpi and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


from llava_deft.evaluation.loop import exact_match  # noqa: E402,F401  (the one answer check; eval scripts import it here)
