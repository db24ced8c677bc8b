"""A reducer x retention-ratio x seed sweep, training-free and trained, from one YAML spec.

    spec = load_spec("configs/sweeps/scenes.yaml", overrides=["seeds=[0]"])
    outcome = run(spec, only=["base", "deft_q@0.25"], time_budget=480)   # resumable; call again to go on
    markdown = report(spec)                                              # <out>/<name>.{md,png} from the JSON

    llava-deft sweep run configs/sweeps/scenes.yaml [key=value ...] [--only ...] [--time-budget S]
    llava-deft sweep report configs/sweeps/scenes.yaml

A spec (``SweepSpec``; every key below, unknown keys are errors)::

    name: scenes                       # output stem: <out>/<name>.{json,md,png}; runs under <runs>
    title: "scenes (144 tokens/image)"
    recipe: configs/train/scenes_deft.yaml   # every run's training recipe
    data: {task: scenes}               # or {train: my/train.json, test: my/test.json, image_folder: my}
    reducers: {deft_q: configs/pipeline/deft_q.yaml, random: configs/pipeline/random.yaml, ...}
    method: deft_q                     # what the checks are about; its pipeline at retention 1.0 trains the base
    ratios: [0.25, 0.11]
    seeds: [0, 1, 2]                   # null: the recipe's seed
    protocols: [training_free, trained]   # and/or finetuned
    thresholds: {0.25: 99.0, 0.11: 97.0}   # % of the base's accuracy the method must keep
    beats: [random, pool]              # null: every reducer that is neither the method nor an ablation
    ablations: {deft: deft_q}          # ablation -> the reducer it ablates (differences, not checks)
    rtd: {modes: [fast], ratio: 0.11}  # pipelines with an rtd stage: modes evaluated at that ratio
    training: {steps: null, save_steps: null, overrides: [], parallel: null, num_workers: 0,
               finetune_steps: null, finetune_overrides: []}
    evaluation: {batch_size: 256, max_new_tokens: 8, ttft_batch: 1, ttft_repeats: 5, device: null}
    bootstrap: {resamples: 10000, confidence: 0.95}
    runs: runs/sweeps/scenes
    out: eval/results

Paths are relative to the working directory (run from the repository root). The no-reduction model
("base") is trained with the method's pipeline at retention 1.0. Then ``training_free``: each seed's
base checkpoint with each reducer's pipeline at each ratio (stages whose names and shapes match keep
the base's trained weights); ``trained``: each reducer x ratio x seed trained with that pipeline in the
loop (same recipe) and evaluated; ``finetuned``: each reducer x ratio x seed starts from that seed's base
checkpoint (``init_from``) and trains ``training.finetune_steps`` more steps with its pipeline in the loop
(``training.overrides`` then ``training.finetune_overrides``, e.g. a retention ramp from 1.0 with no hold), as
LLaVA token reducers are fine-tuned from a trained LLaVA; a base trained in the same call is waited for.
The checks are decided on ``trained`` and ``finetuned`` rows. With a ``train``/``test`` pair the recipe's data is replaced by the
``train`` file; with a built-in ``task`` the recipe names its data.

Training runs are subprocesses (``python -m llava_deft.train``), ``training.parallel`` at a time (spread
round-robin over the visible GPUs), the bases first, logging to ``<runs>/<run>.log``. This process
evaluates as soon as a run has exported ``final/`` and merges its rows into ``<out>/<name>.json``
atomically, so a call that is killed keeps every row it finished; a complete ``final/`` is never trained
again, an interrupted run resumes from its last checkpoint. ``time_budget`` (seconds): no run is
launched with less than ``launch_margin`` left; at the deadline the running ones are stopped (the next
call resumes them), what finished is evaluated and the report written. A row already there for the
same checkpoint, pipeline, data limit, steps and overrides is not evaluated again (``reeval`` forces it).

Each row keeps the per-question record (``correct``) that the paired bootstrap of "A beats B" needs, and
the median time to first token at ``evaluation.ttft_batch`` on the evaluation device with the number of
training runs that shared it meanwhile (``ttft_concurrent_trainings``). When the data has answered
LLaVA-JSON training records, the question prior (:mod:`.prior`: the text alone) gets one row per seed, and
the report checks that the base beats it; a base that does not cannot rank reducers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from tqdm.auto import tqdm

from pipeline import PipelineConfigError, get_stage, list_stages, validate_config
from pipeline.stages.rtd import MODES as RTD_MODES

from ..config.base import Strict, apply_overrides
from ..errors import ConfigError, TaskDataError
from ..provenance import run_metadata
from .data import EvalData, load_dataset, question_type, task_json
from .loop import predict, score, time_to_first_token
from .prior import question_prior, read_records
from .report import (
    BASE,
    LEGACY_SEED,
    PRIOR,
    DEFAULT_PROTOCOLS,
    ReportSpec,
    build_report,
    merge_rows,
    plot_sweep,
    ratio_tag,
    row_key,
)

LOG_TAIL_LINES = 25
TERMINATE_GRACE_S = 10.0  # a stopped training run gets this long after SIGTERM before SIGKILL


class SweepSpecError(ConfigError):
    """A sweep spec that cannot be run: the message names the key and how to fix it."""


# ---------------------------------------------------------------------------------- the spec
class TrainingOptions(Strict):
    steps: int | None = Field(None, gt=0)  # max_steps of every training stage (None: the recipe's epochs)
    save_steps: int | None = Field(None, gt=0)
    overrides: list[str] = Field(default_factory=list)  # key=value overrides of every run's recipe
    parallel: int | None = Field(None, gt=0)  # runs at once (None: 13 with a GPU, else 1)
    num_workers: int = Field(0, ge=0)
    finetune_steps: int | None = Field(None, gt=0)  # max_steps of a finetuned run's stages (None: as `steps`)
    finetune_overrides: list[str] = Field(default_factory=list)  # after `overrides`, for finetuned runs only

    def steps_for(self, protocol: str) -> int | None:
        """max_steps of the runs behind ``protocol``'s rows (None: the recipe's epochs)."""
        return (self.finetune_steps or self.steps) if protocol == "finetuned" else self.steps

    def overrides_for(self, protocol: str) -> list[str]:
        return [*self.overrides, *self.finetune_overrides] if protocol == "finetuned" else list(self.overrides)

    @field_validator("overrides", "finetune_overrides")
    @classmethod
    def _no_sweep_keys(cls, v: list[str]) -> list[str]:
        clash = [o for o in v if o.partition("=")[0].strip() in ("seed", "output_dir", "model.pipeline")]
        if clash:
            raise ValueError(f"training.overrides {clash}: seeds, run folders and pipelines are the sweep's (use `seeds:`)")
        start = [o for o in v if o.partition("=")[0].strip() == "init_from"]
        if start:
            raise ValueError(f"training.overrides {start}: the finetuned protocol sets init_from (its seed's base)")
        bad = [o for o in v if "=" not in o]
        if bad:
            raise ValueError(f"training.overrides {bad} are not key=value")
        return v


class EvaluationOptions(Strict):
    batch_size: int = Field(256, gt=0)
    max_new_tokens: int = Field(8, gt=0)
    ttft_batch: int = Field(1, ge=0)  # 0: do not measure time to first token
    ttft_repeats: int = Field(5, gt=0)
    device: str | None = None  # None: cuda when available


class RTDOptions(Strict):
    modes: list[str] = Field(default_factory=lambda: ["fast"])
    ratio: float = 0.11

    @field_validator("modes")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in RTD_MODES]
        if bad or not v:
            raise ValueError(f"rtd.modes {v}: each must be one of {list(RTD_MODES)}")
        return v


class BootstrapOptions(Strict):
    resamples: int = Field(10_000, gt=0)
    confidence: float = Field(0.95, gt=0, lt=1)


class SweepSpec(Strict):
    name: str
    title: str = ""
    recipe: str
    data: EvalData
    reducers: dict[str, str]
    method: str
    ratios: list[float]
    seeds: list[int] | None = None
    protocols: list[Literal["training_free", "trained", "finetuned"]] = Field(default_factory=lambda: list(DEFAULT_PROTOCOLS))
    thresholds: dict[float, float] = Field(default_factory=dict)
    beats: list[str] | None = None
    ablations: dict[str, str] = Field(default_factory=dict)
    rtd: RTDOptions = Field(default_factory=RTDOptions)
    training: TrainingOptions = Field(default_factory=TrainingOptions)
    evaluation: EvaluationOptions = Field(default_factory=EvaluationOptions)
    bootstrap: BootstrapOptions = Field(default_factory=BootstrapOptions)
    runs: str | None = None
    out: str = "eval/results"

    @field_validator("name")
    @classmethod
    def _stem(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError(f"name {v!r} must be a file stem (no '/', not starting with '.')")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        for name in self.reducers:
            if name == BASE or "@" in name or "/" in name or "#" in name:
                raise ValueError(f"reducer name {name!r} is reserved or has '@', '/' or '#'; choose another")
        if self.method not in self.reducers:
            raise ValueError(f"method {self.method!r} is not one of the reducers {list(self.reducers)}")
        bad = [r for r in self.ratios if not 0 < r < 1]
        if bad or not self.ratios:
            raise ValueError(f"ratios must be a non-empty list in (0, 1) (1.0 is the base); got {self.ratios}")
        if len(set(self.ratios)) != len(self.ratios):
            raise ValueError(f"ratios {self.ratios} names a ratio twice")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"seeds {self.seeds} must be distinct (or null: the recipe's seed)")
        unknown = [n for n in [*(self.beats or []), *self.ablations, *self.ablations.values()] if n not in self.reducers]
        if unknown:
            raise ValueError(f"beats/ablations name {sorted(set(unknown))}, which are not reducers {list(self.reducers)}")
        if self.method in (self.beats or []) or self.method in self.ablations:
            raise ValueError(f"the method {self.method!r} cannot be in beats or be an ablation")
        bad_t = {r: t for r, t in self.thresholds.items() if not 0 < t <= 100 or not 0 < r < 1}
        if bad_t:
            raise ValueError(f"thresholds {bad_t}: ratio in (0, 1) -> % of base in (0, 100]")
        if not self.protocols:
            raise ValueError("protocols is empty; give training_free, trained and/or finetuned")
        return self

    @property
    def runs_dir(self) -> Path:
        return Path(self.runs if self.runs is not None else f"runs/sweeps/{self.name}")

    @property
    def beaten(self) -> tuple[str, ...]:
        if self.beats is not None:
            return tuple(self.beats)
        return tuple(n for n in self.reducers if n != self.method and n not in self.ablations)

    @property
    def json_path(self) -> Path:
        return Path(self.out) / f"{self.name}.json"

    def report_spec(self) -> ReportSpec:
        return ReportSpec(self.name, self.method, tuple(self.reducers), dict(self.thresholds), self.beaten,
                          dict(self.ablations), self.rtd.ratio, self.title, self.bootstrap.resamples,
                          self.bootstrap.confidence)

    def device(self) -> str:
        return self.evaluation.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def parallel(self) -> int:
        return self.training.parallel or (13 if torch.cuda.is_available() else 1)


def load_spec(path: str | Path, overrides: list[str] = ()) -> SweepSpec:
    """A sweep spec from YAML, with ``key=value`` overrides (values parsed as YAML); :class:`SweepSpecError`
    naming the file and every problem."""
    path = Path(path)
    if not path.is_file():
        raise SweepSpecError(f"sweep spec '{path}' does not exist; the shipped ones are in configs/sweeps/")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepSpecError(f"sweep spec '{path}' is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise SweepSpecError(f"sweep spec '{path}' must be a mapping (name:, recipe:, data:, reducers:, ...)")
    data = apply_overrides(data, list(overrides))
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        lines = [f"{'.'.join(map(str, err['loc'])) or '<spec>'}: {err['msg']}" for err in e.errors()]
        raise SweepSpecError(f"sweep spec '{path}': " + "; ".join(lines)) from None


# ---------------------------------------------------------------------------------- selection
def parse_only(items: list[str] | None, reducers: list[str], ratios: list[float]) -> dict[str, set[float]] | None:
    """``only`` -> ``{name: ratios}`` (``"base"`` maps to ``{1.0}``); None selects everything.
    Items are ``base``, ``REDUCER`` (every ratio) or ``REDUCER@RATIO``."""
    if items is None:
        return None
    sel: dict[str, set[float]] = {}
    for item in items:
        name, sep, tag = item.partition("@")
        if name == BASE and not sep:
            sel[BASE] = {1.0}
            continue
        if name not in reducers:
            raise ValueError(f"unknown reducer {name!r} in --only {item!r}; available: {[BASE, *reducers]}")
        if not sep:
            sel.setdefault(name, set()).update(ratios)
            continue
        try:
            r = float(tag)
        except ValueError:
            raise ValueError(f"--only {item!r}: {tag!r} is not a ratio") from None
        match = [x for x in ratios if math.isclose(x, r, rel_tol=0, abs_tol=1e-9)]
        if not match:
            raise ValueError(f"--only {item!r}: ratio {tag} is not in ratios {ratios}")
        sel.setdefault(name, set()).add(match[0])
    return sel


def selected(sel: dict[str, set[float]] | None, name: str, ratio: float) -> bool:
    return sel is None or ratio in sel.get(name, set())


def resolve_pipeline(path: str | Path, ratio: float) -> dict:
    """The pipeline YAML at ``path`` with every stage that has a ``retention_ratio`` set to ``ratio``
    (stages leaving it at its default too). Returns the validated config as plain data."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline config '{path}' does not exist")
    if not 0 < ratio <= 1:
        raise ValueError(f"retention ratio must be in (0, 1], got {ratio}")
    data = yaml.safe_load(path.read_text()) or {}
    stages = data if isinstance(data, list) else data.get("stages", []) if isinstance(data, dict) else []
    found = False
    for stage in stages:
        name = stage.get("name") if isinstance(stage, dict) else None
        if name in list_stages() and "retention_ratio" in get_stage(name).Config.model_fields:
            stage["retention_ratio"] = float(ratio)
            found = True
    cfg = validate_config(data).model_dump()  # raises PipelineConfigError listing every error
    if not found:
        names = [s["name"] for s in cfg["stages"]]
        raise ValueError(f"pipeline '{path}' (stages {names}) has no stage with a retention_ratio; a reducer needs one")
    return cfg


