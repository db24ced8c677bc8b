"""Training recipe config (pydantic, validated whole): model, data, LLaVA stages, optimisation.

Precedence: defaults < YAML file (over its ``base:`` file, then its ``overrides:``) < command-line
flags < ``a.b=value`` overrides.  The resolved
config is written into the run folder as ``train_config.yaml``.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from ..errors import ConfigError
from .base import Strict, apply_overrides, config_error, error_lines, read_yaml_mapping
from .model import read_model_config_file

PASSKEY_MIN_TOKENS = 64
"""Shortest pass-key passage allowed: the needle (about 20 tokens) plus room for filler on both sides."""
PASSKEY_TOKENS_PER_NEEDLE = 32
"""What each needle after the first adds to the shortest passage (a labelled needle is at most 25 tokens)."""
PASSKEY_MAX_NEEDLES = 64
"""Most needles one passage may hold: one per label of ``llava_deft.tasks.passkey.LABELS``."""


def passkey_min_tokens(needles: int = 1) -> int:
    """Shortest pass-key passage that holds ``needles`` needles (64 for one, 32 more per extra needle)."""
    return PASSKEY_MIN_TOKENS + PASSKEY_TOKENS_PER_NEEDLE * (needles - 1)


def check_passkey_needles(needles: int) -> None:
    """Raise ``ValueError`` unless ``needles`` is a number of needles a passage can hold (1 to 64)."""
    if isinstance(needles, bool) or not isinstance(needles, numbers.Integral):
        raise ValueError(f"needles must be an integer >= 1 (needle sentences per passage), got {needles!r}")
    if needles < 1:
        raise ValueError(f"needles must be >= 1 (1 is the single-needle task), got {needles}")
    if needles > PASSKEY_MAX_NEEDLES:
        raise ValueError(f"needles must be <= {PASSKEY_MAX_NEEDLES} (each needle has its own label), got {needles}")


def check_passkey_lengths(min_tokens: int, max_tokens: int, needles: int = 1) -> None:
    """Raise ``ValueError`` unless ``[min_tokens, max_tokens]`` is a range of passage lengths the
    pass-key generator (``llava_deft.tasks.passkey.make_sample``) can draw from, with ``needles``
    needles a passage (see :func:`check_passkey_needles`, :func:`passkey_min_tokens`)."""
    check_passkey_needles(needles)
    if min_tokens < PASSKEY_MIN_TOKENS:
        raise ValueError(f"min_tokens must be >= {PASSKEY_MIN_TOKENS}, got {min_tokens}")
    if min_tokens < passkey_min_tokens(needles):
        raise ValueError(
            f"min_tokens must be >= {passkey_min_tokens(needles)} for needles={needles} ({PASSKEY_MIN_TOKENS} plus "
            f"{PASSKEY_TOKENS_PER_NEEDLE} per needle after the first), got {min_tokens}; raise min_tokens or lower needles"
        )
    if max_tokens < min_tokens:
        raise ValueError(f"max_tokens must be >= min_tokens ({min_tokens}), got {max_tokens}")


DATA_TYPES = ("easyvqa", "llava_json", "passkey", "mix")
_PASSKEY_KEYS = ("size", "min_tokens", "max_tokens", "seed", "needles")  # DataSpec keys of type passkey only
_TEXT_KEYS = ("block_tokens", "test_share")  # DataSpec keys of type text only


class DataSpec(Strict):
    """Training data: ``easyvqa`` (the bundled dataset), ``llava_json`` (LLaVA conversation JSON; media
    paths relative to ``image_folder``, by default the JSON's folder), ``passkey`` (pass-key passages
    generated on the fly, no disk: :class:`llava_deft.tasks.passkey.PasskeyDataset`), ``text`` (a plain
    text corpus as causal-LM blocks of ``block_tokens`` ids, every id supervised:
    :class:`llava_deft.data.text_corpus.TextCorpusDataset`; ``path: fortunes`` is the default English
    corpus of Debian's ``fortunes`` package) or ``mix``
    (several of those in one run, listed under ``sources``)::

        data:
          type: mix
          sources:
            - {type: easyvqa, group_by_image: true}
            - {type: llava_json, path: data/tasks/video_shapes/train.json, repeat: 2}
            - {type: passkey, size: 100000, min_tokens: 128, max_tokens: 512}
            - {type: passkey, name: passkey_kv, size: 100000, min_tokens: 2048, max_tokens: 8192, needles: 4}

    A ``llava_json`` source is checked whole when the run starts (every record, every media file's
    path and existence): bad records stop it with one error listing them, unless ``skip_invalid:
    true`` leaves them out (the count and reasons are printed); media paths must stay inside
    ``image_folder`` unless ``trusted_paths: true``. A ``path`` ending in ``.jsonl`` (one record per
    line) is read lazily instead, for corpora larger than memory: each record is checked when it is read
    (``llava_deft.data.llava_json.LlavaJsonlDataset``; ``skip_invalid`` is refused there).

    ``limit`` keeps the first N items of a source (before ``repeat``); ``repeat`` lists a source N
    times per epoch (to balance small sources against big ones); ``name`` labels a source in logs and
    errors (default: its type, or the JSON's folder name). A mix's items are the concatenation of its
    sources' items; the training sampler shuffles them, so a batch holds samples of several
    modalities and media counts. A passkey source holds ``size`` distinct passages, item ``i`` being
    ``passkey.make_sample(seed, split, i, min_tokens, max_tokens, needles)`` (the same record as in a JSON
    the generator writes with those arguments; test-split keys never occur in train; ``needles: k > 1``
    hides k labelled keys and asks for one of them). Keys that do not
    apply to a type are errors, not silently ignored (a key counts as set when it differs from its
    default, so a resolved config written by the trainer loads again).
    """

    type: Literal["easyvqa", "llava_json", "passkey", "text", "mix"] = "easyvqa"
    name: str | None = None
    split: Literal["train", "test"] = "train"  # easyvqa, passkey and text only
    path: str | None = None  # llava_json (the JSON) and text (a text file, or "fortunes") only
    image_folder: str | None = None  # llava_json only
    # llava_json only: leave out invalid records (reported at start) instead of refusing the file;
    # accept absolute media paths and paths out of image_folder (a JSON you trust)
    skip_invalid: bool = False
    trusted_paths: bool = False
    limit: int | None = Field(None, gt=0)
    repeat: int = Field(1, gt=0)
    group_by_image: bool = False  # easyvqa: one multi-turn conversation per image (LLaVA-style)
    sources: list[DataSpec] = Field(default_factory=list)  # mix only
    # passkey only: how many distinct passages, their length range in tiny-tokenizer tokens, the generator
    # seed, and how many labelled needles a passage holds (1: the single-needle task; k > 1: k key-value needles)
    size: int | None = Field(None, gt=0)
    min_tokens: int = 128
    max_tokens: int = 512
    seed: int = 0  # passkey and text (the train/test split of the documents)
    needles: int = 1
    # text only: ids per block (default: the model's max_length) and the share of documents in the test split
    block_tokens: int | None = Field(None, ge=2)
    test_share: float = Field(0.05, gt=0, lt=1)

    @model_validator(mode="after")
    def _keys_fit_type(self) -> "DataSpec":
        label = self.label()
        who = f"data source of type {self.type!r}" if label == self.type else f"data source {label!r} ({self.type})"
        wrong = []
        if self.type not in ("easyvqa", "passkey", "text") and self.split != "train":
            wrong.append("split (easyvqa, passkey and text only; for llava_json point path at the split's JSON)")
        if self.type != "easyvqa" and self.group_by_image:
            wrong.append("group_by_image (easyvqa only)")
        if self.type not in ("llava_json", "text") and self.path is not None:
            wrong.append("path (llava_json and text only)")
        if self.type != "llava_json":
            wrong += [f"{k} (llava_json only)" for k in ("image_folder",) if getattr(self, k) is not None]
            wrong += [f"{k} (llava_json only)" for k in ("skip_invalid", "trusted_paths") if getattr(self, k)]
        if self.type != "mix" and self.sources:
            wrong.append("sources (type mix only)")
        if self.type != "passkey":
            keys = [k for k in _PASSKEY_KEYS if not (self.type == "text" and k == "seed")]
            wrong += [f"{k} (passkey only)" for k in keys if getattr(self, k) != DataSpec.model_fields[k].default]
        if self.type != "text":
            wrong += [f"{k} (text only)" for k in _TEXT_KEYS if getattr(self, k) != DataSpec.model_fields[k].default]
        if wrong:
            raise ValueError(f"{who} sets keys that do not apply to it: {', '.join(wrong)}")
        if self.type == "llava_json" and self.path is None:
            raise ValueError(f"{who} needs path (the LLaVA JSON file)")
        if self.type == "text" and self.path is None:
            raise ValueError(f"{who} needs path (a UTF-8 text file, or 'fortunes': Debian's fortunes package)")
        if self.type == "passkey":
            if self.size is None:
                raise ValueError(f"{who} needs size (how many distinct passages to generate)")
            try:
                check_passkey_lengths(self.min_tokens, self.max_tokens, self.needles)
            except ValueError as err:
                raise ValueError(f"{who}: {err}") from None
        if self.type == "mix":
            if not self.sources:
                raise ValueError(f"{who} needs a non-empty list of sources (each an easyvqa, llava_json or passkey spec)")
            nested = [i for i, s in enumerate(self.sources) if s.type == "mix"]
            if nested:
                raise ValueError(f"{who}: sources {nested} are mixes themselves; list their sources directly")
            labels = [s.label() for s in self.sources]
            dup = sorted({x for x in labels if labels.count(x) > 1})
            if dup:
                raise ValueError(f"{who}: sources share the name(s) {dup}; give each a distinct `name`")
        return self

    def label(self) -> str:
        """The source's name in logs and errors: ``name``, else the JSON's folder name, else its type."""
        if self.name is not None:
            return self.name
        if self.type == "llava_json" and self.path is not None:
            return Path(self.path).parent.name or Path(self.path).stem
        if self.type == "text" and self.path is not None:
            return Path(self.path).stem
        return self.type


LORA_ALL_LINEAR = "all-linear"
"""``target_modules`` value for every linear layer of the LLM but its output head (peft's shorthand)."""
_QUANT_KEYS = ("quant_type", "double_quant")  # LoraSpec keys of bits: 4 only


class LoraSpec(Strict):
    """LoRA adapters on the LLM of a training stage (peft; LLaVA's ``--lora_enable``); ``bits: 4`` is
    QLoRA (the LLM's linear layers in 4-bit through bitsandbytes; CUDA only).

    Defaults are LLaVA's recipe: ``r`` 128, ``alpha`` 256, ``dropout`` 0.05, on every linear layer of
    the LLM but its output head (``target_modules: all-linear``; or a list of layer names such as
    ``[q_proj, v_proj]``). The LLM's own weights stay frozen and only the adapters train; the stage's
    export folds the adapters into the weights (plain safetensors, loaded with no peft involved).
    ``quant_type`` (nf4 or fp4) and ``double_quant`` (quantise the quantisation constants too) are
    LLaVA's ``--quant_type`` / ``--double_quant`` and apply to ``bits: 4`` only.
    """

    enabled: bool = True
    r: int = Field(128, gt=0)
    alpha: float = Field(256.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | Literal["all-linear"] = LORA_ALL_LINEAR
    bits: Literal[4] | None = None
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True

    @model_validator(mode="after")
    def _quant_keys_need_bits(self) -> "LoraSpec":
        wrong = [k for k in _QUANT_KEYS if self.bits is None and getattr(self, k) != LoraSpec.model_fields[k].default]
        if wrong:
            raise ValueError(f"{', '.join(wrong)} set without bits: 4 (4-bit base weights only); set bits: 4 or remove them")
        return self


class StageSpec(Strict):
    """One LLaVA training stage. Stage 1 ("align"): LLM and encoder frozen, projector and pipeline
    train; stage 2 ("finetune"): the LLM trains too, wholly or through LoRA adapters (``lora:``).

    ``projector_lr`` (LLaVA's ``mm_projector_lr``) is the learning rate of the projector(s) and of the
    reduction pipeline's stages, which train alongside; unset, they train at ``lr`` like the rest."""

    name: str = "finetune"
    freeze_vision: bool = False
    freeze_llm: bool = False
    # the audio encoder (models with audio.enabled only); None keeps the model config's audio.freeze
    freeze_audio: bool | None = None
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    lr: float = Field(1e-3, gt=0)
    projector_lr: float | None = Field(None, gt=0)
    lora: LoraSpec | None = None
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    # Retention curriculum (pipeline.RetentionSchedule): the first retention_hold_ratio of the steps
    # run every reducer at retention 1.0, the next retention_ramp_ratio lower it linearly to its target.
    retention_hold_ratio: float = Field(0.0, ge=0, le=1)
    retention_ramp_ratio: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _schedule_fits(self) -> "StageSpec":
        if self.retention_hold_ratio + self.retention_ramp_ratio > 1:
            raise ValueError(
                f"retention_hold_ratio + retention_ramp_ratio must be <= 1 (a share of the stage's steps); "
                f"got {self.retention_hold_ratio} + {self.retention_ramp_ratio}"
            )
        if self.lora_enabled and self.freeze_llm:
            raise ValueError("lora trains the LLM through adapters, so freeze_llm: true contradicts it; "
                             "set freeze_llm: false (the LLM's own weights stay frozen under LoRA) or lora.enabled: false")
        return self

    @property
    def lora_enabled(self) -> bool:
        return self.lora is not None and self.lora.enabled


class ParachuteSpec(Strict):
    """The emergency parachute of recursive-compression stages (``pipeline.recursive.EmergencyParachute``):
    it watches the LM loss of every step and raises the stages' similarity floor by ``step`` (less
    compression) when the loss exceeds its EMA by more than ``spike_tolerance``, lowers it again after
    ``patience`` consecutive steps below the mean of the last ``window`` losses, always within
    ``[floor, floor + max_raise]``. Off by default; on, the loss is read on the host every step (one
    device wait per step) and every change goes to ``stage{i}_{name}/parachute.json`` and the log."""

    enabled: bool = False
    step: float = Field(0.02, gt=0, le=1)
    max_raise: float = Field(0.1, ge=0, le=2)
    spike_tolerance: float = Field(0.5, ge=0)
    patience: int = Field(50, gt=0)
    window: int = Field(20, gt=0)
    ema_decay: float = Field(0.9, ge=0, lt=1)
    warmup: int = Field(5, gt=0)


class TrainConfig(Strict):
    model: dict[str, Any] | str | None = None
    data: DataSpec = Field(default_factory=DataSpec)
    stages: list[StageSpec] = Field(default_factory=lambda: [StageSpec()], min_length=1)
    per_device_batch_size: int = Field(16, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    gradient_clipping: float = Field(1.0, ge=0)
    bf16: Literal["auto"] | bool = "auto"
    seed: int = 0
    save_steps: int = Field(500, gt=0)
    save_total_limit: int = Field(2, gt=0)
    log_steps: int = Field(10, gt=0)
    num_workers: int = Field(0, ge=0)
    output_dir: str = "runs/default"
    deepspeed: str = "configs/deepspeed/zero2.json"
    # a saved llava-deft model folder (a run's final/) to start from instead of building `model:` afresh,
    # e.g. the second step of a curriculum on other data; its own config.json replaces `model:`
    init_from: str | None = None
    # supervise only the last `loss_window` tokens of every sequence (the window that pair-compressed layers
    # never merge: seed 002's windowed loss); None: every labelled token
    loss_window: int | None = Field(None, gt=0)
    # loosen / tighten recursive-compression stages by the LM loss (ParachuteSpec); off by default
    parachute: ParachuteSpec = Field(default_factory=ParachuteSpec)
    # [first, last]: profile optimizer steps first+1..last of every stage with torch.profiler (CPU and CUDA)
    # and write <output_dir>/profile_stage<i>.txt (ops by device time, then by host time) and
    # profile_stage<i>.json.gz (a Chrome / Perfetto trace); None: no profiler
    profile_steps: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _check_profile_steps(self) -> "TrainConfig":
        if self.profile_steps is not None and not 0 <= self.profile_steps[0] < self.profile_steps[1]:
            raise ValueError(f"profile_steps must be [first, last] with 0 <= first < last, got {list(self.profile_steps)}")
        return self


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file (or the defaults), then ``a.b=value`` overrides.

    A file may build on another: ``base: other.yaml`` (relative to the file) is read first and this
    file's keys are merged over it (mappings key by key, anything else, lists included, replaced);
    ``overrides: [a.b=value, ...]`` in a file is applied after the merge, the base's list first,
    and ``overrides`` given here come last.
    """
    data: dict = {}
    desc = "train config"
    file_overrides: list[str] = []
    if path is not None:
        data, file_overrides = _read_train_yaml(Path(path), [])
        desc = f"train config '{path}'"
    data = apply_overrides(data, file_overrides + list(overrides or []))
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        raise config_error(desc, error_lines(e)) from None


def _read_train_yaml(p: Path, chain: list[Path]) -> tuple[dict, list[str]]:
    """One train YAML with its ``base:`` chain merged in and the model YAML embedded (so the run's
    config is self-contained), and its ``overrides:`` (the base's first)."""
    if not p.is_file():
        via = f" (the base of '{chain[-1]}')" if chain else ""
        raise FileNotFoundError(f"train config file '{p}'{via} does not exist")
    if p.resolve() in chain:
        raise ConfigError(f"train config '{p}' is its own base: " + " -> ".join(map(str, [*chain, p.resolve()])))
    data = read_yaml_mapping(p, "train config")
    own = data.pop("overrides", None) or []
    if not isinstance(own, list) or not all(isinstance(o, str) for o in own):
        raise ConfigError(f"train config '{p}': 'overrides' must be a list of 'key.path=value' strings, got {own!r}")
    if isinstance(data.get("model"), str):  # model config paths are relative to the train config
        m = Path(data["model"])
        m = m if m.is_absolute() or m.exists() else p.parent / m
        if not m.is_file():
            raise FileNotFoundError(
                f"model config file '{m}' (the 'model:' of train config '{p}') does not exist; "
                f"give a path relative to the train config or to the working directory"
            )
        data["model"] = read_model_config_file(m)
    base = data.pop("base", None)
    if base is None:
        return data, own
    if not isinstance(base, str):
        raise ConfigError(f"train config '{p}': 'base' must be a path to another train YAML, got {base!r}")
    b = Path(base)
    parent, inherited = _read_train_yaml(b if b.is_absolute() else p.parent / b, [*chain, p.resolve()])
    return _merge(parent, data), inherited + own


def _merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``: mappings key by key, every other value replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
