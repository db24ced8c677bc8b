"""Splice reduced media tokens into the prompt's embeddings at placeholder tokens (vectorised).

Every placeholder token in ``input_ids`` is replaced by the real tokens of one media row of the
pipeline's output, in order (sample order, then position in the prompt).  Positions for RoPE
are those of the UNREDUCED sequence: a media span occupies ``n_orig`` positions and each kept
token sits at ``span_start + index`` (its position in the original media sequence), so pruning
leaves gaps instead of shifting the text that follows.

No Python loop over samples or tokens: widths -> cumsum -> scatter; one wait for the device (the output's
width), no boolean indexing.
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
    sizes: Tensor | None = None  # (B, L') float: input tokens each token stands for (1 for text); None: all 1


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
    media_sizes: Tensor | None = None,
) -> Spliced:
    """Vectorised splice.

    input_ids, attention_mask, is_placeholder: (B, L); text_embeds: (B, L, D)
    media_tokens: (M, K, D); media_mask, media_index: (M, K); media_orig_len: (M,)
    ``M`` must equal ``is_placeholder.sum()`` (checked by the caller, which can name the sample).
    ``media_modality`` (M,) long: each media row's ``Modality`` code, written into ``Spliced.kinds``.
    ``media_sizes`` (M, K) float: ``TokenBatch.sizes`` of the media rows, written into ``Spliced.sizes``
    (text and padding 1); None leaves ``Spliced.sizes`` None.
    """
    b, l, d = text_embeds.shape
    dev = text_embeds.device
    m = media_tokens.shape[0]
    am = attention_mask.bool()
    ph = is_placeholder & am  # (B, L)
    # the media rows' placeholders in row-major order: their number M is known on the host, so finding them
    # waits for nothing (nonzero_static); every write below is a scatter to a computed column, with a spare
    # column at the end taking what must not land anywhere -- no boolean indexing, which would wait for
    # the device once per write
    flat = torch.nonzero_static(ph.flatten(), size=m)[:, 0]  # (M,)
    media_of = (ph.flatten().long().cumsum(0) - 1).clamp(0, max(m - 1, 0)).view(b, l)  # (B, L) media of a placeholder

    # ---- width of each input position in the output, and in the original (unreduced) sequence
    width = torch.ones(b, l, dtype=torch.long, device=dev)
    orig_width = am.long()
    if m:
        width = torch.where(ph, media_mask.sum(1)[media_of], width)
        orig_width = torch.where(ph, media_orig_len.to(dev)[media_of], orig_width)

    start = width.cumsum(1) - width  # (B, L) output column of each input position
    total = width.sum(1)  # (B,)
    out_len = int(total.max().item())  # the one wait: the output's width
    if padding_side == "left":
        start = start + (out_len - total).unsqueeze(1)  # real tokens end at the right edge
    pos_start = orig_width.cumsum(1) - orig_width  # (B, L) original position of each input position
    spare = out_len  # the extra column, cut at the end

    # ---- text (and padding) tokens: every position but a placeholder, at its output column
    col = torch.where(ph, spare, start)  # (B, L)
    embeds = text_embeds.new_zeros(b, out_len + 1, d).scatter(1, col.unsqueeze(-1).expand(b, l, d), text_embeds)
    out_mask = torch.zeros(b, out_len + 1, dtype=torch.long, device=dev).scatter(1, col, attention_mask.long())
    pos = torch.zeros(b, out_len + 1, dtype=torch.long, device=dev).scatter(
        1, col, torch.where(am, pos_start, torch.zeros_like(pos_start)))
    is_media = torch.zeros(b, out_len + 1, dtype=torch.bool, device=dev)
    kinds = torch.full((b, out_len + 1), -1, dtype=torch.long, device=dev)  # pipeline.llm.TEXT_KIND
    sizes = None if media_sizes is None else torch.ones(b, out_len + 1, dtype=media_sizes.dtype, device=dev)
    out_labels = None
    if labels is not None:
        out_labels = torch.full((b, out_len + 1), IGNORE_INDEX, dtype=torch.long, device=dev).scatter(1, col, labels)
        out_labels[:, spare] = IGNORE_INDEX

    # ---- media tokens: media m goes to row b_m from column start[b_m, l_m], its kept tokens in order
    if m:
        m_row, m_col, m_pos = flat // l, start.flatten()[flat], pos_start.flatten()[flat]  # (M,)
        sel = media_mask.bool()  # (M, K)
        rank = sel.long().cumsum(1) - 1  # (M, K) slot of each real token in its span
        dest = m_row.unsqueeze(1) * (out_len + 1) + torch.where(sel, m_col.unsqueeze(1) + rank, spare)  # (M, K)
        dest = dest.flatten()

        def put(buf: Tensor, values: Tensor) -> Tensor:  # (B, out_len + 1[, D]) <- (M, K[, D]) at dest
            flat_buf, flat_values = buf.flatten(0, 1), values.flatten(0, 1).to(buf.dtype)
            index = dest if flat_buf.dim() == 1 else dest.unsqueeze(1).expand_as(flat_values)
            return flat_buf.scatter(0, index, flat_values).view_as(buf)

        embeds = put(embeds, media_tokens)
        out_mask = put(out_mask, sel.long())
        pos = put(pos, m_pos.unsqueeze(1) + media_index)
        is_media = put(is_media, sel)
        if media_modality is not None:
            kinds = put(kinds, media_modality.to(dev).unsqueeze(1).expand_as(rank))
        if sizes is not None:
            sizes = put(sizes, media_sizes.to(dev))
    embeds, out_mask, pos, is_media, kinds = (t[:, :out_len] for t in (embeds, out_mask, pos, is_media, kinds))
    out_labels = None if out_labels is None else out_labels[:, :out_len]
    sizes = None if sizes is None else sizes[:, :out_len]
    return Spliced(embeds, out_mask, pos, out_labels, is_media, kinds, sizes)


def window_labels(labels: Tensor, attention_mask: Tensor, window: int) -> Tensor:
    """``labels`` (B, L) with IGNORE_INDEX everywhere but each row's last ``window`` real tokens (by
    ``attention_mask``, left or right padding alike): the windowed loss of pair-compressed layers, whose
    window of recent tokens is never merged (seed 002's ``WindowedLossSFTTrainer``)."""
    if window < 1:
        raise ValueError(f"the loss window must be >= 1 token, got {window}")
    real = attention_mask.bool()
    from_end = real.flip(1).long().cumsum(1).flip(1)  # (B, L): real tokens at or after each position
    return torch.where(real & (from_end <= window), labels, torch.full_like(labels, IGNORE_INDEX))