def configured_rtd_mode(pipeline_cfg: dict) -> str | None:
    """The mode of the pipeline's rtd stage, None when it has none."""
    return next((s.get("mode", "fast") for s in pipeline_cfg["stages"] if s["name"] == "rtd"), None)


# ---------------------------------------------------------------------------------- result store
def load_results(path: Path) -> dict:
    if not path.is_file():
        return {"commands": [], "rows": []}
    doc = json.loads(path.read_text())
    doc.setdefault("commands", [])
    doc.setdefault("rows", [])
    return doc


def save_rows(path: Path, rows: list[dict], command: str | None = None, extra: dict | None = None) -> dict:
    """Merge ``rows`` (and the command) into the JSON at ``path``, re-read so parallel calls on one disk keep theirs."""
    doc = load_results(path)
    if command is not None and command not in doc["commands"]:
        doc["commands"].append(command)
    doc.update(extra or {})
    doc["rows"] = merge_rows(doc["rows"], rows)
    write_json_atomic(path, doc)
    return doc


def write_json_atomic(path: Path, data: dict) -> None:
    """A temporary file next to ``path``, then ``os.replace``: a reader (or a call killed mid-write) sees
    the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(data, indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Run:
    """A training run: a seed's base, or one reducer at one ratio and seed (trained protocol)."""

    name: str  # "base" or "<reducer>@<ratio>", + "#s<seed>" when seeds are named
    dir: Path
    pipeline: dict  # resolved config, written to dir/pipeline.yaml for the training run
    source: Path  # the reducer's pipeline YAML it was resolved from
    ratio: float
    seed: int = LEGACY_SEED
    pass_seed: bool = False  # give the run `seed=<seed>` (else it trains with the recipe's, which is `seed`)
    protocol: str = "trained"  # BASE, "trained" or "finetuned": which steps and overrides it trains with
    after: str | None = None  # finetuned: the base Run it starts from (init_from <that dir>/final)
    init_from: Path | None = None

    @property
    def pipeline_yaml(self) -> Path:
        return self.dir / "pipeline.yaml"

    @property
    def log(self) -> Path:
        return Path(f"{self.dir}.log")


