"""Image encoders (timm ViT, the open_clip visual tower, transformers' CLIPVisionModel) returning
patch tokens on a grid.

``build_image_encoder(cfg) -> (encoder, transform)``: as ``open_clip.create_model_and_transforms``
does, the encoder comes with the preprocessing that matches it (size, mean/std).
Random init unless ``cfg.weights`` names a local ``.safetensors`` file (never a pickle), or, for
``hf_clip``, ``cfg.path`` a local CLIP directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import open_clip
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from torch import Tensor, nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from ..config.model import VisionConfig
from ..errors import CheckpointError, ConfigError
from .weights import read_safetensors, require_safetensors


class ImageEncoder(nn.Module):
    """``forward(pixels (M, 3, H, W)) -> tokens (M, gh*gw, width)``; ``grid = (gh, gw)``.

    ``forward_with_attention(pixels) -> (tokens, attention (M, gh*gw))``: the same tokens and the
    attention each patch token receives in the feature layer (``TokenBatch.encoder_attention``, read
    by ``visionzip``); only the timm backend implements it.
    """

    width: int
    grid: tuple[int, int]
    image_size: tuple[int, int]
    backend = "?"

    def forward_with_attention(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(
            f"the {self.backend!r} image encoder does not provide encoder attention (needed by visionzip with "
            f"dominance='encoder'); use vision.backend 'timm', or visionzip's dominance='norm'"
        )


def received_attention(q: Tensor, k: Tensor, scale: float, n_prefix: int, has_cls: bool) -> Tensor:
    """Attention each patch token receives, averaged over heads: ``q, k (M, heads, L, hd)`` of one
    attention layer whose first ``n_prefix`` tokens are prefix (CLS / register) tokens -> ``(M, L - n_prefix)``.
    From the CLS query (token 0) when ``has_cls``, else the mean over all queries."""
    attn = ((q.float() * scale) @ k.float().transpose(-2, -1)).softmax(-1).mean(1)  # (M, L, L)
    received = attn[:, 0] if has_cls else attn.mean(1)  # (M, L)
    return received[:, n_prefix:]


class TimmViTEncoder(ImageEncoder):
    backend = "timm"

    def __init__(self, name: str, kwargs: dict, feature_layer: int = -1):
        super().__init__()
        self.model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        if not hasattr(self.model, "forward_intermediates") or not hasattr(self.model, "patch_embed"):
            raise ValueError(f"timm model {name!r} is not a ViT with patch tokens (no forward_intermediates)")
        depth = len(self.model.blocks)
        if not -depth <= feature_layer < depth:
            raise ValueError(f"feature_layer {feature_layer} out of range for {name!r} with {depth} blocks")
        self.layer = feature_layer % depth
        # the last block's tokens go through the ViT's final norm (its usual output); an earlier block's
        # tokens are taken raw, as LLaVA takes CLIP's penultimate layer. Blocks after the feature layer,
        # the head (and the norm when unused) are dropped: never run, never trained.
        self.use_norm = self.layer == depth - 1
        self.model.prune_intermediate_layers([self.layer], prune_norm=not self.use_norm, prune_head=True)
        self.width = self.model.embed_dim
        self.grid = tuple(self.model.patch_embed.grid_size)
        self.image_size = tuple(self.model.patch_embed.img_size)

    def forward(self, pixels: Tensor) -> Tensor:
        # (M, gh*gw, width), prefix (cls/register) tokens dropped by timm
        return self.model.forward_intermediates(
            pixels, indices=[self.layer], output_fmt="NLC", intermediates_only=True, norm=self.use_norm
        )[0]

    def forward_with_attention(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """``forward``'s tokens and the attention each patch token receives in the feature layer's block,
        ``(M, gh*gw)`` float32: softmax(q k^T * scale) of that block's own q, k (``attn.qkv`` on
        ``norm1`` of the block's input, caught by a forward pre-hook; ``q_norm`` / ``k_norm`` applied),
        averaged over heads; from the CLS token, or the mean over all queries without one. The forward
        itself is untouched (same fused attention, same outputs); the attention is not differentiated."""
        block = self.model.blocks[self.layer]
        attn = getattr(block, "attn", None)
        if not (hasattr(block, "norm1") and hasattr(attn, "qkv") and hasattr(attn, "num_heads")):
            raise NotImplementedError(
                f"timm block {type(block).__name__} has no norm1 / attn.qkv: encoder attention is not available for it"
            )
        seen: list[Tensor] = []
        handle = block.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            tokens = self(pixels)
        finally:
            handle.remove()
        with torch.no_grad():
            x = seen[-1]  # (M, L, C) the block's input
            m, length, _ = x.shape
            heads = attn.num_heads
            qkv = attn.qkv(block.norm1(x)).reshape(m, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            n_prefix = int(getattr(self.model, "num_prefix_tokens", 0))
            has_cls = getattr(self.model, "cls_token", None) is not None
            received = received_attention(q, k, float(attn.scale), n_prefix, has_cls)
        return tokens, received

    def transform(self) -> Callable:
        cfg = resolve_model_data_config(self.model)
        cfg["input_size"] = (3, *self.image_size)
        cfg["crop_pct"] = 1.0
        return create_transform(**cfg, is_training=False)


class OpenClipVisualEncoder(ImageEncoder):
    """The visual tower of an open_clip model; patch tokens after ``ln_post`` (width of the tower)."""

    backend = "open_clip"

    def __init__(self, name: str, kwargs: dict, feature_layer: int = -1):
        super().__init__()
        if feature_layer != -1:
            raise ValueError("open_clip encoders expose only the last layer's tokens: use feature_layer=-1")
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, **kwargs)
        visual = model.visual
        if not hasattr(visual, "output_tokens"):
            raise ValueError(f"open_clip model {name!r} has no token output (not a ViT visual tower)")
        visual.output_tokens = True
        self.model = visual
        self._preprocess = preprocess
        self.width = visual.transformer.width
        self.grid = tuple(visual.grid_size)
        self.image_size = tuple(visual.image_size) if isinstance(visual.image_size, (tuple, list)) else (visual.image_size,) * 2

    def forward(self, pixels: Tensor) -> Tensor:
        _, tokens = self.model(pixels)  # (M, gh*gw, width)
        return tokens

    def transform(self) -> Callable:
        return self._preprocess


# CLIPImageProcessor settings a config may give (``vision.image_processor``); the rest of its keyword
# arguments (return_tensors, device, data_format, ...) are per call, not settings.
CLIP_IMAGE_SETTINGS = tuple(
    k for k in CLIPImageProcessor.valid_kwargs.__annotations__
    if k not in ("return_tensors", "device", "data_format", "input_data_format", "disable_grouping", "image_seq_length")
)


def clip_image_settings(processor: CLIPImageProcessor) -> dict[str, Any]:
    """The JSON-plain settings of ``processor`` (what ``vision.image_processor`` holds)."""
    return json.loads(json.dumps({k: v for k, v in processor.to_dict().items() if k in CLIP_IMAGE_SETTINGS}))


class ClipImageTransform:
    """PIL image -> ``(3, H, W)`` float tensor through transformers' ``CLIPImageProcessor`` (resize the
    shortest edge, centre crop, rescale, normalise), as the LLaVA processor prepares ``pixel_values``.
    Picklable, so DataLoader workers can hold it."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = dict(settings)
        self.processor = CLIPImageProcessor(**self.settings)

    def __call__(self, image: Image.Image) -> Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"ClipImageTransform({self.settings})"


