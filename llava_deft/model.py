"""LlavaDeftForCausalLM: image encoder -> projector -> reduction pipeline -> splice -> decoder LLM.

Images and videos share the encoder: a video's frames go through it one by one (optionally pooled per
frame, ``video.pool_stride``), and the clip becomes one pipeline row laid out ``(T, H', W')``. Image and
video rows of a batch form ONE ``TokenBatch`` in the order their placeholders appear, so the pipeline
runs once and the splice fills ``<image>`` and ``<video>`` placeholders in one pass.

    model = LlavaDeftForCausalLM(load_model_config())           # tiny random-initialised default
    out = model(**batch)                                         # batch from MultimodalCollator
    model.save_pretrained("ckpt"); LlavaDeftForCausalLM.from_pretrained("ckpt")

A checkpoint directory holds ``config.json`` (the validated model config, with the LLM's HF config
embedded), ``model.safetensors`` and ``tokenizer/``.  Nothing is unpickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pipeline import Modality, TokenBatch, build_pipeline

from .config import DEFT_KEYS, ModelConfig, load_model_config
from .encoders import build_image_encoder, build_projector
from .errors import CheckpointError, MediaCountMismatchError
from .llm import TINY_LLM, DecoderLM, build_llm, generate_from_embeds
from .splice import IGNORE_INDEX, splice_media
from .tokenizer import load_tokenizer
from .video import load_video, pool_frame_tokens

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


@dataclass
class LlavaDeftOutput:
    loss: Tensor | None
    logits: Tensor | None
    lm_loss: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)


class LlavaDeftForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig | dict | str | None = None, tokenizer=None):
        super().__init__()
        self.config = load_model_config(config)
        cfg = self.config
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
        self.vision, self.image_transform = build_image_encoder(cfg.vision)
        llm_spec = cfg.llm.path if cfg.llm.path is not None else (cfg.llm.config or TINY_LLM)
        hf = build_llm(llm_spec, vocab_size=len(self.tokenizer), attn_implementation=cfg.llm.attn_implementation)
        self.llm = DecoderLM(hf)
        self.projector = build_projector(cfg.projector.type, self.vision.width, self.llm.hidden_size)
        self.pipeline = build_pipeline(cfg.pipeline_config(), dim=self.llm.hidden_size)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<image>")
        self.video_token_id = self.tokenizer.convert_tokens_to_ids("<video>")
        self.media_tokens_per_image = self.vision.grid[0] * self.vision.grid[1]
        stride = cfg.video.pool_stride
        self.video_grid = (math.ceil(self.vision.grid[0] / stride), math.ceil(self.vision.grid[1] / stride))
        self.media_tokens_per_frame = self.video_grid[0] * self.video_grid[1]
        """Tokens one video frame gives the pipeline, after ``video.pool_stride`` pooling."""
        self.apply_freeze(vision=cfg.vision.freeze, llm=cfg.llm.freeze)

    # ------------------------------------------------------------------ training set-up
    def apply_freeze(self, vision: bool, llm: bool) -> None:
        """LLaVA stages: stage 1 freezes LLM (and encoder), stage 2 trains the LLM too."""
        self.vision.requires_grad_(not vision)
        self.llm.requires_grad_(not llm)
        self.projector.requires_grad_(True)
        self.pipeline.requires_grad_(True)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    # ------------------------------------------------------------------ media path
    def encode_images(self, pixel_values: Tensor) -> TokenBatch:
        """pixels (M, 3, H, W) -> TokenBatch of projected patch tokens (M, gh*gw, D) on grid (1, gh, gw)."""
        feats = self.vision(pixel_values.to(self.projector_dtype()))  # (M, N, Dv)
        tokens = self.projector(feats)  # (M, N, D)
        gh, gw = self.vision.grid
        return TokenBatch.from_tokens(tokens, modality=Modality.IMAGE, layout=(1, gh, gw))

    def encode_videos(self, video_values: Tensor, video_frames: Tensor) -> TokenBatch:
        """frames (F, 3, H, W) of V videos with ``video_frames (V,)`` frames each -> TokenBatch of V rows,
        modality VIDEO, layout (T_v, H', W'), tokens frame after frame (row-major grid in each frame).

        Every frame goes through the image encoder and projector in one call; ``pool_frame_tokens``
        pools each frame's grid (``video.pool_stride``); a scatter lays frames out per video, padded to
        the longest (mask False).
        """
        feats = self.vision(video_values.to(self.projector_dtype()))  # (F, N, Dv)
        tokens = self.projector(feats)  # (F, N, D)
        tokens, (_, h, w) = pool_frame_tokens(tokens, self.vision.grid, self.config.video.pool_stride)  # (F, n, D)
        f, n, d = tokens.shape
        dev = tokens.device
        frames = video_frames.to(dev)
        v = frames.shape[0]
        video = torch.repeat_interleave(torch.arange(v, device=dev), frames)  # (F,) video of each frame
        first = frames.cumsum(0) - frames  # (V,) first frame of each video
        t = torch.arange(f, device=dev) - first[video]  # (F,) frame number inside its video
        width = int(frames.max()) * n if v else 0
        cols = (t * n).unsqueeze(1) + torch.arange(n, device=dev)  # (F, n) slot of each token in its row
        rows = video.unsqueeze(1).expand(f, n)
        out = tokens.new_zeros(v, width, d)
        out[rows, cols] = tokens
        mask = torch.zeros(v, width, dtype=torch.bool, device=dev)
        mask[rows, cols] = True
        layout = torch.stack([frames, torch.full_like(frames, h), torch.full_like(frames, w)], 1)  # (V, 3)
        return TokenBatch.from_tokens(out, mask, modality=Modality.VIDEO, layout=layout)

    def _blank(self) -> TokenBatch:
        """One blank image, for batches without media (see ``_media``)."""
        h, w = self.vision.image_size
        return self.encode_images(torch.zeros(1, 3, h, w, device=self.device, dtype=self.projector_dtype()))

    def _media(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None,
               video_values: Tensor | None, video_frames: Tensor | None):
        """Encode + reduce every image and video of the batch in one pipeline call.

        Rows are in placeholder order (sample order, then position in the prompt), whatever their
        modality: a placeholder's row is ``offset[modality] + its rank among placeholders of its
        modality`` (cumsum), so image rows (first) and video rows (after them) are gathered by one index.

        With no media at all, a blank image still runs through encoder, projector and pipeline and
        enters the graph with weight 0: every rank then runs the same modules, which ZeRO-3 needs
        (a rank skipping the encoder while another gathers its parameters hangs).
        """
        parts = []
        if pixel_values is not None and pixel_values.shape[0] > 0:
            parts.append(self.encode_images(pixel_values))
        if video_values is not None and video_values.shape[0] > 0:
            parts.append(self.encode_videos(video_values, video_frames))
        if not parts:
            out = self.pipeline(self._blank())
            zero = sum(t.sum() for t in [out.tokens, *out.losses.values()]) * 0.0
            return None, zero, {}, {}
        batch = parts[0] if len(parts) == 1 else _cat_rows(parts)
        ph = ((input_ids == self.image_token_id) | (input_ids == self.video_token_id)) & attention_mask.bool()
        is_video = input_ids[ph] == self.video_token_id  # (P,) placeholders in row-major order
        rank = torch.where(is_video, is_video.long().cumsum(0), (~is_video).long().cumsum(0)) - 1  # (P,)
        n_images = int((~is_video).sum())
        order = rank + is_video.long() * n_images  # (P,) row of each placeholder's media
        batch = _take_rows(batch, order.to(batch.tokens.device))
        out = self.pipeline(batch)
        return out, None, out.losses, out.stats

    def _check_counts(self, input_ids: Tensor, attention_mask: Tensor, counts_by_kind: dict, ids=None):
        """Per sample and kind, placeholders == media (``counts_by_kind``: placeholder id ->
        (token, counts (B,) or None, media in the batch))."""
        am = attention_mask.bool()
        for token_id, (token, media_counts, n_media) in counts_by_kind.items():
            per_sample = ((input_ids == token_id) & am).sum(1)
            counts = media_counts if media_counts is not None else torch.zeros_like(per_sample)
            bad = (per_sample != counts.to(per_sample.device)).nonzero().flatten().tolist()
            if bad:
                i = bad[0]
                name = ids[i] if ids is not None else f"#{i} of the batch"
                raise MediaCountMismatchError(str(name), token, int(per_sample[i]), int(counts[i]))
            if int(counts.sum()) != n_media:
                raise MediaCountMismatchError("<batch>", token, int(counts.sum()), n_media)

    def prepare_inputs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor | None = None,
        media_counts: Tensor | None = None,
        labels: Tensor | None = None,
        padding_side: str = "right",
        ids: list[str] | None = None,
        video_values: Tensor | None = None,
        video_frames: Tensor | None = None,
        video_counts: Tensor | None = None,
    ):
        n_images = 0 if pixel_values is None else int(pixel_values.shape[0])
        n_videos = 0 if video_frames is None else int(video_frames.shape[0])
        n_frames = 0 if video_values is None else int(video_values.shape[0])
        if n_frames != (0 if video_frames is None else int(video_frames.sum())) or (
            video_frames is not None and bool((video_frames < 1).any())
        ):
            raise ValueError(
                f"video_values has {n_frames} frames but video_frames {None if video_frames is None else video_frames.tolist()} "
                f"sums to another number (or has a video without frames); pass the collator's output unchanged"
            )
        self._check_counts(input_ids, attention_mask, {
            self.image_token_id: ("<image>", media_counts, n_images),
            self.video_token_id: ("<video>", video_counts, n_videos),
        }, ids)
        media, zero, losses, stats = self._media(input_ids, attention_mask, pixel_values, video_values, video_frames)
        text = self.llm.embed(input_ids)
        if zero is not None:
            text = text + zero.to(text.dtype)
        if media is None:  # no media rows: an empty (0, 1, D) batch keeps one splice path
            d = text.shape[-1]
            media = TokenBatch(
                tokens=text.new_zeros(0, 1, d),
                mask=torch.zeros(0, 1, dtype=torch.bool, device=text.device),
                index=torch.zeros(0, 1, dtype=torch.long, device=text.device),
                modality=torch.zeros(0, dtype=torch.long, device=text.device),
                layout=torch.zeros(0, 3, dtype=torch.long, device=text.device),
            )
        is_placeholder = (input_ids == self.image_token_id) | (input_ids == self.video_token_id)
        spliced = splice_media(
            input_ids, attention_mask, text, is_placeholder,
            media.tokens, media.mask, media.index, media.layout.prod(1), labels, padding_side,
        )
        return spliced, losses, stats

    def load_video(self, path):
        """Read a clip the way this model's config samples frames (``video.num_frames/fps/max_frames``)."""
        return load_video(path, **self.config.video.sampling())

    # ------------------------------------------------------------------ forward / loss
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor | None = None,
        media_counts: Tensor | None = None,
        labels: Tensor | None = None,
        ids: list[str] | None = None,
        video_values: Tensor | None = None,
        video_frames: Tensor | None = None,
        video_counts: Tensor | None = None,
        **unused,
    ) -> LlavaDeftOutput:
        sp, aux, stats = self.prepare_inputs(
            input_ids, attention_mask, pixel_values, media_counts, labels, ids=ids,
            video_values=video_values, video_frames=video_frames, video_counts=video_counts,
        )
        logits, _ = self.llm(sp.embeds, sp.attention_mask, sp.position_ids)
        loss = lm_loss = None
        if sp.labels is not None:
            # predict token t+1 from t; loss in fp32
            lm_loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), sp.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )
            loss = lm_loss + sum(aux.values(), torch.zeros((), device=lm_loss.device))
        return LlavaDeftOutput(loss, logits, lm_loss, aux, stats)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor | None = None,
        media_counts: Tensor | None = None,
        max_new_tokens: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        ids: list[str] | None = None,
        return_media_tokens: bool = False,
        video_values: Tensor | None = None,
        video_frames: Tensor | None = None,
        video_counts: Tensor | None = None,
        **unused,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Left-padded prompts (with images and/or videos, as the collator gives them) -> new token
        ids (B, T), padded with the pad id after EOS.

        With ``return_media_tokens`` also the number of media tokens each prompt gave the LLM (B,).
        """
        sp, _, _ = self.prepare_inputs(
            input_ids, attention_mask, pixel_values, media_counts, padding_side="left", ids=ids,
            video_values=video_values, video_frames=video_frames, video_counts=video_counts,
        )
        out = generate_from_embeds(
            self.llm, sp.embeds, sp.attention_mask, sp.position_ids,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
        )
        return (out, sp.media_positions.sum(1)) if return_media_tokens else out

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write config.json + model.safetensors + tokenizer/ (encoder weights live in the safetensors)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = self.config.model_dump()
        cfg["vision"]["weights"] = None
        cfg["llm"] = {**cfg["llm"], "path": None, "config": self.llm.config.to_diff_dict()}
        cfg["llm"]["config"]["model_type"] = self.llm.config.model_type
        cfg["tokenizer"] = TOKENIZER_DIR
        (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, default=str))
        state = state_dict if state_dict is not None else self.state_dict()
        # safetensors refuses shared storage (tied embeddings): store contiguous clones
        state = {k: v.detach().contiguous().clone().cpu() for k, v in state.items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(str(path / TOKENIZER_DIR))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, pipeline: dict | list | str | None = None, **overrides) -> "LlavaDeftForCausalLM":
        """Load a directory written by :meth:`save_pretrained` (or a training export).

        ``pipeline`` replaces the saved reduction pipeline (e.g. a training-free sweep); weights of
        stages that exist in the checkpoint are loaded, new stages keep their init.
        """
        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"checkpoint '{path}' has no {CONFIG_NAME}; is it a llava-deft model directory?")
        if not (path / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"checkpoint '{path}' has no {WEIGHTS_NAME}")
        cfg = json.loads((path / CONFIG_NAME).read_text())
        cfg["tokenizer"] = str(path / TOKENIZER_DIR)
        if pipeline is not None:
            cfg["pipeline"] = pipeline
            for key in ("use_deft", *DEFT_KEYS):  # the given pipeline replaces the DeFT switches too
                cfg.pop(key, None)
        for k, v in overrides.items():
            cfg[k] = v
        model = cls(cfg)
        state = load_file(str(path / WEIGHTS_NAME))
        own = model.state_dict()
        if pipeline is not None:  # stages may differ from the checkpoint's
            state = {k: v for k, v in state.items() if not k.startswith("pipeline.") or (k in own and own[k].shape == v.shape)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (pipeline is not None and k.startswith("pipeline."))]
        missing = [k for k in missing if k not in _tied_keys(model)]
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint '{path}' does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return model


def _cat_rows(parts: list[TokenBatch]) -> TokenBatch:
    """Stack fresh TokenBatches (no scores, pruned or losses yet) row-wise, padding N to the longest
    with mask False."""
    n = max(p.tokens.shape[1] for p in parts)

    def pad(x: Tensor, value) -> Tensor:
        return F.pad(x, (0, 0, 0, n - x.shape[1]) if x.dim() == 3 else (0, n - x.shape[1]), value=value)

    return TokenBatch(
        tokens=torch.cat([pad(p.tokens, 0.0) for p in parts]),
        mask=torch.cat([pad(p.mask, False) for p in parts]),
        index=torch.arange(n, device=parts[0].tokens.device).expand(sum(p.tokens.shape[0] for p in parts), n).clone(),
        modality=torch.cat([p.modality for p in parts]),
        layout=torch.cat([p.layout for p in parts]),
    )


def _take_rows(batch: TokenBatch, order: Tensor) -> TokenBatch:
    """Rows ``order`` of a fresh TokenBatch (index gather along B)."""
    return TokenBatch(
        tokens=batch.tokens[order], mask=batch.mask[order], index=batch.index[order],
        modality=batch.modality[order], layout=batch.layout[order],
    )


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that alias another parameter (e.g. tied lm_head); they need not be stored twice."""
    seen: dict[int, str] = {}
    tied = set()
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in seen:
            tied.add(k)
        seen[id(v)] = k
    return tied