@dataclass(frozen=True)
class EvalItem:
    """One model to evaluate (in one or more rtd modes): a run's checkpoint, maybe with another pipeline."""

    protocol: str
    reducer: str
    ratio: float
    modes: tuple[str | None, ...]
    run: str  # name of the Run whose final/ is loaded
    pipeline_yaml: Path | None  # replaces the checkpoint's pipeline (training-free); None keeps it
    pipeline: dict
    source: Path
    seed: int = LEGACY_SEED

    @property
    def label(self) -> str:
        return f"{self.protocol} {self.reducer}@{ratio_tag(self.ratio)} seed {self.seed}"


def is_trained(run_dir: Path) -> bool:
    """``final/`` is complete: it has ``config.json`` and every file of the last stage's export at the same
    size (a run stopped while copying leaves a partial one, which the next call's ``--resume`` copies again)."""
    final = run_dir / "final"
    if not (final / "config.json").is_file():
        return False
    stages = [(int(p.parent.name[5:].split("_")[0]), p) for p in run_dir.glob("stage*_*/export")
              if p.parent.name[5:].split("_")[0].isdigit()]
    if not stages:
        return True
    export = max(stages)[1]
    return all((final / f.relative_to(export)).is_file() and (final / f.relative_to(export)).stat().st_size == f.stat().st_size
               for f in export.rglob("*") if f.is_file())


