"""LlavaDeftForCausalLM: encoders -> projectors -> reduction pipeline -> splice -> decoder LLM.

Images and videos share the encoder: a video's frames go through it one by one (optionally pooled per
frame, ``video.pool_stride``), and the clip becomes one pipeline row laid out ``(T, H', W')``. Audio
(``audio.enabled``) goes through the Whisper-style ``AudioEncoder`` and its own projector: one row per
clip, laid out ``(T, 1, 1)`` with only the tokens that cover the clip. A text passage (``<text>``) is
embedded with the LLM's input embeddings: one TEXT row laid out ``(N, 1, 1)``, which DeFT's fgcs groups
by top-k semantic neighbours. The rows of a batch, whatever their modality, form ONE ``TokenBatch`` in
the order their placeholders appear, so the pipeline runs once and the splice fills ``<image>``,
``<video>``, ``<audio>`` and ``<text>`` placeholders in one pass. ``compress_all_encoders`` streams long
videos and audio clips chunk by chunk into a bounded token memory per stream instead (a KV-cache
policy such as TOVA chooses what stays; ``llava_deft.encoders.stream``).

    model = LlavaDeftForCausalLM(load_model_config())           # tiny random-initialised default
    out = model(**batch)                                         # batch from MultimodalCollator
    model.save_pretrained("ckpt"); LlavaDeftForCausalLM.from_pretrained("ckpt")

A checkpoint directory holds ``config.json`` (the validated model config, with the LLM's HF config
embedded), ``model.safetensors`` and ``tokenizer/``.  ``from_pretrained`` also loads a directory that
transformers' ``LlavaForConditionalGeneration.save_pretrained`` wrote (``hf_llava.py``; back with
``export_hf_llava``). Nothing is unpickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.profiler import record_function

from pipeline import Modality, TokenBatch, build_pipeline
from pipeline import read_stats
from pipeline.llm import collect_losses

from ..config.model import DEFT_KEYS, ModelConfig, load_model_config
from ..encoders.audio import AudioEncoder
from ..encoders.image import build_image_encoder, clip_vision_kwargs
from ..encoders.stream import DEFAULT_TEMPERATURE, EncoderMemory, cache_policy_names, stream_batch
from ..encoders.video import pool_frame_tokens
from ..encoders.weights import read_safetensors
from ..errors import CheckpointError, InvalidArgumentError, MediaCountMismatchError, UnsupportedInputError
from ..modality import MEDIA_INPUTS, MODALITIES
from .checkpoint import CONFIG_NAME, load_state, read_config_json
from .graphs import CapturedCall, GraphSlot
from .hf_llava import is_hf_llava_config, load_hf_llava
from .kernels import register_kernels
from .llm import TINY_LLM, DecoderLM, build_llm, generate_from_embeds
from .llm.decoder import device_ids
from .processors import Processors, media_options
from .projector import build_projector
from .splice import IGNORE_INDEX, splice_media, window_labels
from .tokenizer import load_model_tokenizer, media_token_ids

register_kernels()  # fused kernels for pipeline/ (DivPrune's greedy loop in Triton) where Triton is installed

WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"

def _media_inputs(batch: dict) -> dict:
    """The collator's media tensors (``llava_deft.modality.MEDIA_INPUTS``) of a batch; other keys are ignored."""
    return {k: v for k, v in batch.items() if k in MEDIA_INPUTS}


@dataclass
class LlavaDeftOutput:
    loss: Tensor | None
    logits: Tensor | None
    lm_loss: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    """The pipeline's per-stage statistics as 0-dim tensors (``pipeline.ops.read_stats`` reads them)."""
    llm_tokens: Tensor | None = None
    """(2,) long on the device: real (unpadded) and padded tokens the LLM ran on (throughput, MFU)."""


@dataclass
class MediaReduction:
    """What the reduction pipeline kept of one media item of one prompt.

    Indices are positions in the item's ORIGINAL token sequence (``TokenBatch.index``): for an image
    ``row * grid_w + col``, for a video ``frame * h * w + row * w + col`` on its ``layout (T, H, W)``.
    """

    kind: str
    """``"image"``, ``"video"``, ``"audio"`` or ``"text"``."""
    item: int
    """Its rank among the prompt's items of that kind (0 = the first ``<image>``, ...)."""
    layout: tuple[int, int, int]
    total: int
    """Tokens before reduction (``T * H * W``)."""
    kept: list[int]
    """Original indices of the tokens the LLM sees, ascending."""
    stages: list[tuple[str, list[int]]] = field(default_factory=list)
    """``(stage name, original indices of the tokens left after it)`` per pipeline stage, in order."""


@dataclass
class GenerationInfo:
    """What ``generate(..., return_info=True)`` reports besides the tokens."""

    stats: dict[str, dict[str, float]]
    """The pipeline's per-stage statistics (``tokens_in`` / ``tokens_out``: means over the batch's media rows)."""
    media: list[list[MediaReduction]]
    """Per prompt, its media items in placeholder order."""
    prompt_lengths: list[int]
    """Positions each prompt spans (unreduced: kept tokens keep their positions); ``+ max_new_tokens``
    may not exceed the LLM's ``max_position_embeddings``."""
    llm_tokens: list[int]
    """Tokens each prompt gave the LLM after reduction (text and media)."""
    cache: list[dict] | None = None
    """With stages inside the LLM (the pipeline's ``llm:``), per decoder layer at the end of generation:
    ``slots`` held, ``tokens_mean`` / ``tokens_max`` real tokens per row and KV head, ``evicted`` and the
    ``bytes`` of keys + values (``StagedCache.stats``); None without them."""
    llm_stats: dict[str, dict] | None = None
    """Statistics the LLM stages recorded (e.g. ``tova`` with ``debug: true``: per layer), by stage name."""


class LlavaDeftForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig | dict | str | None = None, tokenizer=None):
        super().__init__()
        self.config = load_model_config(config)
        cfg = self.config
        self.tokenizer = tokenizer if tokenizer is not None else load_model_tokenizer(cfg.tokenizer, cfg.llm.path)
        self.vision, self.image_transform = build_image_encoder(cfg.vision) if cfg.vision is not None else (None, None)
        llm_spec = cfg.llm.path if cfg.llm.path is not None else (cfg.llm.config or TINY_LLM)
        hf = build_llm(llm_spec, vocab_size=len(self.tokenizer), attn_implementation=cfg.llm.attn_implementation)
        self.llm = DecoderLM(hf)
        self.projector = (build_projector(cfg.projector.type, self.vision.width, self.llm.hidden_size)
                          if self.vision is not None else None)
        self.pipeline = build_pipeline(cfg.pipeline_config(), dim=self.llm.hidden_size)
        placeholders = media_token_ids(self.tokenizer)
        self.media_token_ids = {kind: placeholders.get(kind, -1) for kind in MODALITIES}
        """Placeholder id per kind; -1 (matches no token) where the tokenizer lacks the placeholder."""
        for kind, token_id in self.media_token_ids.items():  # image_token_id, video_token_id, ...
            setattr(self, f"{kind}_token_id", token_id)
        grid = self.vision.grid if self.vision is not None else (0, 0)  # text only: no image or video tokens
        self.media_tokens_per_image = grid[0] * grid[1]
        stride = cfg.video.pool_stride
        self.video_grid = (math.ceil(grid[0] / stride), math.ceil(grid[1] / stride))
        self.media_tokens_per_frame = self.video_grid[0] * self.video_grid[1]
        """Tokens one video frame gives the pipeline, after ``video.pool_stride`` pooling."""
        # built last, and only when enabled: models without audio keep their modules, init and state dict
        self.audio: AudioEncoder | None = None
        self.audio_projector: nn.Module | None = None
        if cfg.audio.enabled:
            self.audio = AudioEncoder(cfg.audio.encoder, weights=cfg.audio.weights, pool_stride=cfg.audio.pool_stride)
            self.audio_projector = build_projector(cfg.projector.type, self.audio.width, self.llm.hidden_size)
        self.audio_processor = self.audio.processor if self.audio is not None else None
        """The collator's ``audio_processor`` (log-mel features, tokens per clip); None without audio."""
        self._graphs = GraphSlot()  # CapturedCalls of the vision tower and the pipeline (generate on CUDA)
        self._capturing: tuple[str, ...] = ()  # what replays from graphs, set by generate for one call
        self.loss_window: int | None = None
        """Supervise only each sequence's last ``loss_window`` tokens (the trainer's ``loss_window``: the
        windowed loss of pair-compressed layers); None: every labelled token. A run-time switch."""
        self.encoder_memory: EncoderMemory | None = None
        """Bounded stream memories of the video / audio encoders (:meth:`compress_all_encoders`); None:
        media are encoded whole, as always. A run-time switch, not part of the config or checkpoint."""
        self.apply_freeze(vision=cfg.vision.freeze if cfg.vision is not None else True, llm=cfg.llm.freeze)

    @property
    def processors(self) -> Processors:
        """What a collator or dataset needs of this model (``llava_deft.data.build_collator(model.processors)``)."""
        return Processors.of(self)

    # ------------------------------------------------------------------ training set-up
    def apply_freeze(self, vision: bool, llm: bool, audio: bool | None = None) -> None:
        """LLaVA stages: stage 1 freezes LLM (and encoders), stage 2 trains the LLM too. ``audio``
        (default: the config's ``audio.freeze``) freezes the audio encoder; projectors always train."""
        if self.vision is not None:
            self.vision.requires_grad_(not vision)
        self.llm.requires_grad_(not llm)
        if self.projector is not None:
            self.projector.requires_grad_(True)
        self.pipeline.requires_grad_(True)
        if self.audio is not None:
            self.audio.requires_grad_(not (self.config.audio.freeze if audio is None else audio))
            self.audio.encoder.embed_positions.requires_grad_(False)  # Whisper's sinusoidal positions stay fixed
            self.audio_projector.requires_grad_(True)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def projector_dtype(self) -> torch.dtype:
        return next((self.projector if self.projector is not None else self.llm).parameters()).dtype

    def _needs_vision(self, what: str) -> None:
        if self.vision is None:
            raise UnsupportedInputError(f"{what}: this model has no vision tower (its config says `vision: null`): "
                                        f"it takes text, passages and audio only; drop the <image> / <video> items")

    # ------------------------------------------------------------------ media path
    def encode_images(self, pixel_values: Tensor) -> TokenBatch:
        """pixels (M, 3, H, W) -> TokenBatch of projected patch tokens (M, gh*gw, D) on grid (1, gh, gw)."""
        self._needs_vision(f"{pixel_values.shape[0]} image(s)")
        pixels = pixel_values.to(self.projector_dtype())
        if "vision" in self._capturing:  # generate on CUDA: replayed from a CUDA graph per batch shape
            version = (self.needs_encoder_attention(), self._graph_version(self.vision, self.projector))
            tokens, attention = self._graphs.value["vision"](pixels, version=version)
        else:
            tokens, attention = self._image_tokens(pixels)
        gh, gw = self.vision.grid
        return TokenBatch.from_tokens(tokens, modality=Modality.IMAGE, layout=(1, gh, gw), encoder_attention=attention)

    def _image_tokens(self, pixels: Tensor) -> tuple[Tensor, Tensor | None]:
        feats, attention = self._vision(pixels)  # (M, N, Dv), (M, N) or None
        return self.projector(feats), attention  # (M, N, D)

    @staticmethod
    def _graph_version(*modules: nn.Module, settings: bool = False) -> tuple:
        """What a captured graph of ``modules`` depends on beyond its inputs' shapes: which modules, their
        mode, where their weights live and, with ``settings``, every submodule's plain attributes (a
        pipeline's ratios: ``set_retention`` changes them)."""
        parts = []
        for m in modules:
            params = list(m.parameters())
            part = [id(m), m.training, tuple(p.data_ptr() for p in params[:1] + params[-1:])]
            if settings:
                part.append(tuple(tuple((k, v) for k, v in vars(sub).items()
                                        if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None))))
                                  for sub in m.modules()))
            parts.append(tuple(part))
        return tuple(parts)

    @contextmanager
    def _captured(self, on: bool, pipeline: bool) -> Iterator[None]:
        """Inside the block (one ``generate`` call), on CUDA: the vision tower + projector and, with
        ``pipeline``, the reduction pipeline replay from CUDA graphs (:class:`~llava_deft.model.graphs.CapturedCall`,
        kept between calls)."""
        if not on:
            yield
            return
        if self._graphs.value is None:
            self._graphs.value = {"vision": CapturedCall(self._image_tokens, "the vision tower and projector"),
                                  "pipeline": CapturedCall(lambda batch: self.pipeline(batch), "the reduction pipeline",
                                                           max_graphs=32)}
        previous, self._capturing = self._capturing, ("vision", "pipeline") if pipeline else ("vision",)
        try:
            yield
        finally:
            self._capturing = previous

    def release_graphs(self) -> None:
        """Free the CUDA graphs ``generate`` captured (vision tower, pipeline, the LLM's static cache)."""
        self._graphs = GraphSlot()
        self.llm.release_static()

    def needs_encoder_attention(self) -> bool:
        """Whether a stage of the pipeline (``visionzip``) reads ``TokenBatch.encoder_attention``."""
        return any(getattr(s, "needs_encoder_attention", False) for s in self.pipeline.stages)

    def needs_query(self) -> bool:
        """Whether a stage of the pipeline (``fgcs`` with ``query_weight`` > 0) reads ``TokenBatch.query``."""
        return any(getattr(s, "needs_query", False) for s in self.pipeline.stages)

    def prompt_query(self, input_ids: Tensor, attention_mask: Tensor, text: Tensor,
                     labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Each sample's question for question-aware stages: ``(text.detach() (B, L, D), prompt mask (B, L))``.

        ``text`` are the LLM input embeddings of ``input_ids``. The mask keeps the real (attention mask),
        non-placeholder, non-special (bos / eos / pad ... ``tokenizer.all_special_ids``) tokens and, when
        ``labels`` are given (training), only those labelled ``IGNORE_INDEX`` that come before the sample's
        last labelled token: the answer the model learns is never part of the query, nor is the template's
        text after it, so a single-turn prompt gives the same query in training as in generation (the
        answers of earlier turns of a multi-turn conversation are left out in training, part of the
        prompt in generation). Detached: the reduction pipeline reads the embeddings, it does not train them.
        """
        special = {int(i) for i in self.tokenizer.all_special_ids} | {i for i in self.media_token_ids.values() if i >= 0}
        special_ids = device_ids(tuple(sorted(special)), input_ids.device, input_ids.dtype)
        keep = attention_mask.bool() & ~torch.isin(input_ids, special_ids)
        if labels is not None:
            answer = labels.to(input_ids.device) != IGNORE_INDEX  # (B, L)
            after = answer.flip(1).long().cumsum(1).flip(1) == 0  # (B, L): no labelled token here or later
            keep = keep & ~answer & ~(after & answer.any(1, keepdim=True))
        return text.detach(), keep

    def _vision(self, pixels: Tensor) -> tuple[Tensor, Tensor | None]:
        """The image tower's tokens, with the attention each received when the pipeline asks for it."""
        if self.needs_encoder_attention():
            return self.vision.forward_with_attention(pixels)
        return self.vision(pixels), None

    def encode_videos(self, video_values: Tensor, video_frames: Tensor) -> TokenBatch:
        """frames (F, 3, H, W) of V videos with ``video_frames (V,)`` frames each -> TokenBatch of V rows,
        modality VIDEO, layout (T_v, H', W'), tokens frame after frame (row-major grid in each frame).

        Every frame goes through the image encoder and projector in one call; ``pool_frame_tokens``
        pools each frame's grid (``video.pool_stride``); a scatter lays frames out per video, padded to
        the longest (mask False).

        After :meth:`compress_all_encoders`, each video is streamed instead (:meth:`_stream_videos`):
        ``chunk_frames`` frames at a time through the encoder, into a memory of ``video_tokens``.
        """
        self._needs_vision(f"{video_frames.shape[0]} video(s)")
        if self.encoder_memory is not None:
            return self._stream_videos(video_values, video_frames)
        feats, attention = self._vision(video_values.to(self.projector_dtype()))  # (F, N, Dv), (F, N) or None
        tokens = self.projector(feats)  # (F, N, D)
        tokens, (_, h, w) = pool_frame_tokens(tokens, self.vision.grid, self.config.video.pool_stride)  # (F, n, D)
        if attention is not None:  # pooled like the tokens: a window's mean attention
            attention = pool_frame_tokens(attention.unsqueeze(-1), self.vision.grid, self.config.video.pool_stride)[0][..., 0]
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
        video_attention = None
        if attention is not None:
            video_attention = attention.new_zeros(v, width)
            video_attention[rows, cols] = attention
        return TokenBatch.from_tokens(out, mask, modality=Modality.VIDEO, layout=layout, encoder_attention=video_attention)

    def encode_audios(self, audio_values: Tensor, audio_lengths: Tensor | None = None) -> TokenBatch:
        """log-mel ``audio_values (A, n_mels, frames)`` of A clips of ``audio_lengths (A,)`` waveform
        samples -> TokenBatch of A rows, modality AUDIO, layout (T_a, 1, 1).

        Every clip was padded to the encoder's chunk; a row keeps only its first
        ``T_a = audio_processor.num_tokens(S)`` tokens, those that cover the clip (all of the chunk when
        ``audio_lengths`` is None). Padding slots are zero, mask False. After :meth:`compress_all_encoders`
        each row's tokens are streamed through a memory of ``audio_tokens`` (:meth:`_stream_audios`).
        """
        if self.audio is None:
            raise ValueError("the batch has audio but this model has no audio encoder; set `audio: {enabled: true}` in its config")
        dtype = next(self.audio_projector.parameters()).dtype
        tokens = self.audio_projector(self.audio(audio_values.to(dtype)))  # (A, T, D)
        a, t_max, _ = tokens.shape
        dev = tokens.device
        if audio_lengths is None:
            lengths = torch.full((a,), t_max, dtype=torch.long, device=dev)
        else:
            lengths = self.audio_processor.num_tokens(audio_lengths.to(dev))  # (A,)
        if self.encoder_memory is not None:
            return self._stream_audios(tokens, lengths)
        width = int(lengths.max()) if a else 0
        mask = torch.arange(width, device=dev) < lengths.unsqueeze(1)  # (A, T')
        tokens = tokens[:, :width].masked_fill(~mask.unsqueeze(-1), 0.0)  # (A, T', D)
        layout = torch.stack([lengths, torch.ones_like(lengths), torch.ones_like(lengths)], 1)  # (A, 3)
        return TokenBatch.from_tokens(tokens, mask, modality=Modality.AUDIO, layout=layout)

    # ------------------------------------------------------------------ bounded encoder memories
    def compress_all_encoders(self, policy: str | None = "tova", video_tokens: int = 256, audio_tokens: int = 256,
                              chunk_frames: int = 4, chunk_seconds: float | None = None, *,
                              temperature: float = DEFAULT_TEMPERATURE, queries: str = "chunk",
                              **policy_options) -> "LlavaDeftForCausalLM":
        """Encode long videos and audio clips chunk by chunk into a BOUNDED token memory per stream,
        compressed by the KV-cache policy ``policy`` (``tova``, ``h2o``, ``snapkv``, ``streaming_llm``;
        its ``policy_options`` as in a pipeline's ``llm:`` list), so a stream of any length costs the
        pipeline and the LLM at most ``video_tokens`` / ``audio_tokens`` tokens
        (``llava_deft.encoders.stream.StreamMemory``). ``compress_all_encoders(None)`` switches it off
        (media are encoded whole again, exactly as before). Returns the model.

        Afterwards :meth:`encode_videos` runs each video's frames ``chunk_frames`` at a time through the
        image encoder + projector (+ ``video.pool_stride`` pooling), so the encoder's activations are
        bounded too, and streams each chunk's tokens into a memory of ``video_tokens``.
        :meth:`encode_audios` runs the audio encoder on the whole clip as before (a clip is at most one
        encoder chunk, ``audio.encoder.chunk_length`` s: the collator refuses longer ones, and the
        encoder takes only whole chunks) and streams its output tokens ``chunk_seconds`` at a time
        (default 1 s; ``audio_processor.num_tokens`` of that many samples) into a memory of ``audio_tokens``.

        Rows keep their whole stream's ``layout`` and carry the kept tokens' ORIGINAL positions as
        ``index`` (ascending), so the splice gives them their unreduced RoPE positions and the pipeline's
        stages see an already-reduced row; images and text passages are unchanged. ``temperature`` and
        ``queries`` set the attention a chunk pays the memory (see ``llava_deft.encoders.stream``). Not
        saved with the model. Bad arguments raise ``InvalidArgumentError`` naming the argument.
        """
        if policy is None:
            self.encoder_memory = None
            return self
        names = cache_policy_names()
        if not isinstance(policy, str) or policy not in names:
            raise InvalidArgumentError(f"compress_all_encoders: policy={policy!r} is not a KV-cache policy; "
                                       f"choose one of {names}, or None to switch the compression off")
        for name, value in (("video_tokens", video_tokens), ("audio_tokens", audio_tokens), ("chunk_frames", chunk_frames)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"compress_all_encoders: {name}={value!r}; give an integer >= 1")
        for name, value, allow_none in (("chunk_seconds", chunk_seconds, True), ("temperature", temperature, False)):
            if value is None and allow_none:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise InvalidArgumentError(f"compress_all_encoders: {name}={value!r}; give a finite number > 0"
                                           + (" (or None: 1 s)" if allow_none else ""))
        if queries not in ("chunk", "mean"):
            raise InvalidArgumentError(f"compress_all_encoders: queries={queries!r}; give 'chunk' or 'mean'")
        try:
            memory = EncoderMemory(policy, video_tokens, audio_tokens, chunk_frames, chunk_seconds, float(temperature),
                                   queries, dict(policy_options))
        except ValueError as err:
            raise InvalidArgumentError(f"compress_all_encoders: options of policy {policy!r}: {err}") from err
        self.encoder_memory = memory
        return self

    def _stream_videos(self, video_values: Tensor, video_frames: Tensor) -> TokenBatch:
        """:meth:`encode_videos` through the bounded memory: per video (streams are sequential), chunks of
        ``chunk_frames`` frames -> encoder, projector, pooling -> ``StreamMemory.add``; rows as
        ``stream_batch`` lays them out (layout ``(T_v, H', W')``, index = kept positions)."""
        mem = self.encoder_memory
        dtype = self.projector_dtype()
        frames = [int(f) for f in video_frames.tolist()]
        step = mem.chunk_frames
        results, start = [], 0
        for count in frames:
            memory = mem.memory("video")
            for first in range(start, start + count, step):
                feats = self.vision(video_values[first:min(first + step, start + count)].to(dtype))  # (c, N, Dv)
                tokens, _ = pool_frame_tokens(self.projector(feats), self.vision.grid, self.config.video.pool_stride)
                memory.add(tokens.flatten(0, 1))  # (c * H'W', D), frame after frame
            results.append(memory.result())
            start += count
        h, w = self.video_grid
        lay = torch.tensor([[f, h, w] for f in frames], dtype=torch.long).reshape(-1, 3)
        return stream_batch(results, lay, Modality.VIDEO)

    def _stream_audios(self, tokens: Tensor, lengths: Tensor) -> TokenBatch:
        """:meth:`encode_audios` through the bounded memory: clip ``a``'s first ``lengths[a]`` encoder
        tokens streamed ``chunk_seconds`` at a time into a memory of ``audio_tokens``."""
        mem = self.encoder_memory
        seconds = 1.0 if mem.chunk_seconds is None else mem.chunk_seconds
        step = int(self.audio_processor.num_tokens(max(1, round(seconds * self.audio_processor.sampling_rate))))
        counts = [int(n) for n in lengths.tolist()]
        results = [mem.memory("audio").feed(tokens[a, :n], step).result() for a, n in enumerate(counts)]
        lay = torch.tensor([[n, 1, 1] for n in counts], dtype=torch.long).reshape(-1, 3)
        return stream_batch(results, lay, Modality.AUDIO)

    def encode_texts(self, text_ids: Tensor, text_lengths: Tensor | None = None) -> TokenBatch:
        """Passages ``text_ids (P, L)`` (right-padded) of ``text_lengths (P,)`` tokens -> TokenBatch of P
        rows of the LLM's input embeddings, modality TEXT, layout (N_p, 1, 1). Padding slots are zero."""
        p, width = text_ids.shape
        dev = text_ids.device
        lengths = torch.full((p,), width, dtype=torch.long, device=dev) if text_lengths is None else text_lengths.to(dev)
        mask = torch.arange(width, device=dev) < lengths.unsqueeze(1)  # (P, L)
        tokens = self.llm.embed(text_ids).masked_fill(~mask.unsqueeze(-1), 0.0)  # (P, L, D)
        layout = torch.stack([lengths, torch.ones_like(lengths), torch.ones_like(lengths)], 1)  # (P, 3)
        return TokenBatch.from_tokens(tokens, mask, modality=Modality.TEXT, layout=layout)

    def blank_image(self) -> TokenBatch | None:
        """One blank image, for batches without images or videos (see ``_media``); None without a tower."""
        if self.vision is None:
            return None
        h, w = self.vision.image_size
        return self.encode_images(torch.zeros(1, 3, h, w, device=self.device, dtype=self.projector_dtype()))

    def blank_audio(self) -> TokenBatch:
        """One silent chunk through the audio encoder, for batches without audio (see ``_media``)."""
        feats = torch.zeros(1, self.audio.num_mel_bins, self.audio.num_frames, device=self.device)
        return self.encode_audios(feats)

    def _blanks(self, rows: dict[str, TokenBatch]) -> list[TokenBatch]:
        """The blank inputs of the encoders that get no input in this batch (see :meth:`_media`), encoded."""
        busy = {MODALITIES[k].encoder for k in rows}
        return [b for kind in MODALITIES.values() if kind.encoder not in busy and (b := kind.blank(self)) is not None]

    def _media(self, input_ids: Tensor, attention_mask: Tensor, rows: dict[str, TokenBatch],
               query: tuple[Tensor, Tensor] | None = None, idle: list[TokenBatch] | None = None):
        """Reduce every media row of the batch (``rows``: kind -> its rows, in sample order) in one
        pipeline call. Returns (reduced rows or None, zero-weight term or None, losses, stats).

        Rows are gathered into placeholder order (sample order, then position in the prompt), whatever
        their kind: a placeholder's row is ``offset[kind] + its rank among placeholders of its kind``
        (one-hot cumsum), the blocks being stacked in ``MODALITIES`` order. ``query``: the per-sample
        ``(embeddings (B, L, D), mask (B, L))`` of :meth:`prompt_query`, when a stage needs it; each
        row gets its own placeholder's sample's (``(P, L, D)``, ``(P, L)``).

        An encoder that gets no input in this batch still runs once on a blank input that enters the
        graph with weight 0 (a blank image when there is no image nor video; silence when audio is
        enabled and there is no clip; with no row at all, the blank image also goes through the
        pipeline): every rank then runs the same modules, which ZeRO-3 needs (a rank skipping the
        encoder while another gathers its parameters hangs). ``idle``: those blanks (:meth:`_blanks`)
        when the caller encoded them already. ZeRO-3 also needs the same ORDER on every rank: encoders
        (real or blank), then the pipeline (rows or the blank image), whatever the batch holds.
        """
        if idle is None:
            idle = self._blanks(rows)
        if not rows:  # the blank image also goes through the pipeline (with an empty query when one is needed:
            # the query stages still run their projections, so every rank runs the same modules)
            idle = [self.pipeline(self._no_query(b) if query is not None else b) if b.modality[0] == Modality.IMAGE
                    else b for b in idle]
            if self.vision is None and any(True for _ in self.pipeline.parameters()):
                # a text-only model has no blank image: one zero TEXT token goes through the pipeline instead
                blank = TokenBatch.from_tokens(self.llm.embed(input_ids[:1, :1]) * 0.0, modality=Modality.TEXT)
                idle.append(self.pipeline(self._no_query(blank) if query is not None else blank))
        zero = sum(t.sum() for b in idle for t in [b.tokens, *b.losses.values()]) * 0.0 if idle else None
        if not rows:
            return None, zero, {}, {}
        kinds = [k for k in MODALITIES if k in rows]
        batch = rows[kinds[0]] if len(kinds) == 1 else TokenBatch.cat_rows([rows[k] for k in kinds])
        kind_ids = device_ids(tuple(self.media_token_ids[k] for k in kinds), input_ids.device)  # (K,)
        ph = (input_ids.unsqueeze(-1) == kind_ids).any(-1) & attention_mask.bool()  # (B, L)
        # the P placeholders in row-major order; P = the media rows (_check_counts made sure), so the size is
        # known on the host and nothing waits for the device
        flat = torch.nonzero_static(ph.flatten(), size=batch.tokens.shape[0])[:, 0]  # (P,)
        kind = (input_ids.flatten()[flat].unsqueeze(-1) == kind_ids).long().argmax(-1)  # (P,)
        onehot = F.one_hot(kind, len(kinds))  # (P, K)
        order = (onehot.cumsum(0) * onehot).sum(1) - 1  # (P,) rank among placeholders of its kind
        offset = 0
        for j, k in enumerate(kinds):  # + the rows of the kinds stacked before it (host counts, no copy)
            if offset:
                order = order + onehot[:, j] * offset
            offset += rows[k].tokens.shape[0]
        batch = batch.take_rows(order.to(batch.tokens.device))
        if query is not None:
            sample = flat // ph.shape[1]  # (P,) the sample of each placeholder, i.e. of each pipeline row
            text, keep = query
            batch = batch.with_query(text[sample].to(batch.tokens.device), keep[sample].to(batch.tokens.device))
        if "pipeline" in self._capturing:
            out = self._graphs.value["pipeline"](batch, version=self._graph_version(self.pipeline, settings=True))
        else:
            out = self.pipeline(batch)
        return out, zero, out.losses, out.stats

    @staticmethod
    def _no_query(batch: TokenBatch) -> TokenBatch:
        """``batch`` with an empty query (one zero token per row, masked out): the query term is 0."""
        b, _, d = batch.tokens.shape
        return batch.with_query(batch.tokens.new_zeros(b, 1, d), torch.zeros(b, 1, dtype=torch.bool, device=batch.tokens.device))

    def _check_counts(self, input_ids: Tensor, attention_mask: Tensor, media: dict, n_items: dict[str, int], ids=None):
        """Per sample and kind, placeholders == media (``media[kind.counts_key]`` items per sample,
        ``n_items[kind]`` in the batch). Every kind is checked on the device and read back in one transfer
        (each read waits for the queued kernels); the first mismatch, in kind then sample order, is raised."""
        am = attention_mask.bool()
        found, given = [], []
        for key, kind in MODALITIES.items():
            per_sample = ((input_ids == self.media_token_ids[key]) & am).sum(1)  # (B,)
            counts = media.get(kind.counts_key)
            found.append(per_sample)
            given.append(per_sample.new_zeros(per_sample.shape) if counts is None else counts.to(per_sample))
        found_t, given_t = torch.stack(found), torch.stack(given)  # (K, B)
        if not found_t.numel():
            return
        table = torch.cat([found_t, given_t, given_t.sum(1, keepdim=True)], dim=1).tolist()  # one read
        b = found_t.shape[1]
        for (key, kind), row in zip(MODALITIES.items(), table):
            per_sample, counts, total = row[:b], row[b:2 * b], row[2 * b]
            placeholder = kind.placeholder
            bad = [i for i in range(b) if per_sample[i] != counts[i]]
            if bad:
                i = bad[0]
                name = ids[i] if ids is not None else f"#{i} of the batch"
                raise MediaCountMismatchError(str(name), placeholder, per_sample[i], counts[i])
            if total != n_items[key]:
                raise MediaCountMismatchError("<batch>", placeholder, total, n_items[key])

    def prepare_inputs(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None,
                       padding_side: str = "right", ids: list[str] | None = None, **media):
        """Check counts, encode and reduce every media item, splice into the prompt's embeddings.

        Media arguments are the collator's outputs (``llava_deft.modality.MEDIA_INPUTS``: images as
        ``pixel_values`` / ``media_counts``, then ``video_*``, ``audio_*``, ``text_*``); ``audio_lengths``
        and ``text_lengths`` may be None (every clip fills its chunk, every passage its row). When a stage
        declares ``needs_query`` (``fgcs`` with ``query_weight`` > 0), each pipeline row carries its
        sample's prompt embeddings as ``TokenBatch.query`` (:meth:`prompt_query`; ``labels`` keep the
        answer out of it).
        """
        unknown = sorted(set(media) - set(MEDIA_INPUTS))
        if unknown:
            raise TypeError(f"prepare_inputs got unknown media inputs {unknown}; expected some of {list(MEDIA_INPUTS)}")
        n_items = {}
        for key, kind in MODALITIES.items():
            kind.validate(media)
            n_items[key] = kind.num_items(media)
        with record_function("llava_deft.check_counts"):
            self._check_counts(input_ids, attention_mask, media, n_items, ids)
        with record_function("llava_deft.encode"):
            rows = {key: kind.encode(self, media) for key, kind in MODALITIES.items() if n_items[key]}
            idle = self._blanks(rows)
        query = None
        if self.needs_query():
            # the pipeline reads the prompt's embeddings: every rank runs encoders (real or blank), the
            # embedding, then the pipeline (on rows or the blank image), so ZeRO-3 gathers in one order
            text = self.llm.embed(input_ids)
            query = self.prompt_query(input_ids, attention_mask, text, labels)
        with record_function("llava_deft.media"):  # placeholder order, then the reduction pipeline
            media, zero, losses, stats = self._media(input_ids, attention_mask, rows, query, idle)
        if query is None:  # no query stage: encoders, pipeline, then the embedding, as always
            text = self.llm.embed(input_ids)
        if zero is not None:
            text = text + zero.to(text.dtype)
        if media is None:  # no media rows: an empty (0, 1, D) batch keeps one splice path
            media = TokenBatch.empty(text.shape[-1], dtype=text.dtype, device=text.device)
        kind_ids = device_ids(tuple(self.media_token_ids.values()), input_ids.device)
        is_placeholder = (input_ids.unsqueeze(-1) == kind_ids).any(-1)  # (B, L)
        with record_function("llava_deft.splice"):
            spliced = splice_media(
                input_ids, attention_mask, text, is_placeholder,
                media.tokens, media.mask, media.index, media.layout.prod(1), labels, padding_side,
                media_modality=media.modality, media_sizes=media.sizes,
            )
        return spliced, losses, stats

    def load_video(self, path):
        """Read a clip the way this model's config samples frames (``video.num_frames/fps/max_frames``)."""
        return MODALITIES["video"].load(path, media_options(self.config))

    def load_audio(self, path) -> Tensor:
        """Read an audio file as the ``(S,)`` mono waveform at this model's audio rate (``AudioError`` naming it)."""
        return MODALITIES["audio"].load(path, media_options(self.config))

    # ------------------------------------------------------------------ forward / loss
    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None,
                ids: list[str] | None = None, **media) -> LlavaDeftOutput:
        """A collator batch -> loss (LM loss + the pipeline's auxiliary losses) and logits; ``media``
        holds its image / video / audio / text tensors (``MEDIA_INPUTS``), other keys are ignored."""
        sp, aux, stats = self.prepare_inputs(input_ids, attention_mask, labels, ids=ids, **_media_inputs(media))
        runner = self.llm.bind_stages(self.pipeline.llm)  # None without LLM stages
        logits, _ = self.llm(sp.embeds, sp.attention_mask, sp.position_ids, stages=runner or self.pipeline.llm,
                             token_kinds=sp.kinds, token_sizes=sp.sizes)
        aux = {**aux, **collect_losses(self.pipeline.llm)}  # LLM stages' auxiliary losses (recursive_compression_llm)
        loss = lm_loss = None
        if sp.labels is not None and self.loss_window is not None:
            sp.labels = window_labels(sp.labels, sp.attention_mask, self.loss_window)
        if sp.labels is not None:
            if runner is not None and runner.present is not None:  # a column an LLM stage dropped or merged
                # away has no logits: the token after it is not predicted (never a loss on zero logits)
                sp.labels = sp.labels.clone()
                sp.labels[:, 1:] = sp.labels[:, 1:].masked_fill(~runner.present[:, :-1], IGNORE_INDEX)
            # predict token t+1 from t; loss in fp32
            lm_loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), sp.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )
            loss = lm_loss + sum(aux.values(), torch.zeros((), device=lm_loss.device))
        mask = sp.attention_mask
        llm_tokens = torch.stack([mask.sum(), torch.full((), mask.numel(), device=mask.device)]).long()
        return LlavaDeftOutput(loss, logits, lm_loss, aux, stats, llm_tokens)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        max_new_tokens: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        ids: list[str] | None = None,
        return_media_tokens: bool = False,
        streamer=None,
        return_info: bool = False,
        cuda_graph: bool | None = None,
        compile: bool | str = False,
        **media,
    ) -> Tensor | tuple:
        """Left-padded prompts (with images, videos, audio clips and/or text passages, as the collator
        gives them) -> new token ids (B, T), padded with the pad id after EOS.

        With ``return_media_tokens`` also the number of media tokens each prompt gave the LLM (B,)
        (passage tokens included); with ``return_info`` also a :class:`GenerationInfo` (the pipeline's
        per-stage statistics and, per prompt and media item, the kept token indices), last.
        ``streamer`` (transformers' ``put`` / ``end`` protocol, batch size 1) gets each new token as it
        comes. Stages of the pipeline's ``llm:`` list (FastV, TOVA, H2O, SnapKV, StreamingLLM) run in the
        prefill and at every decoding step. ``cuda_graph`` (None: wherever it applies; False: never, the
        eager path): on CUDA the vision tower + projector and the reduction pipeline (per input shape; not
        with ``return_info``, whose trace needs eager calls), and, without LLM stages, the LLM's prefill
        (per prompt length) and decoding step replay from CUDA graphs captured at their second call and
        kept for later calls (``release_graphs()`` frees them); with cache policies, their steady decoding
        steps. A part that cannot be captured is logged and runs eagerly. ``compile``: the LLM's prefill and
        decoding step also go through ``torch.compile`` (see ``generate_from_embeds``; the first call of a
        batch size compiles). ``max_new_tokens`` must be >= 1 and fit the LLM's context after the prompt
        (``ContextLengthError`` names both numbers); ``config.max_length`` bounds the prompt alone (the
        collator refuses longer samples).
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens={max_new_tokens!r}: give an integer >= 1")
        capture = cuda_graph is not False and input_ids.device.type == "cuda" and self.encoder_memory is None
        with self._trace_pipeline() if return_info else nullcontext([]) as trace, \
                self._captured(capture, pipeline=not return_info):  # the trace's hooks run only in eager calls
            sp, _, stats = self.prepare_inputs(input_ids, attention_mask, padding_side="left", ids=ids, **_media_inputs(media))
        llm_stages = self.pipeline.llm if len(self.pipeline.llm) else None
        with record_function("llava_deft.llm_generate"):
            out, cache = generate_from_embeds(
                self.llm, sp.embeds, sp.attention_mask, sp.position_ids,
                max_new_tokens=max_new_tokens,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                streamer=streamer, stages=llm_stages, token_kinds=sp.kinds, token_sizes=sp.sizes, return_cache=True,
                cuda_graph=cuda_graph,
                compile=compile,
            )
        result = (out, sp.media_positions.sum(1)) if return_media_tokens else (out,)
        if return_info:
            spans = (sp.position_ids.max(1).values + 1).tolist()  # (B,) positions each prompt spans
            info = GenerationInfo(read_stats(stats), self._media_reductions(input_ids, attention_mask, trace), spans,
                                  sp.attention_mask.sum(1).tolist())
            if llm_stages is not None:
                info.cache = cache.stats()
                info.llm_stats = {s.stage_name: {k: v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
                                                 for k, v in (getattr(s, "stats", None) or getattr(s, "last_stats", None)
                                                              or {}).items()}
                                  for s in llm_stages}
            result = (*result, info)
        return result if len(result) > 1 else out

    @contextmanager
    def _trace_pipeline(self) -> Iterator[list[tuple[str, TokenBatch]]]:
        """Record ``(name, output)`` of the pipeline's input (``"input"``) and of each of its stages
        while the block runs (forward hooks; the modules are untouched and the hooks removed after)."""
        trace: list[tuple[str, TokenBatch]] = []
        handles = [self.pipeline.register_forward_pre_hook(lambda _m, args: trace.append(("input", args[0])))]
        for stage in self.pipeline.stages:
            handles.append(stage.register_forward_hook(lambda m, _a, out: trace.append((m.stage_name, out))))
        try:
            yield trace
        finally:
            for h in handles:
                h.remove()

    def _media_reductions(self, input_ids: Tensor, attention_mask: Tensor,
                          trace: list[tuple[str, TokenBatch]]) -> list[list[MediaReduction]]:
        """Per prompt, a :class:`MediaReduction` per placeholder, from a ``_trace_pipeline`` record of one
        ``prepare_inputs``: the pipeline's rows are the placeholders in row-major order (see ``_media``)."""
        by_id = {token_id: kind for kind, token_id in self.media_token_ids.items() if token_id >= 0}
        ids = input_ids.cpu()
        ph = torch.isin(ids, torch.tensor(list(by_id))) & attention_mask.bool().cpu()  # (B, L)
        places = ph.nonzero().tolist()  # [(sample, position)] in the pipeline's row order
        out: list[list[MediaReduction]] = [[] for _ in range(ids.shape[0])]
        if not places:  # the pipeline ran on a blank image only (see ``_media``)
            return out
        start = max(i for i, (name, _) in enumerate(trace) if name == "input")
        calls = trace[start:]
        layout = calls[0][1].layout.cpu()

        def kept(batch: TokenBatch) -> list[list[int]]:
            index, mask = batch.index.cpu(), batch.mask.cpu()
            return [index[r][mask[r]].tolist() for r in range(index.shape[0])]

        per_stage = [(name, kept(b)) for name, b in calls[1:]]
        final = per_stage[-1][1] if per_stage else kept(calls[0][1])
        for r, (b, pos) in enumerate(places):
            kind = by_id[int(ids[b, pos])]
            item = sum(m.kind == kind for m in out[b])
            grid = tuple(int(x) for x in layout[r])
            out[b].append(MediaReduction(kind, item, grid, math.prod(grid), final[r],
                                         [(name, rows[r]) for name, rows in per_stage]))
        return out

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write config.json + model.safetensors + tokenizer/ (encoder weights live in the safetensors)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = self.config.model_dump()
        if cfg["vision"] is not None:
            cfg["vision"]["weights"] = None
        cfg["audio"]["weights"] = None  # the encoder's weights are in model.safetensors
        if cfg["vision"] is not None and cfg["vision"]["backend"] == "hf_clip":  # the tower's config, not its folder
            cfg["vision"].update(path=None, kwargs=clip_vision_kwargs(self.vision.model.config),
                                 image_processor=self.vision.image_settings)
        cfg["llm"] = {**cfg["llm"], "path": None, "config": self.llm.config.to_diff_dict()}
        cfg["llm"]["config"]["model_type"] = self.llm.config.model_type
        cfg["llm"]["config"]["vocab_size"] = self.llm.config.vocab_size  # to_diff_dict drops a default-valued one
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
        """Load a directory written by :meth:`save_pretrained` (or a training export), or one written
        by transformers' ``LlavaForConditionalGeneration.save_pretrained`` (``config.json`` with
        ``model_type: llava``; see ``llava_deft.model.hf_llava.load_hf_llava``).

        ``pipeline`` replaces the saved reduction pipeline (e.g. a training-free sweep); weights of
        stages that exist in the checkpoint are loaded, new stages keep their init.
        """
        path = Path(path)
        cfg = read_config_json(path)
        if is_hf_llava_config(cfg):
            return load_hf_llava(path, pipeline, model_class=cls, **overrides)
        if not (path / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"checkpoint '{path}' has no {WEIGHTS_NAME}")
        cfg["tokenizer"] = str(path / TOKENIZER_DIR)
        if pipeline is not None:
            cfg["pipeline"] = pipeline
            for key in ("use_deft", *DEFT_KEYS):  # the given pipeline replaces the DeFT switches too
                cfg.pop(key, None)
        for k, v in overrides.items():
            cfg[k] = v
        model = cls(cfg)
        state = read_safetensors(path / WEIGHTS_NAME, "model")
        own = model.state_dict()
        if pipeline is not None:  # stages may differ from the checkpoint's
            state = {k: v for k, v in state.items() if not k.startswith("pipeline.") or (k in own and own[k].shape == v.shape)}
        load_state(model, state, path, may_miss=("pipeline.",) if pipeline is not None else ())
        return model


def create_model_and_processors(config: ModelConfig | dict | str | Path | None = None, tokenizer=None):
    """``(LlavaDeftForCausalLM, Processors)`` from a model config (YAML path, dict, validated config, or
    None for the tiny default), as ``open_clip.create_model_and_transforms`` does. A saved model:
    ``LlavaDeftForCausalLM.from_pretrained(path)`` and its ``.processors``."""
    model = LlavaDeftForCausalLM(config, tokenizer=tokenizer)
    return model, model.processors

