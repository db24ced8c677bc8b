"""The one list of modalities: every place that handles images, videos, audio or text passages reads it.

A :class:`MediaKind` says, for one modality, everything the rest of the package needs to know:

- ``key``, ``placeholder`` (its one-token placeholder in prompts), ``record_key`` (the key of a LLaVA
  JSON record that names its files or carries its content), ``sample_key`` (a sample dict's list of
  items), ``row`` (the :class:`pipeline.Modality` of its TokenBatch rows), ``encoder`` (which encoder
  gives its tokens: ``vision``, ``audio`` or ``llm``);
- how an item is read (:meth:`MediaKind.load`: a file, or what a user passed to the API), checked and
  counted in tokens per sample (:meth:`~MediaKind.prepare`, :meth:`~MediaKind.num_tokens`,
  :meth:`~MediaKind.describe`), and stacked by the collator (:meth:`~MediaKind.stack`: its batch keys);
- how the model encodes the stacked batch (:meth:`~MediaKind.encode`) and the blank input an idle
  encoder runs on so every rank runs the same modules under ZeRO-3 (:meth:`~MediaKind.blank`).

``MODALITIES`` is ordered: that is the order of placeholders prepended by the inference API and of
pipeline row blocks before the gather into placeholder order. Adding a modality is one subclass here
plus its encoder.

The collator and model are passed in (duck-typed: ``ctx`` is a ``MultimodalCollator``, ``model`` a
``LlavaDeftForCausalLM``), so this module imports no model or data code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline import Modality, TokenBatch

from .config.model import LimitsConfig
from .encoders.audio import SAMPLING_RATE, load_audio
from .encoders.video import VideoClip, frames_to_pixels, load_video
from .errors import AudioError, MediaFileError, MediaLimitError, SampleTooLongError, UnsupportedInputError, VideoError


@dataclass(frozen=True)
class MediaOptions:
    """How files are read: a video's frame sampling (``VideoConfig.sampling()``), the audio rate, and
    what a file may hold (``limits``: the model config's ``limits:``, checked before decoding)."""

    num_frames: int = 8
    fps: float | None = None
    max_frames: int | None = None
    sampling_rate: int = SAMPLING_RATE
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def video_sampling(self) -> dict[str, Any]:
        return {"num_frames": self.num_frames, "fps": self.fps, "max_frames": self.max_frames}


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""PIL modes of one high-bit-depth channel: 16-bit grayscale PNG / TIFF open as ``I;16`` (older PIL:
``I``), which ``convert("RGB")`` clips to 255 (white) instead of scaling."""


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB. 16-bit grayscale is scaled to 8 bits (``value >> 8``: 32768 -> 128) before
    the conversion; 16-bit RGB(A) PNGs already open as 8-bit ``RGB`` / ``RGBA``."""
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(img), 0, 65535).astype(np.uint16)  # (H, W)
        img = Image.fromarray((values >> 8).astype(np.uint8))
    return img.convert("RGB")


def load_rgb(path: Path, max_pixels: int | None = None) -> Image.Image:
    """Decode an image file fully (so decoding errors surface here) as RGB (``to_rgb``).

    With ``max_pixels``, the size is read from the header first (``Image.open`` decodes nothing) and
    an image of more pixels raises ``MediaLimitError`` naming the file and ``limits.max_image_pixels``;
    so does one PIL itself refuses as a decompression bomb.
    """
    raise_it = "; raise limits.max_image_pixels in the model config if you trust the file, or downscale it"
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as err:
        raise MediaLimitError(path, (
            f"PIL refuses it as a possible decompression bomb ({err}); if you trust the file, raise "
            f"PIL.Image.MAX_IMAGE_PIXELS in your program and limits.max_image_pixels in the model config, "
            f"or downscale it"), "image file") from err
    with img:
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise MediaLimitError(path, (
                f"{img.width} x {img.height} = {img.width * img.height:,} pixels is over "
                f"limits.max_image_pixels = {max_pixels:,}{raise_it}"), "image file")
        return to_rgb(img)