def checkpoint_sha(run_dir: Path) -> str | None:
    """First 12 hex digits of the sha256 of the run's exported weights (None before it exists)."""
    f = run_dir / "final" / "model.safetensors"
    if not f.is_file():
        return None
    h = hashlib.sha256()
    with f.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def _same_config(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def write_pipeline_yaml(path: Path, cfg: dict, source: Path, ratio: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    head = f"# {source} with every retention_ratio at {ratio_tag(ratio)} (written by llava_deft.evaluation.sweep)\n"
    path.write_text(head + yaml.safe_dump(cfg, sort_keys=False))


def _recipe(path: str):
    from ..config import load_train_config

    return load_train_config(path)


def plan(spec: SweepSpec, recipe_seed: int = LEGACY_SEED) -> tuple[dict[str, Run], list[EvalItem]]:
    """Every run and evaluation of the sweep; all configs are resolved (every error at once) first.
    Items come in launch order: every seed's base, then the trained runs seed by seed."""
    runs_dir = spec.runs_dir.resolve()
    resolved: dict[tuple[str, float], dict] = {}
    errors = []
    for name, path in spec.reducers.items():
        for ratio in sorted({*spec.ratios, *([1.0] if name == spec.method else [])}, reverse=True):
            try:
                resolved[name, ratio] = resolve_pipeline(path, ratio)
            except (ValueError, FileNotFoundError) as e:  # PipelineConfigError is a ValueError
                errors.append(f"reducer {name!r}: {e}")
                break
    if errors:
        raise ValueError("\n  ".join([f"{len(errors)} reducer pipeline(s) cannot be resolved:", *errors]))
    has_rtd = [n for n in spec.reducers if configured_rtd_mode(resolved[n, spec.ratios[0]]) is not None]
    if has_rtd and not any(math.isclose(spec.rtd.ratio, r, abs_tol=1e-9) for r in spec.ratios) and len(spec.rtd.modes) > 1:
        raise ValueError(f"rtd.ratio {spec.rtd.ratio} is not in ratios {spec.ratios} (reducers with an rtd stage: {has_rtd})")

    seeds = list(spec.seeds) if spec.seeds else [recipe_seed]
    named = len(seeds) > 1 or seeds[0] != recipe_seed  # else the folders of a one-seed sweep keep their names

    def suffix(seed: int) -> str:
        return f"#s{seed}" if named else ""

    runs: dict[str, Run] = {}
    items: list[EvalItem] = []
    base_cfg, base_src = resolved[spec.method, 1.0], Path(spec.reducers[spec.method])
    base_mode = configured_rtd_mode(base_cfg)
    for seed in seeds:
        b = BASE + suffix(seed)
        runs[b] = Run(b, runs_dir / b, base_cfg, base_src, 1.0, seed, named, BASE)
        items.append(EvalItem(BASE, spec.method, 1.0, (base_mode,), b, None, base_cfg, base_src, seed))
    for seed in seeds:
        for name, path in spec.reducers.items():
            for ratio in spec.ratios:
                cfg = resolved[name, ratio]
                mode = configured_rtd_mode(cfg)
                at_rtd = mode is not None and math.isclose(ratio, spec.rtd.ratio, abs_tol=1e-9)
                modes = tuple(spec.rtd.modes) if at_rtd else (mode,)
                tag = f"{name}@{ratio_tag(ratio)}"
                if "training_free" in spec.protocols:
                    tf_yaml = runs_dir / "training_free" / f"{tag}.yaml"
                    items.append(EvalItem("training_free", name, ratio, modes, BASE + suffix(seed), tf_yaml, cfg, Path(path), seed))
                if "trained" in spec.protocols:
                    run = tag + suffix(seed)
                    runs[run] = Run(run, runs_dir / "trained" / run, cfg, Path(path), ratio, seed, named)
                    items.append(EvalItem("trained", name, ratio, modes, run, None, cfg, Path(path), seed))
                if "finetuned" in spec.protocols:
                    run = f"ft_{tag}{suffix(seed)}"
                    b = BASE + suffix(seed)
                    runs[run] = Run(run, runs_dir / "finetuned" / (tag + suffix(seed)), cfg, Path(path), ratio, seed, named,
                                    "finetuned", b, runs[b].dir / "final")
                    items.append(EvalItem("finetuned", name, ratio, modes, run, None, cfg, Path(path), seed))
    return runs, items


def pending_items(items: list[EvalItem], runs: dict[str, Run], rows: list[dict], spec: SweepSpec, sel,
                  reeval: bool = False) -> list[EvalItem]:
    """Items to evaluate now: selected ones whose rows are missing or stale (another checkpoint, pipeline,
    data limit, steps or overrides), all selected ones with ``reeval``, and each seed's base whenever its
    row is stale (every row of that seed is compared with it)."""
    index = {row_key(r): r for r in rows}

    def current(it: EvalItem) -> bool:
        sha = checkpoint_sha(runs[it.run].dir)  # None when the checkpoint is not here: trust the row
        rs = [index.get((it.protocol, it.reducer, round(it.ratio, 9), m, it.seed)) for m in it.modes]
        return all(
            r is not None and r.get("limit") == spec.data.limit and r.get("skip", 0) == spec.data.skip
            and r.get("steps") == spec.training.steps_for(it.protocol)
            and r.get("overrides", []) == spec.training.overrides_for(it.protocol)
            and _same_config(r.get("pipeline_config", {}), it.pipeline)
            and (sha is None or r.get("checkpoint_sha") == sha)
            for r in rs
        )

    out = []
    for it in items:
        if it.protocol == BASE:
            wanted = not current(it) or (reeval and (sel is None or BASE in sel))
        else:
            wanted = selected(sel, it.reducer, it.ratio) and (reeval or not current(it))
        if wanted:
            out.append(it)
    return out


# ---------------------------------------------------------------------------------- training
class Launcher:
    """Runs ``python -m llava_deft.train`` subprocesses (thread-safe: one ``train_and_report`` per worker
    thread) and sorts each run into done, ``failed`` or ``unfinished``. With a ``deadline``
    (``time.monotonic()`` seconds) no run is launched with less than ``margin`` seconds left, and
    ``stop()`` ends the running ones: those are unfinished, not failed."""

    def __init__(self, spec: SweepSpec, n_runs: int, deadline: float | None = None, margin: float = 120.0):
        self.spec = spec
        self.parallel = spec.parallel()
        self.deadline = deadline
        self.margin = margin if deadline is not None else 0.0
        self.procs: set[subprocess.Popen] = set()
        self.failed: dict[str, str] = {}
        self.unfinished: dict[str, str] = {}
        self.stopping = False
        self.stop_reason = "the sweep stopped"
        self.lock = threading.Lock()
        self.env = dict(os.environ)
        # N concurrent runs must not each take every core
        self.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, min(n_runs, self.parallel)))))
        self.n_stages = len(_recipe(spec.recipe).stages)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        self.gpus = (visible.split(",") if visible else [str(i) for i in range(n_gpus)])[:n_gpus] if n_gpus else []
        self.launched = 0
        self.status: dict[str, str] = {}  # run name -> done | failed | unfinished, once known
        self.settled: dict[str, threading.Event] = {}
        self.bar = tqdm(total=n_runs, desc="training runs finished", dynamic_ncols=True, disable=n_runs == 0)

    def time_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def command(self, run: Run) -> list[str]:
        t = self.spec.training
        cmd = [sys.executable, "-m", "llava_deft.train", "--config", str(Path(self.spec.recipe).resolve()),
               "--output_dir", str(run.dir), "--resume", f"num_workers={t.num_workers}"]
        steps = t.steps_for(run.protocol)
        if steps is not None:
            cmd += [f"stages.{i}.max_steps={steps}" for i in range(self.n_stages)]
        if t.save_steps is not None:
            cmd.append(f"save_steps={t.save_steps}")
        if run.pass_seed:
            cmd.append(f"seed={run.seed}")
        if run.init_from is not None:
            cmd.append(f"init_from={run.init_from}")
        return (cmd + self.spec.data.train_overrides() + t.overrides_for(run.protocol)
                + [f"model.pipeline={run.pipeline_yaml}"])

    def train(self, run: Run) -> int | None:
        """Train one run (``--resume``); its exit code, None when ``stop()`` came first."""
        write_pipeline_yaml(run.pipeline_yaml, run.pipeline, run.source, run.ratio)
        cmd = self.command(run)
        with run.log.open("a") as fh:
            with self.lock:  # no run starts after stop() has collected the running ones
                if self.stopping:
                    return None
                fh.write(f"$ {shlex.join(cmd)}\n")
                env = dict(self.env)
                if len(self.gpus) > 1:
                    env["CUDA_VISIBLE_DEVICES"] = self.gpus[self.launched % len(self.gpus)]
                    fh.write(f"# CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}\n")
                fh.flush()
                self.launched += 1
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
                self.procs.add(proc)
            rc = proc.wait()
            with self.lock:
                self.procs.discard(proc)
        return rc

    def event(self, name: str) -> threading.Event:
        with self.lock:
            return self.settled.setdefault(name, threading.Event())

    def mark_done(self, names) -> None:
        """Runs trained before this call (a finetuned run may start from them at once)."""
        for n in names:
            self.status[n] = "done"
            self.event(n).set()

    def train_and_report(self, run: Run) -> str:
        """``train`` in a worker thread: 'done', 'failed' (recorded with the log's tail) or 'unfinished'.
        A finetuned run first waits for its base (launched before it) and inherits a base that did not finish."""
        if run.after is not None:
            self.event(run.after).wait()
            base = self.status.get(run.after)
            if base != "done":
                why = f"its base {run.after} " + ("FAILED" if base == "failed" else "did not finish")
                return self._finish(run, "failed" if base == "failed" else "unfinished", why)
        left = self.time_left()
        if self.stopping or left < self.margin:
            why = self.stop_reason if self.stopping else f"not started: {max(left, 0):.0f} s left < launch margin {self.margin:g} s"
            return self._finish(run, "unfinished", why)
        try:
            rc = self.train(run)
        except OSError as e:
            return self._finish(run, "failed", f"{type(e).__name__}: {e}")
        if rc is None:
            return self._finish(run, "unfinished", f"not started: {self.stop_reason}")
        if rc == 0 and is_trained(run.dir):
            return self._finish(run, "done", "")
        if self.stopping:
            return self._finish(run, "unfinished", f"stopped ({self.stop_reason}); resumes from its last checkpoint")
        return self._finish(run, "failed", f"exit code {rc}" if rc else f"exit code 0 but no complete {run.dir}/final")

    def _finish(self, run: Run, status: str, why: str) -> str:
        with self.lock:
            self.status[run.name] = status
            if status == "failed":
                self.failed[run.name] = why
            elif status == "unfinished":
                self.unfinished[run.name] = why
            event = self.settled.setdefault(run.name, threading.Event())
        event.set()
        if status == "failed":
            tqdm.write(f"[sweep] run {run.name} FAILED ({why}); last lines of {run.log}:\n{log_tail(run.log)}")
        self.bar.update(1)
        return status

    def stop(self, reason: str = "the sweep stopped", grace: float = TERMINATE_GRACE_S) -> None:
        """Launch nothing more; SIGTERM the running runs, SIGKILL those still alive after ``grace`` s."""
        with self.lock:
            if not self.stopping:
                self.stopping, self.stop_reason = True, reason
            procs = list(self.procs)
        if procs:
            tqdm.write(f"[sweep] {reason}: stopping {len(procs)} training run(s)")
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                p.kill()

    def terminate(self) -> None:
        self.stop()
        self.bar.close()


