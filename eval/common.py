"""Shared helpers of the eval scripts: run metadata (device, date, commit) and result writing."""

from __future__ import annotations

import json
from pathlib import Path


from llava_deft.provenance import device_name, run_metadata  # noqa: F401  (re-exported for eval/*.py)


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
