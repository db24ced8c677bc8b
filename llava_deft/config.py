"""Model config: one pydantic model, validated whole before any weight is touched.

    vision:    image encoder (timm ViT name or open_clip model name) + its kwargs / local weights
    projector: "linear" | "mlp2x_gelu"
    llm:       an HF config dict (llama / qwen2 / qwen3 ...) or a local directory
    pipeline:  reduction stages (see ``pipeline.validate_config``), or a YAML path
    video:     frame sampling (num_frames | fps, max_frames) and per-frame spatial pooling (pool_stride)
    audio:     the Whisper-style audio encoder (off by default): enabled, encoder, weights, pool_stride, freeze
    tokenizer: None for the committed tiny tokenizer, else a local directory

Every key is read by ``LlavaDeftForCausalLM``; unknown keys are errors that list the allowed keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import PipelineConfigError, validate_config

from .errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VisionConfig(_Strict):
    backend: Literal["timm", "open_clip"] = "timm"
    name: str = "vit_tiny_patch16_224"
    # constructor overrides (timm: create_model kwargs; open_clip: model kwargs such as vision_cfg)
    kwargs: dict[str, Any] = Field(
        default_factory=lambda: {"img_size": 64, "patch_size": 8, "embed_dim": 128, "depth": 2, "num_heads": 4}
    )
    weights: str | None = None  # local .safetensors with the encoder's state dict
    feature_layer: int = -1  # which block's output feeds the projector (LLaVA uses -2)
    freeze: bool = False


class ProjectorConfig(_Strict):
    type: Literal["linear", "mlp2x_gelu"] = "mlp2x_gelu"


class LLMConfig(_Strict):
    """Exactly one of ``config`` (HF config dict with ``model_type``) or ``path`` (local directory)."""

    config: dict[str, Any] | None = None
    path: str | None = None
    freeze: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"

    @field_validator("config")
    @classmethod
    def _has_model_type(cls, v):
        if v is not None and "model_type" not in v:
            raise ValueError("an HF config dict needs 'model_type' (e.g. 'llama', 'qwen2', 'qwen3')")
        return v


class VideoConfig(_Strict):
    """How a video becomes tokens: frames sampled as in ``llava_deft.video.sample_frame_indices``
    (``num_frames`` uniformly, or one every ``1/fps`` s with ``fps``; at most ``max_frames``), each
    frame through the image encoder, its token grid average-pooled with ``pool_stride`` (LLaVA-NeXT's
    ``mm_spatial_pool_stride``; 1 = no pooling)."""

    num_frames: int = Field(8, gt=0)
    fps: float | None = Field(None, gt=0)
    max_frames: int | None = Field(None, gt=0)
    pool_stride: int = Field(1, gt=0)

    def sampling(self) -> dict[str, Any]:
        """Keyword arguments of ``load_video`` / ``LlavaJsonDataset``."""
        return {"num_frames": self.num_frames, "fps": self.fps, "max_frames": self.max_frames}


class AudioConfig(_Strict):
    """The audio encoder (``llava_deft.audio.AudioEncoder``, Whisper-style, random init unless
    ``weights``) and its own projector into the LLM width. Off by default, so configs and checkpoints
    without audio build exactly the modules they did before.

    ``encoder``: keys of ``llava_deft.audio.DEFAULT_AUDIO_CONFIG`` (d_model, encoder_layers, ...,
    num_mel_bins, chunk_length in s, sampling_rate); ``weights``: a local ``.safetensors`` state dict
    of the encoder (ours or a Whisper checkpoint's ``model.encoder.*``); ``pool_stride``: average-pool
    the encoder's tokens over time (one token per 20 ms at 1); ``freeze``: keep the encoder fixed (its
    projector still trains). The other keys need ``enabled: true``.
    """

    enabled: bool = False
    encoder: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None
    pool_stride: int = Field(1, gt=0)
    freeze: bool = False

    @field_validator("encoder")
    @classmethod
    def _known_encoder_keys(cls, v):
        resolve_audio_config(v)  # unknown keys, sizes that do not fit: ValueError naming the fix
        return v

    @model_validator(mode="after")
    def _needs_enabled(self):
        if not self.enabled:
            fields = type(self).model_fields
            set_knobs = [k for k, f in fields.items() if k != "enabled" and getattr(self, k) != f.get_default(call_default_factory=True)]
            if set_knobs:
                raise ValueError(f"audio {set_knobs} take effect only with audio.enabled: true")
        return self

    def sampling_rate(self) -> int:
        """The rate waveforms are loaded at (``load_audio`` / ``LlavaJsonDataset``), from ``encoder``."""
        return int(resolve_audio_config(self.encoder)["sampling_rate"])


def resolve_audio_config(encoder: dict[str, Any]) -> dict[str, Any]:
    """``llava_deft.audio.resolve_audio_config``, imported here on use: ``audio`` imports ``encoders``,
    which imports this module."""
    from .audio import resolve_audio_config as resolve

    return resolve(encoder)


class ModelConfig(_Strict):
    vision: VisionConfig = Field(default_factory=VisionConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    audio: AudioConfig = Field(default_factory=AudioConfig)
    projector: ProjectorConfig = Field(default_factory=ProjectorConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    pipeline: dict[str, Any] | list | str | None = None
    tokenizer: str | None = None
    max_length: int = Field(512, gt=0)
    # the DeFT seed's switches: use_deft builds `sam -> fgcs [-> rtd]` (pipeline.deft_pipeline_config)
    # instead of `pipeline`; the deft_* knobs need use_deft: true
    use_deft: bool = False
    deft_semantic_dim: int = Field(512, gt=0)
    deft_retention_ratio: float = Field(0.482, gt=0, le=1)
    deft_enable_rtd: bool = True
    deft_alpha_var: float = Field(0.1, ge=0)
    deft_rtd_bottleneck_ratio: int = Field(4, gt=1)

    @model_validator(mode="after")
    def _deft_switches(self):
        if self.use_deft:
            if (self.pipeline or {}).get("stages"):
                raise ValueError("use_deft builds the DeFT pipeline itself: remove `pipeline` or set use_deft: false")
        else:
            set_knobs = [k for k in DEFT_KEYS if getattr(self, k) != type(self).model_fields[k].default]
            if set_knobs:
                raise ValueError(f"{set_knobs} take effect only with use_deft: true (or use configs/pipeline/deft.yaml)")
        return self

    def pipeline_config(self) -> dict[str, Any] | None:
        """The reduction pipeline to build: the DeFT stages when ``use_deft``, else ``pipeline``."""
        if not self.use_deft:
            return self.pipeline
        from pipeline import deft_pipeline_config

        return deft_pipeline_config(
            semantic_dim=self.deft_semantic_dim,
            retention_ratio=self.deft_retention_ratio,
            enable_rtd=self.deft_enable_rtd,
            alpha_var=self.deft_alpha_var,
            rtd_bottleneck_ratio=self.deft_rtd_bottleneck_ratio,
        )


    @field_validator("pipeline")
    @classmethod
    def _valid_pipeline(cls, v):
        try:
            cfg = validate_config(v)
        except PipelineConfigError as e:
            raise ValueError("; ".join(f"pipeline.{x}" for x in e.errors)) from None
        return cfg.model_dump()


DEFT_KEYS = ("deft_semantic_dim", "deft_retention_ratio", "deft_enable_rtd", "deft_alpha_var", "deft_rtd_bottleneck_ratio")


def _format_errors(e: ValidationError) -> list[str]:
    out = []
    for err in e.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            model = ModelConfig
            for part in err["loc"][:-1]:
                field = model.model_fields.get(str(part))
                ann = field.annotation if field else None
                model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
                if model is None:
                    break
            if model is not None:
                msg = f"{msg} (allowed keys: {sorted(model.model_fields)})"
        out.append(f"{path}: {msg}")
    return out


def load_model_config(source: str | Path | dict | ModelConfig | None = None, overrides: list[str] | None = None) -> ModelConfig:
    """Validate a model config from YAML path / dict (``None`` = the tiny default).

    ``overrides`` are ``a.b=value`` strings (value parsed as YAML) applied on top.
    Raises :class:`ConfigError` listing every problem with its path.
    """
    if isinstance(source, ModelConfig) and not overrides:
        return source
    desc = "model config"
    if isinstance(source, ModelConfig):
        data = source.model_dump()
    elif isinstance(source, (str, Path)):
        data = read_model_config_file(source)
        desc = f"model config '{source}'"
    else:
        data = dict(source or {})
    data = apply_overrides(data, overrides or [])
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as e:
        errs = _format_errors(e)
        raise ConfigError(f"{desc} has {len(errs)} error(s):\n  " + "\n  ".join(errs)) from None


def read_model_config_file(path: str | Path) -> dict:
    """A model YAML as a dict; a ``pipeline:`` path in it is resolved relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config file '{path}' does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"model config '{path}' must be a mapping, got {type(data).__name__}")
    if isinstance(data.get("pipeline"), str):
        p = Path(data["pipeline"])
        data["pipeline"] = str(p if p.is_absolute() or p.exists() else path.parent / p)
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested copy of ``data``.

    A numeric part indexes a list (``stages.1.lr=1e-4``); missing mapping levels are created.
    """
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for depth, p in enumerate(parts):
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"override {item!r}: '{p}' is not an index of a list of {len(node)}")
            elif not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: cannot go into '{p}', its parent is not a mapping or list")
            if depth == len(parts) - 1:
                break
            if isinstance(node, dict) and node.get(p) is None:
                node[p] = {}
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[int(parts[-1]) if isinstance(node, list) else parts[-1]] = yaml.safe_load(raw)
    return data