def log_tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return f"(no log at {path})"
    lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    return "\n".join("    " + ln for ln in lines[-n:])


def warn_if_stale(run: Run) -> None:
    old = yaml.safe_load(run.pipeline_yaml.read_text()) if run.pipeline_yaml.is_file() else None
    if old is not None and not _same_config(old, run.pipeline):
        tqdm.write(f"[sweep] warning: {run.dir} was trained with another pipeline than {run.name}'s now is; delete it to retrain")


# ---------------------------------------------------------------------------------- evaluation
class Evaluator:
    """``evaluator(item, runs) -> rows`` on the spec's test data (loaded once, with the first model's
    media options), on ``device``. ``busy()``, when set, counts the training runs sharing the device; each
    row records it beside its TTFT (``ttft_concurrent_trainings``)."""

    def __init__(self, spec: SweepSpec, device: str | torch.device, busy: Callable[[], int] | None = None):
        self.spec = spec
        self.device = torch.device(device)
        self.dataset = None
        self.busy = busy

    def __call__(self, it: EvalItem, runs: dict[str, Run]) -> list[dict]:
        from ..model import LlavaDeftForCausalLM

        spec, ev = self.spec, self.spec.evaluation
        run = runs[it.run]
        ckpt = run.dir / "final"
        if it.pipeline_yaml is not None:
            write_pipeline_yaml(it.pipeline_yaml, it.pipeline, it.source, it.ratio)
        pipe = None if it.pipeline_yaml is None else str(it.pipeline_yaml)
        model = LlavaDeftForCausalLM.from_pretrained(ckpt, pipeline=pipe).to(self.device).eval()
        if self.dataset is None:
            self.dataset = load_dataset(spec.data, model, "test")
        sha = checkpoint_sha(run.dir)
        recipe = yaml.safe_load((run.dir / "train_config.yaml").read_text()) if (run.dir / "train_config.yaml").is_file() else {}
        rows = []
        for mode in it.modes:
            if mode is not None:
                for stage in model.pipeline.stages:
                    if stage.stage_name == "rtd":
                        stage.set_mode(mode)
            desc = f"{it.protocol} {it.reducer}@{ratio_tag(it.ratio)}" + (f" rtd {mode}" if mode else "") + f" s{it.seed}"
            t0 = time.perf_counter()
            preds = predict(model, self.dataset, ev.batch_size, ev.max_new_tokens, self.device, desc=desc)
            res = score(preds)
            seconds = time.perf_counter() - t0
            busy = self.busy or (lambda: 0)
            sharing = busy()  # the most runs beside the timing: before it or after it
            ttft = (time_to_first_token(model, self.dataset, ev.ttft_batch, self.device, repeats=ev.ttft_repeats)
                    if ev.ttft_batch else None)
            sharing = max(sharing, busy())
            rows.append({
                "protocol": it.protocol, "reducer": it.reducer, "ratio": it.ratio, "rtd_mode": mode, "seed": it.seed,
                "accuracy": res["accuracy"], "counts": res["counts"], "tokens_per_image": res["tokens_per_item"],
                "media_tokens_per_sample": res["media_tokens_per_sample"], "correct": res["correct"],
                "ids_digest": res["ids_digest"], "seconds": seconds, "ttft_ms": ttft, "ttft_batch": ev.ttft_batch or None,
                "ttft_concurrent_trainings": sharing if ttft is not None else None,
                "questions": res["counts"].get("all", 0), "data": spec.data.label, "limit": spec.data.limit,
                "skip": spec.data.skip,
                "steps": spec.training.steps_for(it.protocol), "overrides": spec.training.overrides_for(it.protocol),
                "pipeline": model.pipeline.names, "pipeline_config": it.pipeline,
                "checkpoint": str(ckpt), "checkpoint_sha": sha,
                "recipe": {"train_config": spec.recipe, "stages": recipe.get("stages"), "seed": recipe.get("seed"),
                           "save_steps": recipe.get("save_steps")},
                **run_metadata(self.device),
            })
        del model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the training runs share the GPU
        return rows