class MediaKind(ABC):
    """One modality: what it is called where (the fields below) and how its items are read, collated
    and encoded (the methods, overridden per kind)."""

    def __init__(self, key: str, placeholder: str, sample_key: str, row: Modality, encoder: str, noun: str,
                 counts_key: str, inputs: tuple[str, ...], from_files: bool = True):
        self.key, self.placeholder, self.sample_key, self.row = key, placeholder, sample_key, row
        self.record_key = key
        """The key of a LLaVA JSON record that names this kind's files (or carries its content)."""
        self.encoder, self.noun, self.from_files = encoder, noun, from_files
        self.counts_key = counts_key
        """Collator output: items per sample ``(B,)`` long."""
        self.inputs = inputs
        """Collator outputs the model reads for this kind (``counts_key`` aside), values first."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key!r}, {self.placeholder!r})"

    # ---------------------------------------------------------------- reading
    @abstractmethod
    def load(self, item: Any, opts: MediaOptions, where: str = "") -> Any:
        """What the API or a record gives (a file path, an object, a passage) -> the item a sample
        holds. ``where`` ends error messages (e.g. ``(sample 'x' of train.json)``)."""

    # ---------------------------------------------------------------- collator
    def prepare(self, ctx, items: list, sample: dict, sample_id: str) -> list:
        """Check one sample's items of this kind; returns what ``num_tokens`` and ``stack`` use."""
        return list(items)

    @abstractmethod
    def num_tokens(self, ctx, prepared: list) -> list[int]:
        """Tokens each item gives the LLM before reduction."""

    def describe(self, ctx, prepared: list) -> str:
        """This kind's part of a too-long sample's message, e.g. ``its 1 image(s) become 16 tokens each``."""
        return f"its {len(prepared)} {self.noun}(s) {sum(self.num_tokens(ctx, prepared))} tokens"

    @abstractmethod
    def stack(self, ctx, samples: list[dict], prepared: list[list]) -> dict[str, Any]:
        """The batch keys of this kind from every sample's prepared items (``counts_key`` included)."""

    # ---------------------------------------------------------------- model
    def num_items(self, batch: dict[str, Any]) -> int:
        """How many items of this kind a collator batch holds."""
        values = batch.get(self.inputs[0])
        return 0 if values is None else int(values.shape[0])

    def validate(self, batch: dict[str, Any]) -> None:
        """Raise ``ValueError`` when this kind's batch tensors do not fit each other."""

    @abstractmethod
    def encode(self, model, batch: dict[str, Any]) -> TokenBatch:
        """This kind's rows of a collator batch, through the model's encoder (``model.encode_images`` ...)."""

    def blank(self, model) -> TokenBatch | None:
        """A blank input through this kind's encoder (None: the kind has no encoder of its own to keep busy)."""
        return None


def pad_sequences(
    seqs: Sequence[Sequence[int]], pad_value: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ragged id lists into ``(B, L)`` long tensors on ``side``; returns (values, mask).

    Filled with one boolean-mask assignment: the mask's True cells, in row-major order, are exactly
    the concatenated sequences.
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)  # (B,)
    width = int(lengths.max()) if len(seqs) else 0
    positions = torch.arange(width).unsqueeze(0)  # (1, L)
    if side == "right":
        mask = positions < lengths.unsqueeze(1)  # (B, L)
    else:
        mask = positions >= (width - lengths).unsqueeze(1)  # (B, L)
    values = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    flat = [t for s in seqs for t in s]
    values[mask] = torch.tensor(flat, dtype=torch.long)
    return values, mask.long()


def _counts(samples: list[dict], key: str) -> torch.Tensor:
    return torch.tensor([len(s.get(key) or []) for s in samples], dtype=torch.long)


