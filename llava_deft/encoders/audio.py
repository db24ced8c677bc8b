"""Audio: loading (wav/flac → 16 kHz mono), Whisper log-mel features and a Whisper-style encoder.

Reference: Radford et al., "Robust Speech Recognition via Large-Scale Weak Supervision" (Whisper),
https://arxiv.org/abs/2212.04356. We reuse transformers' ``WhisperFeatureExtractor`` (log-mel) and
``WhisperEncoder`` (two convolutions, the second with stride 2, then transformer layers), with a short
chunk (5 s by default instead of 30 s) so that short clips are not padded to half a minute.

    wave = load_audio("clip.flac")                       # (S,) float32, mono, 16 kHz
    enc = AudioEncoder()                                 # tiny, random init
    feats = enc.features([wave])                         # (1, n_mels, chunk_length * 100)
    tokens = enc(feats)                                  # (1, T, width), layout (T, 1, 1)
    n = enc.processor.num_tokens(len(wave))              # tokens that cover the clip (the rest is padding)

Tests: ``.venv/bin/python -m pytest tests/test_audio.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from ..config.model import DEFAULT_AUDIO_CONFIG, SAMPLING_RATE, resolve_audio_config
from ..errors import AudioError, CheckpointError, MediaLimitError
from .weights import read_safetensors

__all__ = ["SAMPLING_RATE", "DEFAULT_AUDIO_CONFIG", "resolve_audio_config", "load_audio", "log_mel",
           "build_feature_extractor", "audio_token_count", "AudioProcessor", "AudioEncoder"]

# ---------------------------------------------------------------------------------------------- loading

MAX_SAMPLE_MAGNITUDE = 16.0
"""Largest ``|sample|`` a file may hold once read as float (full scale is 1.0; integer files never
exceed it, float files may a little after mixing): 16 is +24 dB of headroom, and anything past it is
not a recording (samples of 1e30 give NaN log-mel features)."""


def load_audio(path: str | Path, sampling_rate: int = SAMPLING_RATE, max_seconds: float | None = None) -> Tensor:
    """Read a wav or flac file (any format libsndfile reads) as ``(S,)`` float32 mono at ``sampling_rate``.

    Channels are averaged; other rates are resampled with soxr (high quality). Raises ``AudioError``
    (a ``FileNotFoundError`` through ``MediaFileError``) naming the file when it is missing, cannot
    be decoded, holds no samples, holds NaN/inf or samples past ``±MAX_SAMPLE_MAGNITUDE``; with
    ``max_seconds``, a longer file raises ``MediaLimitError`` from its header (``soundfile.info``),
    before any sample is read.
    """
    # imported here so that image/video-only use (and machines without libsndfile) need neither
    import soundfile as sf
    import soxr

    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "does not exist")
    try:
        if max_seconds is not None:
            info = sf.info(str(path))
            if info.frames > max_seconds * info.samplerate:
                raise MediaLimitError(path, (
                    f"{info.frames / info.samplerate:.1f} s is over limits.max_audio_seconds = {max_seconds:g} s; "
                    f"raise it in the model config if you trust the file, or cut the clip"), "audio file")
        data, file_rate = sf.read(str(path), dtype="float32", always_2d=True)  # (S, C)
    except sf.SoundFileError as err:
        raise AudioError(path, f"cannot be decoded ({err})") from err
    if data.shape[0] == 0:
        raise AudioError(path, "is empty (0 samples)")
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise AudioError(path, f"holds {bad} non-finite (NaN or inf) sample value(s)")
    peak = float(np.abs(data).max())
    if peak > MAX_SAMPLE_MAGNITUDE:
        raise AudioError(path, (
            f"holds samples of magnitude up to {peak:.3g}, past ±{MAX_SAMPLE_MAGNITUDE:g} (full scale is 1.0); "
            f"it is not a recording: re-export it normalised to [-1, 1]"))
    mono = data.mean(axis=1)  # (S,)
    if file_rate != sampling_rate:
        mono = soxr.resample(mono, file_rate, sampling_rate, quality="HQ")
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))


# --------------------------------------------------------------------------------------------- features


def build_feature_extractor(
    num_mel_bins: int = 80,
    chunk_length: int = 5,
    sampling_rate: int = SAMPLING_RATE,
    hop_length: int = 160,
    n_fft: int = 400,
) -> WhisperFeatureExtractor:
    """transformers' Whisper log-mel extractor; every clip is padded (with zeros) to ``chunk_length`` s."""
    return WhisperFeatureExtractor(
        feature_size=num_mel_bins,
        sampling_rate=sampling_rate,
        hop_length=hop_length,
        chunk_length=chunk_length,
        n_fft=n_fft,
    )