def train_and_evaluate(
    todo: list[EvalItem], to_train: list[Run], ready: set[str], launcher: Launcher,
    evaluate: Callable[[EvalItem], list[dict]], save: Callable[[list[dict]], object], parallel: int,
) -> list[EvalItem]:
    """Train ``to_train`` (``parallel`` at a time, in order) in worker threads and, in this thread, evaluate
    each item of ``todo`` as soon as its run is usable, saving its rows at once. Returns the items not
    evaluated (their run failed or is unfinished)."""
    usable = set(ready)
    left = list(todo)
    timer = None
    if launcher.deadline is not None:
        timer = threading.Timer(max(0.0, launcher.time_left()), launcher.stop, kwargs={"reason": "time budget reached"})
        timer.daemon = True
        timer.start()
    launcher.mark_done(ready)
    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="train")
    try:
        futures = {pool.submit(launcher.train_and_report, r): r.name for r in to_train}
        running = set(futures)
        while True:
            for f in [f for f in running if f.done()]:
                running.discard(f)
                if f.result() == "done":
                    usable.add(futures[f])
            it = next((it for it in left if it.run in usable), None)
            if it is not None:
                left.remove(it)
                save(evaluate(it))
            elif not running:
                return left
            else:
                wait(running, return_when=FIRST_COMPLETED)
    finally:
        if timer is not None:
            timer.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        launcher.terminate()