class FileKind(MediaKind):
    """A kind whose items are files (read relative to a media folder) or in-memory objects."""

    def load(self, item: Any, opts: MediaOptions, where: str = "") -> Any:
        if not isinstance(item, (str, Path)):
            return self.from_object(item)
        return self.read(Path(item), opts, where)

    def from_object(self, item: Any) -> Any:
        """An in-memory item (a PIL image, frames, a waveform) as a sample holds it."""
        return item

    @abstractmethod
    def read(self, path: Path, opts: MediaOptions, where: str) -> Any:
        """Read the file ``path`` the way ``opts`` says (limits checked before decoding)."""


class ImageKind(FileKind):
    def from_object(self, item):
        if not isinstance(item, Image.Image):
            raise TypeError(f"an image must be a path or a PIL image, got {type(item).__name__}")
        return to_rgb(item)

    def read(self, path, opts, where):
        suffix = f" {where}" if where else ""
        if not path.is_file():
            raise MediaFileError(f"image '{path}'{suffix} does not exist")
        if path.stat().st_size == 0:
            raise MediaFileError(f"image '{path}'{suffix} is empty (0 bytes)")
        try:
            return load_rgb(path, opts.limits.max_image_pixels)
        except MediaLimitError as err:
            if not where:
                raise
            raise err.located(where) from err
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise MediaFileError(f"image '{path}'{suffix} cannot be decoded: {err}") from err

    def prepare(self, ctx, items, sample, sample_id):
        _needs_vision(ctx, items, sample_id, "image")
        return ctx.pixels(sample)

    def num_tokens(self, ctx, prepared):
        return [ctx.media_tokens_per_image] * len(prepared)

    def describe(self, ctx, prepared):
        return f"its {len(prepared)} image(s) become {ctx.media_tokens_per_image} tokens each"

    def stack(self, ctx, samples, prepared):
        pixels = [p for per in prepared for p in per]
        # stack copies: the batch never aliases the collator's image cache
        return {"pixel_values": torch.stack(pixels).float() if pixels else None,
                self.counts_key: _counts(samples, self.sample_key)}

    def encode(self, model, batch):
        return model.encode_images(batch["pixel_values"])

    def blank(self, model):
        return model.blank_image()


def _needs_vision(ctx, items, sample_id, what: str) -> None:
    if items and ctx.image_transform is None:
        raise UnsupportedInputError(f"sample {sample_id!r} holds {len(items)} {what}(s), but this model has no vision "
                                    f"tower (its config says `vision: null`): it takes text, passages and audio only")


def video_frames(video: VideoClip | torch.Tensor) -> torch.Tensor:
    """The ``(T, H, W, 3)`` uint8 frames of a sample's video (a ``VideoClip`` or the tensor itself)."""
    return video.frames if isinstance(video, VideoClip) else video


class VideoKind(FileKind):
    """Items: ``VideoClip``s (files read with the model's frame sampling) or ``(T, H, W, 3)`` uint8 frames."""

    def read(self, path, opts, where):
        if not path.is_file():
            raise MediaFileError(f"video '{path}'" + (f" {where}" if where else "") + " does not exist")
        try:
            return load_video(path, **opts.video_sampling(), max_seconds=opts.limits.max_video_seconds,
                              max_frame_pixels=opts.limits.max_video_frame_pixels)
        except (VideoError, MediaLimitError) as err:
            if not where:
                raise
            raise err.located(where) from err

    def prepare(self, ctx, items, sample, sample_id):
        _needs_vision(ctx, items, sample_id, "video")
        return [video_frames(v) for v in items]

    def num_tokens(self, ctx, prepared):
        return [f.shape[0] * ctx.media_tokens_per_frame for f in prepared]

    def describe(self, ctx, prepared):
        frames = sum(f.shape[0] for f in prepared)
        return f"its {len(prepared)} video(s) ({frames} frames) {ctx.media_tokens_per_frame} tokens per frame"

    def stack(self, ctx, samples, prepared):
        videos = [frames_to_pixels(f, ctx.image_transform) for per in prepared for f in per]
        return {"video_values": torch.cat(videos).float() if videos else None,  # (F, 3, H, W)
                "video_frames": torch.tensor([v.shape[0] for v in videos], dtype=torch.long),
                self.counts_key: _counts(samples, self.sample_key)}

    def num_items(self, batch):
        frames = batch.get("video_frames")
        return 0 if frames is None else int(frames.shape[0])  # videos (video_values holds their frames)

    def validate(self, batch):
        values, frames = batch.get("video_values"), batch.get("video_frames")
        n_frames = 0 if values is None else int(values.shape[0])
        if values is None and (frames is None or not frames.numel()):
            return  # no video: nothing to read from the device
        if n_frames != (0 if frames is None else int(frames.sum())) or (frames is not None and bool((frames < 1).any())):
            raise ValueError(
                f"video_values has {n_frames} frames but video_frames {None if frames is None else frames.tolist()} "
                f"sums to another number (or has a video without frames); pass the collator's output unchanged"
            )

    def encode(self, model, batch):
        return model.encode_videos(batch["video_values"], batch["video_frames"])


