"""Every command-line script's ``--help`` renders: argparse formats each option's help with ``%``, so a
stray ``%`` in a help string (``"% of the base"``) crashes ``--help`` with a TypeError that only a user
who asks for help would meet. Each script runs as ``__main__`` until it builds its parser; the parser's
help is formatted there and the run stops before any work."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(str(p.relative_to(ROOT)) for folder in ("eval", "scripts") for p in (ROOT / folder).glob("*.py")
                 if "argparse" in p.read_text())


class _Stop(Exception):
    pass


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_renders(script, monkeypatch):
    seen: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        seen.append(self.format_help())  # formats every option's help string, as --help does
        raise _Stop

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)
    monkeypatch.setattr(sys, "argv", [script])
    with pytest.raises(_Stop):
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert seen and "usage:" in seen[0]


def test_the_scripts_are_found():
    assert "eval/clustering_sweep.py" in SCRIPTS and "eval/bench_reducers.py" in SCRIPTS