def log_mel(
    waveforms: Sequence[Tensor | np.ndarray], extractor: WhisperFeatureExtractor, truncate: bool = False,
    names: Sequence[str] | None = None,
) -> Tensor:
    """``waveforms`` (each ``(S_i,)`` at the extractor's rate) -> ``(B, n_mels, chunk frames)`` float32.

    A clip longer than the chunk raises ``ValueError`` unless ``truncate`` (then its end is cut):
    Whisper's extractor would cut it silently. A clip whose features are not finite (NaN or inf
    samples, or samples so large that their power overflows) raises ``AudioError`` naming it by
    ``names[i]`` (default ``waveform i``).
    """
    arrays = [w.detach().cpu().numpy() if isinstance(w, Tensor) else np.asarray(w) for w in waveforms]
    for i, a in enumerate(arrays):
        if a.ndim != 1:
            raise ValueError(f"waveform {i} has shape {a.shape}; expected (samples,) mono")
        if not truncate and a.shape[0] > extractor.n_samples:
            raise ValueError(
                f"waveform {i} has {a.shape[0]} samples ({a.shape[0] / extractor.sampling_rate:.2f} s), longer "
                f"than the {extractor.chunk_length} s chunk; raise chunk_length or pass truncate=True"
            )
    out = extractor(
        arrays, sampling_rate=extractor.sampling_rate, return_tensors="pt", padding="max_length", truncation=True
    )
    feats = out["input_features"].float()  # (B, n_mels, frames)
    finite = torch.isfinite(feats).flatten(1).all(1)  # (B,)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0, 0])
        peak = float(np.abs(arrays[i]).max()) if arrays[i].size else 0.0
        name = names[i] if names is not None else f"waveform {i}"
        raise AudioError(
            f"{name} gives non-finite log-mel features (its largest |sample| is {peak:.3g}; samples must be "
            f"finite and about [-1, 1]); load files with llava_deft.encoders.audio.load_audio, which refuses such clips"
        )
    return feats