class AudioKind(FileKind):
    """Items: ``(S,)`` mono waveforms at the model's rate (files resampled on reading)."""

    def from_object(self, item):
        return torch.as_tensor(item)

    def read(self, path, opts, where):
        if where and not path.is_file():
            raise MediaFileError(f"audio '{path}' {where} does not exist")
        try:
            return load_audio(path, opts.sampling_rate, max_seconds=opts.limits.max_audio_seconds)
        except (AudioError, MediaLimitError) as err:
            if not where:
                raise
            raise err.located(where) from err

    def prepare(self, ctx, items, sample, sample_id):
        if items and ctx.audio_processor is None:
            raise ValueError(
                f"sample {sample_id!r} has {len(items)} audio clip(s) but the collator has no audio_processor; "
                f"enable `audio:` in the model config and pass audio_processor=model.audio_processor"
            )
        waves = []
        for j, wave in enumerate(items):
            wave = torch.as_tensor(wave)
            if wave.ndim != 1 or wave.shape[0] == 0 or not bool(torch.isfinite(wave).all()):
                raise ValueError(
                    f"sample {sample_id!r}: audio clip {j} must be a non-empty, finite mono waveform (S,), got "
                    f"shape {tuple(wave.shape)}; load files with llava_deft.encoders.audio.load_audio"
                )
            if wave.shape[0] > ctx.audio_processor.max_samples:
                rate = ctx.audio_processor.sampling_rate
                raise SampleTooLongError(
                    f"sample {sample_id!r}: audio clip {j} is {wave.shape[0] / rate:.2f} s, longer than the audio "
                    f"encoder's {ctx.audio_processor.max_samples / rate:g} s chunk; clips are refused, never cut "
                    f"(raise audio.encoder.chunk_length or drop the sample)"
                )
            waves.append(wave.to(torch.float32))
        return waves

    def num_tokens(self, ctx, prepared):
        return [ctx.audio_processor.num_tokens(len(w)) for w in prepared]

    def stack(self, ctx, samples, prepared):
        waves = [w for per in prepared for w in per]
        names = [f"audio clip {j} of sample {str(s['id'])!r}" for s, per in zip(samples, prepared) for j in range(len(per))]
        return {"audio_values": ctx.audio_processor.features(waves, names) if waves else None,  # (A, n_mels, frames)
                "audio_lengths": torch.tensor([w.shape[0] for w in waves], dtype=torch.long),
                self.counts_key: _counts(samples, self.sample_key)}

    def validate(self, batch):
        values, lengths = batch.get("audio_values"), batch.get("audio_lengths")
        n = 0 if values is None else int(values.shape[0])
        if lengths is not None and values is not None and (lengths.shape != (n,) or bool((lengths < 1).any())):
            raise ValueError(
                f"audio_lengths {lengths.tolist()} must give a positive sample count for each of the "
                f"{n} clips of audio_values; pass the collator's output unchanged"
            )

    def encode(self, model, batch):
        return model.encode_audios(batch["audio_values"], batch.get("audio_lengths"))

    def blank(self, model):
        return model.blank_audio() if model.audio is not None else None


