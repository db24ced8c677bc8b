"""Pictures of what the reduction pipeline kept: each kept token drawn over its patch cell.

    panel = kept_tokens_panel([frame], grid=(8, 8), title="fgcs: 16/64", kept=[0, 5, ...], scale=4)
    picture = side_by_side([panel, ...])                 # one panel per stage; a video's panels stack

A panel is the media as the encoder sees it (``encoder_view``: the model's transform, normalisation
undone), scaled up ``scale`` times with nearest-neighbour, under a title band of ``TITLE_HEIGHT`` px.
Pruned cells are dimmed to ``DIM`` of their brightness; kept cells keep theirs and get a
``HIGHLIGHT`` outline of ``OUTLINE`` px inside the cell. A video's panel is its frames in a row,
``GAP`` px apart; token ``i`` of a clip is frame ``i // (h * w)``, cell ``divmod(i % (h * w), w)``.
``LlavaDeft.kept_tokens_overlay`` (``llava_deft.inference``) builds these from a generation's
``MediaReduction``. Imports only PIL, torch and torchvision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageDraw, ImageEnhance
from torchvision.transforms import Normalize
from torchvision.transforms.functional import to_pil_image

TITLE_HEIGHT = 16
"""Height of a panel's title band, in pixels."""
GAP = 4
"""Pixels between frames of a panel and between panels."""
DIM = 0.25
"""Brightness factor of pruned cells."""
HIGHLIGHT = (255, 215, 0)
"""Outline colour of kept cells (never reached by a dimmed pixel: ``DIM * 255 < 215``)."""
OUTLINE = 1
"""Outline width of kept cells, in pixels."""
BACKGROUND = (24, 24, 24)


def encoder_view(transform: Callable[[Image.Image], torch.Tensor], image: Image.Image) -> Image.Image:
    """``image`` as the encoder sees it: ``transform`` (resize, crop, normalise) applied, then its
    ``Normalize`` undone (found among ``transform.transforms``; none: values taken as [0, 1])."""
    pixels = transform(image).detach().float().cpu()  # (3, H, W)
    norm = next((t for t in getattr(transform, "transforms", []) if isinstance(t, Normalize)), None)
    if norm is not None:
        mean = torch.as_tensor(norm.mean, dtype=pixels.dtype).reshape(-1, 1, 1)
        std = torch.as_tensor(norm.std, dtype=pixels.dtype).reshape(-1, 1, 1)
        pixels = pixels * std + mean
    return to_pil_image(pixels.clamp(0, 1))


def cell_edges(size: int, cells: int) -> list[int]:
    """Pixel boundaries of ``cells`` equal cells over ``size`` pixels (``cells + 1`` values)."""
    return [round(i * size / cells) for i in range(cells + 1)]


def kept_tokens_panel(frames: Sequence[Image.Image], grid: tuple[int, int], title: str, kept: Sequence[int],
                      scale: int) -> Image.Image:
    """One panel: ``frames`` (one for an image) in a row, each ``scale`` times its size, the cells of
    token indices ``kept`` bright and outlined, the others dimmed, under ``title``."""
    gh, gw = grid
    w, h = frames[0].size
    fw, fh = w * scale, h * scale
    panel = Image.new("RGB", (len(frames) * fw + (len(frames) - 1) * GAP, TITLE_HEIGHT + fh), BACKGROUND)
    xs, ys = cell_edges(fw, gw), cell_edges(fh, gh)
    per_frame = gh * gw
    draw = ImageDraw.Draw(panel)
    for t, frame in enumerate(frames):
        big = frame.convert("RGB").resize((fw, fh), Image.NEAREST)
        left = t * (fw + GAP)
        panel.paste(ImageEnhance.Brightness(big).enhance(DIM), (left, TITLE_HEIGHT))
        for i in kept:
            if i // per_frame != t:
                continue
            r, c = divmod(i % per_frame, gw)
            box = (xs[c], ys[r], xs[c + 1], ys[r + 1])
            panel.paste(big.crop(box), (left + box[0], TITLE_HEIGHT + box[1]))
            draw.rectangle((left + box[0], TITLE_HEIGHT + box[1], left + box[2] - 1, TITLE_HEIGHT + box[3] - 1),
                           outline=HIGHLIGHT, width=OUTLINE)
    draw.text((3, 2), title, fill=(240, 240, 240))
    return panel


def side_by_side(panels: Sequence[Image.Image], vertical: bool = False) -> Image.Image:
    """Panels in a row (``vertical``: in a column), ``GAP`` px apart."""
    widths, heights = [p.width for p in panels], [p.height for p in panels]
    if vertical:
        size = (max(widths), sum(heights) + GAP * (len(panels) - 1))
    else:
        size = (sum(widths) + GAP * (len(panels) - 1), max(heights))
    out = Image.new("RGB", size, BACKGROUND)
    offset = 0
    for p in panels:
        out.paste(p, (0, offset) if vertical else (offset, 0))
        offset += (p.height if vertical else p.width) + GAP
    return out


__all__ = ["BACKGROUND", "DIM", "GAP", "HIGHLIGHT", "OUTLINE", "TITLE_HEIGHT", "cell_edges", "encoder_view",
           "kept_tokens_panel", "side_by_side"]
