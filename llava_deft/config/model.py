"""Model config: one pydantic model, validated whole before any weight is touched.

    vision:    image encoder (timm ViT, open_clip tower or HF CLIPVisionModel) + its kwargs / local weights
    projector: "linear" | "mlp2x_gelu"
    llm:       an HF config dict (llama / qwen2 / qwen3 ...) or a local directory
    pipeline:  reduction stages (see ``pipeline.validate_config``), or a YAML path
    video:     frame sampling (num_frames | fps, max_frames) and per-frame spatial pooling (pool_stride)
    audio:     the Whisper-style audio encoder (off by default): enabled, encoder, weights, pool_stride, freeze
    limits:    what a media file may hold (image pixels, video length and frame size, audio length)
    tokenizer: None for the committed tiny tokenizer, else a local directory

Every key is read by ``LlavaDeftForCausalLM``; unknown keys are errors that list the allowed keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline import PipelineConfigError, deft_pipeline_config, stage_defaults, validate_config

from .base import Strict, apply_overrides, config_error, error_lines, read_yaml_mapping

SAMPLING_RATE = 16000

# Keys an audio config may set (WhisperConfig's names for the model; the feature extractor reads
# num_mel_bins, sampling_rate, hop_length, n_fft and chunk_length). max_source_positions is derived
# from the chunk: chunk_length * sampling_rate / hop_length mel frames, halved by conv2's stride.
DEFAULT_AUDIO_CONFIG: dict[str, Any] = {
    "d_model": 128,
    "encoder_layers": 2,
    "encoder_attention_heads": 4,
    "encoder_ffn_dim": 512,
    "num_mel_bins": 80,
    "activation_function": "gelu",
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0,
    "scale_embedding": False,
    "chunk_length": 5,
    "sampling_rate": SAMPLING_RATE,
    "hop_length": 160,
    "n_fft": 400,
}




def resolve_audio_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """``DEFAULT_AUDIO_CONFIG`` updated by ``config``; unknown keys and inconsistent sizes raise ``ValueError``."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(DEFAULT_AUDIO_CONFIG) - {"max_source_positions"})
    if unknown:
        raise ValueError(f"unknown audio config key(s) {unknown}; valid keys: {sorted(DEFAULT_AUDIO_CONFIG)}")
    cfg = {**DEFAULT_AUDIO_CONFIG, **config}
    if cfg["d_model"] % cfg["encoder_attention_heads"]:
        raise ValueError(
            f"audio d_model {cfg['d_model']} is not divisible by encoder_attention_heads {cfg['encoder_attention_heads']}"
        )
    n_samples = cfg["chunk_length"] * cfg["sampling_rate"]
    frames = n_samples // cfg["hop_length"]
    if frames % 2:
        raise ValueError(
            f"audio chunk of {cfg['chunk_length']} s gives {frames} mel frames; conv2 (stride 2) needs an even count"
        )
    positions = frames // 2
    if cfg.setdefault("max_source_positions", positions) != positions:
        raise ValueError(
            f"max_source_positions {cfg['max_source_positions']} does not match the chunk: "
            f"{cfg['chunk_length']} s -> {frames} frames -> {positions} positions (leave it out to derive it)"
        )
    return cfg

_FGCS, _SAM, _RTD = stage_defaults("fgcs"), stage_defaults("sam"), stage_defaults("rtd")


# The tiny HF CLIP tower of ``vision.backend: hf_clip`` (a CLIPVisionConfig dict), the same size as
# the tiny timm default: 64 px, 8 px patches (an 8 x 8 grid), width 128, 2 layers.
TINY_CLIP_VISION: dict[str, Any] = {
    "image_size": 64, "patch_size": 8, "hidden_size": 128, "intermediate_size": 512,
    "num_hidden_layers": 2, "num_attention_heads": 4,
}


class VisionConfig(Strict):
    """The image encoder. ``backend`` picks it:

    - ``timm`` / ``open_clip``: ``name`` (a timm model / an open_clip model name), ``kwargs``
      (constructor overrides), ``feature_layer`` (which block's output feeds the projector);
    - ``hf_clip``: transformers' ``CLIPVisionModel``, built from ``kwargs`` (a ``CLIPVisionConfig``
      dict; default ``TINY_CLIP_VISION``) or loaded from ``path`` (a local CLIPVisionModel / CLIPModel
      directory, safetensors only); features as LLaVA takes them: ``vision_feature_layer`` indexes the
      tower's hidden states (0 = the embeddings, -2 = LLaVA-1.5's penultimate layer) and
      ``vision_feature_select_strategy`` ``default`` drops the CLS token (tokens on the patch grid) or
      ``full`` keeps it (N + 1 tokens, reported as a ``1 x (N + 1)`` strip: no square grid, so no video
      ``pool_stride``); ``image_processor``: ``CLIPImageProcessor`` settings (size, crop_size,
      image_mean, ...; default: the path's preprocessor config, else CLIP's at the tower's size).

    ``weights`` (a local .safetensors state dict of the encoder) and ``freeze`` apply to every backend;
    a key that belongs to another backend than the one chosen is an error.
    """

    backend: Literal["timm", "open_clip", "hf_clip"] = "timm"
    name: str = "vit_tiny_patch16_224"
    # constructor overrides (timm: create_model kwargs; open_clip: model kwargs such as vision_cfg;
    # hf_clip: CLIPVisionConfig keys)
    kwargs: dict[str, Any] = Field(
        default_factory=lambda: {"img_size": 64, "patch_size": 8, "embed_dim": 128, "depth": 2, "num_heads": 4}
    )
    weights: str | None = None  # local .safetensors with the encoder's state dict
    feature_layer: int = -1  # which block's output feeds the projector (LLaVA uses -2)
    freeze: bool = False
    path: str | None = None
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    image_processor: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _hf_clip_default_kwargs(cls, data):
        # kwargs' default is timm's; an hf_clip tower without kwargs is the tiny CLIP (or, with path, the directory's)
        if isinstance(data, dict) and data.get("backend") == "hf_clip" and "kwargs" not in data:
            data = {**data, "kwargs": {} if data.get("path") else dict(TINY_CLIP_VISION)}
        return data

    @model_validator(mode="after")
    def _keys_of_the_backend(self):
        fields = type(self).model_fields
        changed = {k for k, f in fields.items() if getattr(self, k) != f.get_default(call_default_factory=True)}
        own = {"timm": ("name", "feature_layer"), "open_clip": ("name", "feature_layer"),
               "hf_clip": ("path", "vision_feature_layer", "vision_feature_select_strategy", "image_processor")}
        foreign = sorted(k for k in changed if k not in own[self.backend]
                         and any(k in keys for b, keys in own.items() if b != self.backend))
        if foreign:
            where = "backend hf_clip" if self.backend != "hf_clip" else "backends timm and open_clip"
            raise ValueError(f"vision {foreign} apply only to {where}, not {self.backend!r}")
        if self.backend == "hf_clip" and self.path is not None and self.kwargs:
            raise ValueError("vision.path (a CLIP directory) and vision.kwargs (a CLIPVisionConfig) exclude each other: give one")
        return self

    def patch_grid(self) -> bool:
        """Whether the encoder's tokens lie on its patch grid (every backend but hf_clip's ``full``,
        whose CLS token comes first)."""
        return not (self.backend == "hf_clip" and self.vision_feature_select_strategy == "full")


