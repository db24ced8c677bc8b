"""Splice reduced media tokens into the prompt's embeddings at placeholder tokens (vectorised).

Every placeholder token in ``input_ids`` is replaced by the real tokens of one media row of the
pipeline's output, in order (sample order, then position in the prompt).  Positions for RoPE
are those of the UNREDUCED sequence: a media span occupies ``n_orig`` positions and each kept
token sits at ``span_start + index`` (its position in the original media sequence), so pruning
leaves gaps instead of shifting the text that follows.

No Python loop over samples or tokens: widths -> cumsum -> scatter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class Spliced:
    embeds: Tensor  # (B, L', D)
    attention_mask: Tensor  # (B, L') long, 1 = real token
    position_ids: Tensor  # (B, L') long, original (unreduced) positions; 0 on padding
    labels: Tensor | None  # (B, L') long, IGNORE_INDEX on media, prompt and padding
    media_positions: Tensor  # (B, L') bool, True where a media token sits
    kinds: Tensor | None = None  # (B, L') long: pipeline.llm.TEXT_KIND (-1) for text, else the Modality code


def splice_media(
    input_ids: Tensor,
    attention_mask: Tensor,
    text_embeds: Tensor,
    is_placeholder: Tensor,
    media_tokens: Tensor,
    media_mask: Tensor,
    media_index: Tensor,
    media_orig_len: Tensor,
    labels: Tensor | None = None,
    padding_side: str = "right",
    media_modality: Tensor | None = None,
) -> Spliced:
    """Vectorised splice.

    input_ids, attention_mask, is_placeholder: (B, L); text_embeds: (B, L, D)
    media_tokens: (M, K, D); media_mask, media_index: (M, K); media_orig_len: (M,)
    ``M`` must equal ``is_placeholder.sum()`` (checked by the caller, which can name the sample).
    ``media_modality`` (M,) long: each media row's ``Modality`` code, written into ``Spliced.kinds``.
    """
    b, l, d = text_embeds.shape
    dev = text_embeds.device
    am = attention_mask.bool()
    ph = is_placeholder & am  # (B, L)
    kept = media_mask.sum(1)  # (M,)

    # ---- width of each input position in the output, and in the original (unreduced) sequence
    width = torch.ones(b, l, dtype=torch.long, device=dev)
    width[ph] = kept  # row-major order of True entries == media order
    orig_width = am.long()
    orig_width[ph] = media_orig_len.to(dev)

    start = width.cumsum(1) - width  # (B, L) output column of each input position
    total = width.sum(1)  # (B,)
    out_len = int(total.max().item())
    if padding_side == "left":
        start = start + (out_len - total).unsqueeze(1)  # real tokens end at the right edge
    pos_start = orig_width.cumsum(1) - orig_width  # (B, L) original position of each input position

    embeds = text_embeds.new_zeros(b, out_len, d)
    out_mask = torch.zeros(b, out_len, dtype=torch.long, device=dev)
    pos = torch.zeros(b, out_len, dtype=torch.long, device=dev)
    is_media = torch.zeros(b, out_len, dtype=torch.bool, device=dev)
    kinds = torch.full((b, out_len), -1, dtype=torch.long, device=dev)  # pipeline.llm.TEXT_KIND
    out_labels = None if labels is None else torch.full((b, out_len), IGNORE_INDEX, dtype=torch.long, device=dev)

    # ---- text (and padding) tokens
    txt = ~ph  # (B, L)
    rows = torch.arange(b, device=dev).unsqueeze(1).expand(b, l)
    r, c = rows[txt], start[txt]
    embeds[r, c] = text_embeds[txt]
    out_mask[r, c] = attention_mask[txt].long()
    pos[r, c] = torch.where(am[txt], pos_start[txt], torch.zeros_like(c))
    if labels is not None:
        out_labels[r, c] = labels[txt]

    # ---- media tokens: media m goes to row b_m starting at column start[b_m, l_m]
    if media_tokens.shape[0] > 0:
        m_row = rows[ph]  # (M,)
        m_col = start[ph]  # (M,)
        m_pos = pos_start[ph]  # (M,)
        rank = media_mask.long().cumsum(1) - 1  # (M, K) slot of each real token in its span
        sel = media_mask  # (M, K)
        mr = m_row.unsqueeze(1).expand_as(rank)[sel]
        mc = (m_col.unsqueeze(1) + rank)[sel]
        embeds[mr, mc] = media_tokens[sel].to(embeds.dtype)
        out_mask[mr, mc] = 1
        pos[mr, mc] = (m_pos.unsqueeze(1) + media_index)[sel]
        is_media[mr, mc] = True
        if media_modality is not None:
            kinds[mr, mc] = media_modality.to(dev).unsqueeze(1).expand_as(rank)[sel]
    return Spliced(embeds, out_mask, pos, out_labels, is_media, kinds)


def window_labels(labels: Tensor, attention_mask: Tensor, window: int) -> Tensor:
    """``labels`` (B, L) with IGNORE_INDEX everywhere but each row's last ``window`` real tokens (by
    ``attention_mask``, left or right padding alike): the windowed loss of pair-compressed layers, whose
    window of recent tokens is never merged (seed 002's ``WindowedLossSFTTrainer``)."""
    if window < 1:
        raise ValueError(f"the loss window must be >= 1 token, got {window}")
    real = attention_mask.bool()
    from_end = real.flip(1).long().cumsum(1).flip(1)  # (B, L): real tokens at or after each position
    return torch.where(real & (from_end <= window), labels, torch.full_like(labels, IGNORE_INDEX))