class TextKind(MediaKind):
    """A passage routed through the reduction pipeline as a TEXT row (the record carries the text itself)."""

    def load(self, item, opts, where=""):
        if not isinstance(item, str):
            raise TypeError(f"a text passage must be a string, got {type(item).__name__}")
        return item

    def prepare(self, ctx, items, sample, sample_id):
        """Passages as token ids (no special tokens: ``ctx.plain_text`` escapes their text as a message's);
        empty passages and passages holding a placeholder token are refused."""
        if not items:
            return []
        if not all(isinstance(t, str) for t in items):
            raise ValueError(f"sample {sample_id!r}: 'texts' must be a list of passage strings")
        encoded = ctx.tokenizer([ctx.plain_text(t) for t in items], add_special_tokens=False)["input_ids"]
        placeholders = {i: MODALITIES[m].placeholder for m, i in ctx.media_ids.items()}
        for j, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"sample {sample_id!r}: text passage {j} is empty; give it text or drop its <text>")
            inside = sorted({placeholders[i] for i in ids if i in placeholders})
            if inside:
                raise ValueError(
                    f"sample {sample_id!r}: text passage {j} contains the placeholder(s) {inside}; a passage is "
                    f"plain text (put media in the prompt, not in the passage)"
                )
        return [list(ids) for ids in encoded]

    def num_tokens(self, ctx, prepared):
        return [len(p) for p in prepared]

    def stack(self, ctx, samples, prepared):
        passages = [p for per in prepared for p in per]
        return {"text_ids": pad_sequences(passages, ctx.tokenizer.pad_token_id, "right")[0] if passages else None,
                "text_lengths": torch.tensor([len(p) for p in passages], dtype=torch.long),
                self.counts_key: _counts(samples, self.sample_key)}

    def validate(self, batch):
        ids, lengths = batch.get("text_ids"), batch.get("text_lengths")
        n = 0 if ids is None else int(ids.shape[0])
        if lengths is not None and ids is not None and (
            lengths.shape != (n,) or bool((lengths < 1).any()) or bool((lengths > ids.shape[1]).any())
        ):
            raise ValueError(
                f"text_lengths {lengths.tolist()} must give 1..{ids.shape[1]} tokens for each of the "
                f"{n} passages of text_ids; pass the collator's output unchanged"
            )

    def encode(self, model, batch):
        return model.encode_texts(batch["text_ids"], batch.get("text_lengths"))


MODALITIES: dict[str, MediaKind] = {k.key: k for k in (
    # key, placeholder, sample key, row kind, encoder, noun, counts key, inputs (values first)
    ImageKind("image", "<image>", "images", Modality.IMAGE, "vision", "image", "media_counts", ("pixel_values",)),
    VideoKind("video", "<video>", "videos", Modality.VIDEO, "vision", "video", "video_counts", ("video_values", "video_frames")),
    AudioKind("audio", "<audio>", "audios", Modality.AUDIO, "audio", "audio clip", "audio_counts", ("audio_values", "audio_lengths")),
    TextKind("text", "<text>", "texts", Modality.TEXT, "llm", "text passage", "text_counts", ("text_ids", "text_lengths"), from_files=False),
)}
"""Every modality, in placeholder / row-block order."""

PLACEHOLDERS: dict[str, str] = {key: kind.placeholder for key, kind in MODALITIES.items()}
"""Placeholder text per modality (``{"image": "<image>", ...}``)."""

MEDIA_INPUTS: tuple[str, ...] = tuple(k for kind in MODALITIES.values() for k in (*kind.inputs, kind.counts_key))
"""Every batch key a modality fills; the model's ``forward`` / ``generate`` read these."""

__all__ = ["MODALITIES", "MEDIA_INPUTS", "PLACEHOLDERS", "MediaKind", "MediaOptions", "load_rgb", "pad_sequences",
           "video_frames"]