class ProjectorConfig(Strict):
    type: Literal["linear", "mlp2x_gelu"] = "mlp2x_gelu"


class LLMConfig(Strict):
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


class VideoConfig(Strict):
    """How a video becomes tokens: frames sampled as in ``llava_deft.encoders.video.sample_frame_indices``
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


class AudioConfig(Strict):
    """The audio encoder (``llava_deft.encoders.audio.AudioEncoder``, Whisper-style, random init unless
    ``weights``) and its own projector into the LLM width. Off by default, so configs and checkpoints
    without audio build exactly the modules they did before.

    ``encoder``: keys of ``DEFAULT_AUDIO_CONFIG`` (below) (d_model, encoder_layers, ...,
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


class LimitsConfig(Strict):
    """What a media file may hold, checked from its header before anything is decoded (a file over a
    limit raises ``MediaLimitError`` naming the file, the limit and its key): ``max_image_pixels``
    (width × height of an image; 40 M, e.g. 8000 × 5000; PIL itself also refuses images over
    2 × ``PIL.Image.MAX_IMAGE_PIXELS`` = 179 M pixels as decompression bombs), ``max_video_seconds``
    (a clip's length; 10 minutes), ``max_video_frame_pixels`` (width × height of a video frame; 4K UHD,
    3840 × 2160) and ``max_audio_seconds`` (a clip's length; 10 minutes, although the audio encoder
    takes only clips up to its chunk). Raise one in the model config, e.g. ``limits.max_image_pixels=100000000``."""

    max_image_pixels: int = Field(40_000_000, gt=0)
    max_video_seconds: float = Field(600.0, gt=0)
    max_video_frame_pixels: int = Field(3840 * 2160, gt=0)
    max_audio_seconds: float = Field(600.0, gt=0)


class ModelConfig(Strict):
    # null: a text-only model (no vision tower, no projector): a plain causal LM through the same entry
    vision: VisionConfig | None = Field(default_factory=VisionConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    audio: AudioConfig = Field(default_factory=AudioConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    projector: ProjectorConfig = Field(default_factory=ProjectorConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    pipeline: dict[str, Any] | list | str | None = None
    tokenizer: str | None = None
    max_length: int = Field(512, gt=0)
    # the DeFT seed's switches: use_deft builds `sam -> fgcs [-> rtd]` (pipeline.deft_pipeline_config)
    # instead of `pipeline`; the deft_* knobs need use_deft: true
    use_deft: bool = False
    # defaults are the stages' own (pipeline.stage_defaults), so they are declared once
    deft_semantic_dim: int = Field(_SAM["semantic_dim"], gt=0)
    deft_retention_ratio: float = Field(_FGCS["retention_ratio"], gt=0, le=1)
    deft_enable_rtd: bool = True
    deft_alpha_var: float = Field(_FGCS["alpha_var"], ge=0)
    deft_rtd_bottleneck_ratio: int = Field(_RTD["bottleneck_ratio"], gt=1)

    @model_validator(mode="after")
    def _pool_needs_a_grid(self):
        if self.vision is not None and self.video.pool_stride > 1 and not self.vision.patch_grid():
            raise ValueError("video.pool_stride pools each frame's patch grid, but vision_feature_select_strategy "
                             "'full' keeps the CLS token (no grid): use 'default' or video.pool_stride: 1")
        return self

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
        return deft_pipeline_config(
            semantic_dim=self.deft_semantic_dim, retention_ratio=self.deft_retention_ratio,
            enable_rtd=self.deft_enable_rtd, alpha_var=self.deft_alpha_var,
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
        raise config_error(desc, error_lines(e, ModelConfig)) from None


def read_model_config_file(path: str | Path) -> dict:
    """A model YAML as a dict; a ``pipeline:`` path in it is resolved relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config file '{path}' does not exist")
    data = read_yaml_mapping(path, "model config")
    if isinstance(data.get("pipeline"), str):
        p = Path(data["pipeline"])
        data["pipeline"] = str(p if p.is_absolute() or p.exists() else path.parent / p)
    return data