@dataclass
class Outcome:
    failed: list[str] = field(default_factory=list)  # runs whose training failed
    unfinished: list[str] = field(default_factory=list)  # runs stopped or not started (time budget)
    markdown: str = ""


def _sigterm(signum, frame):  # `timeout` sends SIGTERM: stop the training subprocesses too (see finally)
    raise SystemExit(128 + signum)


def prior_rows(spec: SweepSpec) -> list[dict]:
    """The question prior's rows (one per seed, so the report pairs them with each base) when the data
    has a training split of answered LLaVA-JSON records; none for easy-VQA or generated-on-the-fly data."""
    d = spec.data
    if d.task == "easyvqa":
        return []
    try:
        if d.task is not None:
            train_p, test_p = (task_json(Path(d.tasks_dir), d.task, s) for s in ("train", "test"))
        else:
            train_p, test_p = d.train, d.test
    except TaskDataError:
        return []
    if train_p is None or not Path(train_p).is_file():
        return []
    row = question_prior(read_records(train_p), read_records(test_p), d.limit, lambda rec: question_type(d.task or "", rec))
    if row is None:
        return []
    meta = run_metadata("cpu")
    meta["device"] = "none (counts over the training answers)"
    return [{"protocol": PRIOR, "reducer": "question_prior", "ratio": 1.0, "rtd_mode": None, "seed": seed, **row,
             "tokens_per_image": 0.0, "data": d.label, "limit": d.limit, **meta} for seed in spec.seeds]


