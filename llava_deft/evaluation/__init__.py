"""The comparison harness (issue 15): one evaluation loop (``loop``), the data it is scored on
(``data``: a built-in task or any LLaVA-JSON pair), statistics (``stats``: mean ± std over seeds, the
paired bootstrap), the sweep from a YAML spec (``sweep``: plan, training runs, result store) and its
report (``report``: tables, acceptance checks, plots). ``eval/*.py`` and ``llava-deft eval|sweep`` are
thin entry points over these.

Submodules are imported on first use (``sweep`` pulls in the pipeline registry and the trainer's config)."""

from .stats import MeanStd, PairedComparison, mean_std, paired_bootstrap

__all__ = ["MeanStd", "PairedComparison", "mean_std", "paired_bootstrap"]