def audio_token_count(num_samples: Tensor | int, hop_length: int, pool_stride: int, max_tokens: int) -> Tensor | int:
    """Encoder tokens that cover a clip of ``num_samples`` samples (elementwise for a tensor).

    Mel frame ``j`` is centred on sample ``j * hop_length``, so a clip spans ``ceil(S / hop)`` frames
    (the count WhisperFeatureExtractor's attention mask gives); conv2 (stride 2, padding 1) makes
    token ``i`` of frames ``2i-1 .. 2i+1``, so ``ceil(frames / 2)`` tokens, then ``ceil(. / pool_stride)``
    after pooling; at least 1 and at most the chunk's ``max_tokens``.
    """
    if isinstance(num_samples, Tensor):
        frames = torch.div(num_samples + hop_length - 1, hop_length, rounding_mode="floor")
        tokens = torch.div(torch.div(frames + 1, 2, rounding_mode="floor") + pool_stride - 1, pool_stride, rounding_mode="floor")
        return tokens.clamp(1, max_tokens)
    frames = -(-int(num_samples) // hop_length)
    return max(1, min(max_tokens, -(-(-(-frames // 2)) // pool_stride)))


class AudioProcessor:
    """What a collator needs of an :class:`AudioEncoder`, without its weights (small and picklable, so
    DataLoader workers can hold it): waveforms -> log-mel ``features``, and ``num_tokens`` of a clip.

    Every clip is padded to the encoder's chunk; only the first ``num_tokens(S)`` tokens cover it, so
    the model keeps those and a short clip costs the LLM few tokens. ``max_samples`` is the longest
    clip the chunk holds (longer ones are refused by the collator, never cut).
    """

    def __init__(self, feature_extractor: WhisperFeatureExtractor, pool_stride: int, max_tokens: int):
        self.feature_extractor = feature_extractor
        self.pool_stride = int(pool_stride)
        self.max_tokens = int(max_tokens)

    @property
    def sampling_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    @property
    def max_samples(self) -> int:
        return int(self.feature_extractor.n_samples)

    def features(self, waveforms: Sequence[Tensor | np.ndarray], names: Sequence[str] | None = None) -> Tensor:
        """``(A, n_mels, frames)`` float32 log-mel features (``log_mel``; a clip over the chunk, or one
        whose features are not finite, raises; ``names`` name the clips in errors)."""
        return log_mel(waveforms, self.feature_extractor, names=names)

    def num_tokens(self, num_samples: Tensor | int) -> Tensor | int:
        """Tokens covering a clip of ``num_samples`` samples (see :func:`audio_token_count`)."""
        return audio_token_count(num_samples, self.feature_extractor.hop_length, self.pool_stride, self.max_tokens)


# ---------------------------------------------------------------------------------------------- encoder


class AudioEncoder(nn.Module):
    """Whisper-style audio encoder: ``forward(input_features (B, n_mels, frames)) -> tokens (B, T, width)``.

    ``frames = chunk_length * sampling_rate / hop_length`` (500 for 5 s); conv2 halves it, so
    ``T = ceil(frames / 2 / pool_stride)`` (250 at stride 1: one token per 20 ms). The tokens are a
    time sequence; ``layout = (T, 1, 1)`` is their ``(T, H, W)`` grid for group-aware scoring.

    ``config``: keys of ``DEFAULT_AUDIO_CONFIG`` (tiny: width 128, 2 layers, 4 heads, 80 mels, 5 s).
    ``weights``: a local ``.safetensors`` state dict of the Whisper encoder (ours from
    ``save_weights``, or a Whisper checkpoint's ``model.encoder.*`` / ``encoder.*`` keys, whose
    position table is cut to the chunk's positions). Random init (under torch's seed) otherwise.
    ``pool_stride``: average-pool tokens over time by this stride (the last window may be partial).
    ``feature_extractor`` is the matching ``WhisperFeatureExtractor``; ``features(waves)`` applies it.
    """

    def __init__(self, config: dict[str, Any] | None = None, weights: str | Path | None = None, pool_stride: int = 1):
        super().__init__()
        if not isinstance(pool_stride, int) or pool_stride < 1:
            raise ValueError(f"pool_stride must be a positive integer, got {pool_stride!r}")
        self.config = resolve_audio_config(config)
        c = self.config
        whisper = WhisperConfig(
            **{k: c[k] for k in DEFAULT_AUDIO_CONFIG if k not in ("chunk_length", "sampling_rate", "hop_length", "n_fft")},
            max_source_positions=c["max_source_positions"],
        )
        self.encoder = WhisperEncoder(whisper)
        self.pool_stride = pool_stride
        self.width: int = c["d_model"]
        self.num_mel_bins: int = c["num_mel_bins"]
        self.num_frames: int = 2 * c["max_source_positions"]
        self.num_tokens: int = math.ceil(c["max_source_positions"] / pool_stride)
        self.layout: tuple[int, int, int] = (self.num_tokens, 1, 1)
        self.feature_extractor = build_feature_extractor(
            c["num_mel_bins"], c["chunk_length"], c["sampling_rate"], c["hop_length"], c["n_fft"]
        )
        if weights is not None:
            self.load_weights(weights)

    @property
    def processor(self) -> AudioProcessor:
        """This encoder's :class:`AudioProcessor` (its feature extractor and token counts)."""
        return AudioProcessor(
            self.feature_extractor, self.pool_stride, math.ceil(self.config["max_source_positions"] / self.pool_stride)
        )

    def features(self, waveforms: Sequence[Tensor | np.ndarray], truncate: bool = False) -> Tensor:
        """Mono waveforms at ``config['sampling_rate']`` -> ``(B, n_mels, frames)`` log-mel features."""
        return log_mel(waveforms, self.feature_extractor, truncate=truncate)

    def forward(self, input_features: Tensor) -> Tensor:
        if input_features.ndim != 3 or input_features.shape[1:] != (self.num_mel_bins, self.num_frames):
            raise ValueError(
                f"audio features have shape {tuple(input_features.shape)}; expected "
                f"(B, {self.num_mel_bins}, {self.num_frames}) (use AudioEncoder.features)"
            )
        tokens = self.encoder(input_features).last_hidden_state  # (B, frames/2, width)
        if self.pool_stride > 1:
            # (B, width, frames/2) -> (B, width, T) -> (B, T, width)
            tokens = F.avg_pool1d(tokens.transpose(1, 2), self.pool_stride, self.pool_stride, ceil_mode=True)
            tokens = tokens.transpose(1, 2)
        return tokens

    def save_weights(self, path: str | Path) -> None:
        """Write the encoder's state dict as safetensors (the resolved config in its metadata)."""
        state = {k: v.detach().contiguous() for k, v in self.encoder.state_dict().items()}
        save_file(state, str(path), metadata={"format": "pt", "audio_config": json.dumps(self.config)})

    def load_weights(self, path: str | Path) -> None:
        """Load a local safetensors state dict strictly; mismatches raise ``CheckpointError``."""
        state = read_safetensors(path, "audio")
        expected = self.encoder.state_dict()
        for prefix in ("model.encoder.", "encoder."):
            if not set(expected) & set(state) and any(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        pos = state.get("embed_positions.weight")
        if pos is not None and pos.shape[0] > expected["embed_positions.weight"].shape[0]:
            state["embed_positions.weight"] = pos[: expected["embed_positions.weight"].shape[0]]
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
        if missing or unexpected or shapes:
            raise CheckpointError(
                f"audio weights '{path}' do not match the encoder config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}"
            )
        self.encoder.load_state_dict(state, strict=True)