class HFClipVisionEncoder(ImageEncoder):
    """transformers' ``CLIPVisionModel`` with LLaVA's feature selection (``LlavaModel.get_image_features``):
    the hidden states at ``vision_feature_layer`` (0 = embeddings), without the CLS token (``default``,
    tokens on the ``grid``) or with it first (``full``, ``grid = (1, N + 1)``: a strip, no square grid).

    The tower is kept and run whole, as transformers runs it, so its state dict is the CLIP
    checkpoint's and exports back; the layers after the feature layer and ``post_layernorm`` feed
    nothing, so they stay frozen whatever ``requires_grad_`` asks (no parameter without a gradient)."""

    backend = "hf_clip"

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.path is not None:
            require_safetensors(cfg.path, "CLIPVisionModel")
            self.model, info = CLIPVisionModel.from_pretrained(
                cfg.path, local_files_only=True, use_safetensors=True, output_loading_info=True
            )
            if info["missing_keys"]:  # transformers would leave them randomly initialised
                raise CheckpointError(
                    f"vision.path '{cfg.path}' lacks CLIP tower weights {sorted(info['missing_keys'])[:5]}; "
                    f"is it a CLIPVisionModel or CLIPModel directory?"
                )
        else:
            self.model = CLIPVisionModel(clip_vision_config(cfg.kwargs))
        config = self.model.config
        n_states = config.num_hidden_layers + 1  # hidden_states: the embeddings, then each layer
        if not -n_states <= cfg.vision_feature_layer < n_states:
            raise ConfigError(
                f"vision.vision_feature_layer {cfg.vision_feature_layer} is out of range for a CLIP tower with "
                f"{config.num_hidden_layers} layers ({n_states} hidden states: {-n_states}..{n_states - 1})"
            )
        self.layer = cfg.vision_feature_layer
        self.keep_cls = cfg.vision_feature_select_strategy == "full"
        side = config.image_size // config.patch_size
        self.width = config.hidden_size
        self.grid = (1, side * side + 1) if self.keep_cls else (side, side)
        self.image_size = (config.image_size, config.image_size)
        self.image_settings = self._image_settings(cfg)
        self.requires_grad_(True)

    def _image_settings(self, cfg: VisionConfig) -> dict[str, Any]:
        if cfg.image_processor is not None:
            unknown = sorted(set(cfg.image_processor) - set(CLIP_IMAGE_SETTINGS))
            if unknown:
                raise ConfigError(f"vision.image_processor: unknown CLIPImageProcessor setting(s) {unknown}; "
                                  f"valid: {sorted(CLIP_IMAGE_SETTINGS)}")
            processor = CLIPImageProcessor(**cfg.image_processor)
        elif cfg.path is not None and any((Path(cfg.path) / f).is_file() for f in PROCESSOR_FILES):
            processor = CLIPImageProcessor.from_pretrained(cfg.path, local_files_only=True)
        else:
            side = self.image_size[0]
            processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        out = processor.crop_size if processor.do_center_crop else processor.size
        out = (out.get("height"), out.get("width")) if out else None
        if out != self.image_size:
            raise ConfigError(
                f"vision.image_processor gives {out} images but the CLIP tower takes {self.image_size}: set "
                f"crop_size (with do_center_crop) or size to height and width {self.image_size[0]}"
            )
        return clip_image_settings(processor)

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters after the feature layer: its later encoder layers and ``post_layernorm``."""
        n_layers = self.model.config.num_hidden_layers
        used = self.layer % (n_layers + 1)  # hidden_states[i] is the output of layer i (0: embeddings)
        later = [p for layer in self.model.encoder.layers[used:] for p in layer.parameters()]
        return later + list(self.model.post_layernorm.parameters())

    def requires_grad_(self, requires_grad: bool = True) -> "HFClipVisionEncoder":
        super().requires_grad_(requires_grad)
        for p in self.unused_parameters():
            p.requires_grad_(False)
        return self

    def forward(self, pixels: Tensor) -> Tensor:
        states = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        feats = states[self.layer]  # (M, 1 + gh*gw, width), the CLS token first
        return feats if self.keep_cls else feats[:, 1:]

    def transform(self) -> Callable:
        return ClipImageTransform(self.image_settings)


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
"""Where ``save_pretrained`` puts an image processor's settings (transformers 4.x; 5.x's processors)."""


CONFIG_BOOKKEEPING = ("architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype")
"""Keys of a saved HF config that describe the file, not the model (the dtype: we build in float32)."""


def clip_vision_kwargs(config: CLIPVisionConfig) -> dict[str, Any]:
    """``vision.kwargs`` for ``config``: its values that differ from CLIPVisionConfig's defaults, without
    bookkeeping keys and keys CLIPVisionConfig does not define (llava-1.5's vision_config carries a
    stray ``vocab_size``)."""
    known = set(CLIPVisionConfig().to_dict())
    drop = (*CONFIG_BOOKKEEPING, "model_type")
    return {k: v for k, v in config.to_diff_dict().items() if k in known and k not in drop}


def clip_vision_config(kwargs: dict[str, Any]) -> CLIPVisionConfig:
    """A ``CLIPVisionConfig`` from ``vision.kwargs``; keys CLIPVisionConfig does not define are refused
    (transformers would keep them silently)."""
    known = set(CLIPVisionConfig().to_dict())
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"vision.kwargs: unknown CLIPVisionConfig key(s) {unknown}; valid keys: {sorted(known)}")
    if kwargs.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ConfigError(
            f"vision.kwargs: model_type {kwargs['model_type']!r} is not a CLIP vision tower ('clip_vision_model')"
        )
    return CLIPVisionConfig(**{k: v for k, v in kwargs.items() if k != "model_type"})


def build_image_encoder(cfg: VisionConfig) -> tuple[ImageEncoder, Callable]:
    """Build the encoder named by ``cfg`` and its matching image transform."""
    if cfg.backend == "hf_clip":
        enc = HFClipVisionEncoder(cfg)
    else:
        enc = ENCODERS[cfg.backend](cfg.name, dict(cfg.kwargs), cfg.feature_layer)
    if cfg.weights is not None:
        load_encoder_weights(enc, cfg.weights)
    return enc, enc.transform()


ENCODERS: dict[str, type[ImageEncoder]] = {"timm": TimmViTEncoder, "open_clip": OpenClipVisualEncoder}
"""The encoders built from ``(name, kwargs, feature_layer)``; ``hf_clip`` reads its whole config."""


def load_encoder_weights(enc: ImageEncoder, path: str | Path) -> None:
    """Load a local safetensors state dict into ``enc.model`` (strict; mismatches are reported)."""
    state = read_safetensors(path, "vision")
    missing, unexpected = enc.model.load_state_dict(state, strict=False)
    # a full CLIP state dict holds the tower under visual. (open_clip) or vision_model. (transformers)
    for prefix in ("visual.", "vision_model."):
        if missing and any(k.startswith(prefix) for k in unexpected):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            missing, unexpected = enc.model.load_state_dict(state, strict=False)
            break
    if missing or unexpected:
        raise CheckpointError(
            f"vision weights '{path}' do not match the encoder: missing {sorted(missing)[:5]}..., "
            f"unexpected {sorted(unexpected)[:5]}..."
        )
