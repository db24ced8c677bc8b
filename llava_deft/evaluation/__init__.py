"""The comparison harness's library (issue 15): statistics first (``stats``); the sweep planning, runner,
store and report move here from ``eval/deft_sweep.py`` next."""

from .stats import MeanStd, PairedComparison, mean_std, paired_bootstrap

__all__ = ["MeanStd", "PairedComparison", "mean_std", "paired_bootstrap"]