def run(spec: SweepSpec, only: list[str] | None = None, reeval: bool = False, time_budget: float | None = None,
        launch_margin: float = 120.0, command: str | None = None,
        evaluator: Callable[[EvalItem, dict[str, Run]], list[dict]] | None = None) -> Outcome:
    """Train and evaluate what is pending, then write the report and plot. Every configuration error is
    raised before anything is trained. ``evaluator`` replaces :class:`Evaluator` (tests)."""
    start = time.monotonic()
    if time_budget is not None and not 0 <= launch_margin < time_budget:
        raise ValueError(f"launch margin ({launch_margin:g} s) must be in [0, time budget ({time_budget:g} s))")
    sel = parse_only(only, list(spec.reducers), spec.ratios)
    recipe = _recipe(spec.recipe)
    spec.data.check("test")
    if spec.data.train is not None:  # every run (the base too) learns from it
        spec.data.check("train")
    runs, items = plan(spec, recipe.seed)
    deadline = None if time_budget is None else start + time_budget
    json_path = spec.json_path
    todo = pending_items(items, runs, load_results(json_path)["rows"], spec, sel, reeval)
    save_rows(json_path, [], command, {"spec": spec.model_dump(mode="json"), "data": spec.data.label})
    save_rows(json_path, prior_rows(spec))  # cheap, and always in step with the data and its limit
    need = [runs[n] for n in dict.fromkeys(it.run for it in todo)]
    for r in need:
        if is_trained(r.dir):
            warn_if_stale(r)
    for r in list(need):  # a finetuned run needs its base's checkpoint, also when the base's rows are current
        if r.after is not None and runs[r.after] not in need:
            need.insert(0, runs[r.after])
    to_train = [r for r in need if not is_trained(r.dir)]
    to_train.sort(key=lambda r: r.after is not None)  # bases before the runs that start from them (stable)
    retrained = {r.name for r in to_train}  # a new checkpoint: its other items are stale too
    todo += [it for it in items if it.run in retrained and it not in todo
             and (it.protocol == BASE or selected(sel, it.reducer, it.ratio))]
    parallel = spec.parallel()
    print(f"[sweep] {len(todo)} model(s) to evaluate; {len(to_train)} training run(s) to do "
          f"({', '.join(r.name for r in to_train) or 'none'}), {parallel} at a time, logs in {spec.runs_dir}/<run>.log"
          + (f"; time budget {time_budget:g} s" if deadline is not None else ""))
    outcome = Outcome()
    if todo:
        spec.runs_dir.mkdir(parents=True, exist_ok=True)
        ev = evaluator or Evaluator(spec, spec.device())
        launcher = Launcher(spec, len(to_train), deadline, launch_margin)
        if isinstance(ev, Evaluator) and ev.busy is None:
            ev.busy = lambda: len(launcher.procs)
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _sigterm) if in_main else None
        try:
            left = train_and_evaluate(todo, to_train, {r.name for r in need if r not in to_train}, launcher,
                                      lambda it: ev(it, runs), lambda rows: save_rows(json_path, rows), parallel)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        outcome = Outcome(sorted(launcher.failed), [r.name for r in to_train if r.name in launcher.unfinished])
        skipped = [it.label for it in left if it.run in launcher.failed]
        if skipped:
            print(f"[sweep] not evaluated because their training run failed: {', '.join(skipped)}")
        if outcome.unfinished:
            print("[sweep] unfinished (time budget; the same command resumes them): "
                  + ", ".join(f"{n} ({launcher.unfinished[n]})" for n in outcome.unfinished))
    outcome.markdown = report(spec, failed=outcome.failed, unfinished=outcome.unfinished)
    return outcome


def report(spec: SweepSpec, failed: list[str] = (), unfinished: list[str] = ()) -> str:
    """Write ``<out>/<name>.md`` and ``.png`` from the JSON and return the markdown ('' when it has no rows)."""
    json_path = spec.json_path
    if not json_path.is_file():
        raise FileNotFoundError(f"no results at {json_path}; run the sweep first (llava-deft sweep run SPEC)")
    doc = load_results(json_path)
    if not doc["rows"]:
        print(f"[sweep] {json_path} has no rows yet: no report")
        return ""
    rspec = spec.report_spec()
    md = build_report(doc, rspec, failed=list(failed), runs_dir=str(spec.runs_dir), unfinished=list(unfinished))
    out = Path(spec.out)
    (out / f"{spec.name}.md").write_text(md)
    plot_sweep(doc["rows"], out / f"{spec.name}.png", rspec)
    return md


__all__ = [
    "EvalItem", "Evaluator", "Launcher", "Outcome", "PipelineConfigError", "Run", "SweepSpec", "SweepSpecError",
    "checkpoint_sha", "configured_rtd_mode", "is_trained", "load_results", "load_spec", "parse_only",
    "pending_items", "plan", "report", "resolve_pipeline", "run", "save_rows", "selected", "write_json_atomic",
]
