"""Image encoders (timm ViT or the open_clip visual tower) returning patch tokens on a grid.

``build_image_encoder(cfg) -> (encoder, transform)``: as ``open_clip.create_model_and_transforms``
does, the encoder comes with the preprocessing that matches it (size, mean/std).
Random init unless ``cfg.weights`` names a local ``.safetensors`` file (never a pickle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import open_clip
import timm
import torch
from timm.data import create_transform, resolve_model_data_config
from torch import Tensor, nn

from ..config.model import VisionConfig
from ..errors import CheckpointError
from .weights import read_safetensors


class ImageEncoder(nn.Module):
    """``forward(pixels (M, 3, H, W)) -> tokens (M, gh*gw, width)``; ``grid = (gh, gw)``."""

    width: int
    grid: tuple[int, int]
    image_size: tuple[int, int]


class TimmViTEncoder(ImageEncoder):
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

    def transform(self) -> Callable:
        cfg = resolve_model_data_config(self.model)
        cfg["input_size"] = (3, *self.image_size)
        cfg["crop_pct"] = 1.0
        return create_transform(**cfg, is_training=False)


class OpenClipVisualEncoder(ImageEncoder):
    """The visual tower of an open_clip model; patch tokens after ``ln_post`` (width of the tower)."""

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


ENCODERS: dict[str, type[ImageEncoder]] = {"timm": TimmViTEncoder, "open_clip": OpenClipVisualEncoder}


def build_image_encoder(cfg: VisionConfig) -> tuple[ImageEncoder, Callable]:
    """Build the encoder named by ``cfg`` and its matching image transform."""
    enc = ENCODERS[cfg.backend](cfg.name, dict(cfg.kwargs), cfg.feature_layer)
    if cfg.weights is not None:
        load_encoder_weights(enc, cfg.weights)
    return enc, enc.transform()


def load_encoder_weights(enc: ImageEncoder, path: str | Path) -> None:
    """Load a local safetensors state dict into ``enc.model`` (strict; mismatches are reported)."""
    state = read_safetensors(path, "vision")
    missing, unexpected = enc.model.load_state_dict(state, strict=False)
    # open_clip keeps the tower under model.visual; accept a full CLIP state dict too
    if missing and all(k.startswith("visual.") for k in unexpected):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        missing, unexpected = enc.model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"vision weights '{path}' do not match the encoder: missing {sorted(missing)[:5]}..., "
            f"unexpected {sorted(unexpected)[:5]}..."
        )
