"""Video input: read clips with decord, sample frames, turn frames into image-encoder pixels, pool
each frame's tokens.

A video goes through the image encoder frame by frame, as in LLaVA-NeXT-Video ("LLaVA-NeXT: A Strong
Zero-shot Video Understanding Model", LLaVA blog, April 2024; ``get_2dPool`` in LLaVA-VL/LLaVA-NeXT):
``load_video`` picks ``T`` frames, ``frames_to_pixels``
applies the encoder's image transform to each, the encoder gives ``(T, N, D)`` tokens on an ``(H, W)``
grid per frame, and ``pool_frame_tokens`` optionally average-pools each frame's grid
(LLaVA-NeXT's ``mm_spatial_pool_stride``) so the clip is laid out ``(T, H', W')``. The timestamps of
the sampled frames are the clip's temporal positions.

    clip = load_video("clip.mp4", num_frames=8)           # uniform over the clip
    clip = load_video("clip.mp4", fps=2, max_frames=32)   # one frame every 0.5 s, at most 32
    clip.frames (T, H, W, 3) uint8, clip.indices (T,) long, clip.timestamps (T,) float32 seconds
    pixels = frames_to_pixels(clip.frames, transform)     # (T, 3, h, w)
    pooled, (T, h2, w2) = pool_frame_tokens(tokens, (h, w), stride=2)

Errors name the file: a missing file raises ``MediaFileError`` (a ``FileNotFoundError``); an empty,
corrupt or unreadable file, or one without frames, raises ``VideoError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import decord
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import MediaFileError, MediaLimitError, VideoError

# decord raises DECORDError for most failures and a bare RuntimeError for some (e.g. "Error reading").
_DECORD_ERRORS = (decord.DECORDError, RuntimeError)

_FIX = "re-encode it (e.g. ffmpeg -i IN -c:v libx264 OUT.mp4) or drop the sample"


@dataclass(frozen=True)
class VideoClip:
    """Frames sampled from one video file.

    ``frames (T, H, W, 3)`` uint8 RGB; ``indices (T,)`` long, the frames' positions in the file
    (ascending, distinct); ``timestamps (T,)`` float32, each frame's presentation time in seconds (its
    temporal position); ``total_frames`` and ``avg_fps`` describe the whole file.
    """

    frames: torch.Tensor
    indices: torch.Tensor
    timestamps: torch.Tensor
    total_frames: int
    avg_fps: float
    path: str

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    def __repr__(self) -> str:
        return (
            f"VideoClip(path={self.path!r}, frames={tuple(self.frames.shape)}, indices={self.indices.tolist()}, "
            f"timestamps={[round(t, 4) for t in self.timestamps.tolist()]}, total_frames={self.total_frames}, "
            f"avg_fps={self.avg_fps:g})"
        )


def uniform_indices(total: int, k: int) -> list[int]:
    """``k`` frame indices spread evenly over ``0 .. total-1``, first and last frame included
    (``round(i * (total - 1) / (k - 1))``, halves rounded up; exact integer arithmetic). ``k >= total``
    gives every frame once; ``k == 1`` gives the middle frame.
    """
    if total < 1 or k < 1:
        raise ValueError(f"need total >= 1 and k >= 1 frames, got total={total}, k={k}")
    if k >= total:
        return list(range(total))
    if k == 1:
        return [(total - 1) // 2]
    # floor(i * (total-1) / (k-1) + 1/2) without floats; strictly increasing since (total-1)/(k-1) >= 1
    return [(2 * i * (total - 1) + (k - 1)) // (2 * (k - 1)) for i in range(k)]


def sample_frame_indices(
    total_frames: int,
    avg_fps: float | None = None,
    num_frames: int = 8,
    fps: float | None = None,
    max_frames: int | None = None,
) -> list[int]:
    """Indices of the frames to decode from a video of ``total_frames`` frames at ``avg_fps``.

    - ``fps=None`` (default): ``num_frames`` frames uniformly over the clip (``uniform_indices``).
    - ``fps=f``: the frame on screen at each time ``0, 1/f, 2/f, ...`` before the clip ends, i.e.
      ``floor(j * avg_fps / f)``; ``num_frames`` is ignored. Asking for more than the file's own rate
      gives every frame once (no duplicates).
    - ``max_frames=m``: a frame budget. Uniform sampling takes ``min(num_frames, m)`` frames; when fps
      sampling chose more than ``m``, ``m`` of them are kept uniformly (``uniform_indices`` over the
      chosen list).
    """
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    if fps is None:
        # the budget simply lowers the count: min(num_frames, max_frames) frames uniformly over the clip
        return uniform_indices(total_frames, min(num_frames, max_frames or num_frames))
    if not fps > 0 or not math.isfinite(fps):
        raise ValueError(f"fps must be a positive number or None, got {fps}")
    if avg_fps is None or not avg_fps > 0 or not math.isfinite(avg_fps):
        raise ValueError(f"fps sampling needs the video's frame rate, got avg_fps={avg_fps}")
    step = avg_fps / fps  # source frames per sample
    if step <= 1:  # at or above the file's rate every frame is on screen at some sample time
        chosen = list(range(total_frames))
    else:
        j = np.arange(math.ceil(total_frames / step) + 1)  # sample times j / fps, a few past the end
        # the epsilon keeps a j * step that is an integer in exact arithmetic from flooring below it
        index = np.floor(j * step + 1e-9).astype(np.int64)
        chosen = index[index < total_frames].tolist()  # strictly increasing since step > 1
    if max_frames is not None and len(chosen) > max_frames:
        chosen = [chosen[p] for p in uniform_indices(len(chosen), max_frames)]
    return chosen


def _frame_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` of the first video stream from the container's header (PyAV; decord has no
    such call), or None when PyAV cannot read it: decord's open then reports what is wrong. PyAV is
    imported here, on the first video read, so that the package imports where it is missing (the GPU image)."""
    import av  # noqa: PLC0415

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return None
            ctx = container.streams.video[0].codec_context
            return int(ctx.width), int(ctx.height)
    except av.FFmpegError:
        return None


def _over(path: Path, what: str, limit: str, fix: str) -> MediaLimitError:
    """The error for a clip whose ``what`` is over ``limit`` (``limits.key = value``)."""
    return MediaLimitError(path, f"{what} is over {limit}; raise it in the model config if you trust the file, or {fix}",
                           "video file")


def load_video(
    path: str | Path, num_frames: int = 8, fps: float | None = None, max_frames: int | None = None,
    max_seconds: float | None = None, max_frame_pixels: int | None = None,
) -> VideoClip:
    """Decode the sampled frames of ``path`` with decord (sampling as in ``sample_frame_indices``).

    Raises ``MediaFileError`` (a ``FileNotFoundError``) when ``path`` does not exist and
    ``VideoError`` when it is empty, corrupt or unreadable, has no frames, or (with ``fps=``) no
    frame rate. Before any frame is decoded, a clip longer than ``max_seconds`` (its frame count over
    its frame rate, or its last frame's end time, whichever is longer) or with frames of more than
    ``max_frame_pixels`` pixels (width × height from the header) raises ``MediaLimitError``.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaFileError(f"video '{path}' does not exist")
    if path.stat().st_size == 0:
        raise VideoError(path, f"the file is empty (0 bytes); {_FIX}")
    size = _frame_size(path) if max_frame_pixels is not None else None
    if size is not None and size[0] * size[1] > max_frame_pixels:
        what = f"its {size[0]} x {size[1]} frames ({size[0] * size[1]:,} pixels)"
        raise _over(path, what, f"limits.max_video_frame_pixels = {max_frame_pixels:,}", "downscale the clip")
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    except _DECORD_ERRORS as err:
        problem = f"decord cannot open it as a video (corrupt or unsupported: {_short(err)}); {_FIX}"
        raise VideoError(path, problem) from err
    total = len(reader)
    if total < 1:
        raise VideoError(path, f"it has no frames; {_FIX}")
    avg_fps = float(reader.get_avg_fps())
    if fps is not None and not (avg_fps > 0 and math.isfinite(avg_fps)):
        problem = f"it reports no frame rate ({avg_fps}), so fps={fps} sampling is impossible; use fps=None"
        raise VideoError(path, problem)
    if max_seconds is not None:
        try:  # the packet index's times: no frame is decoded
            seconds = float(reader.get_frame_timestamp([total - 1])[0, 1])
        except _DECORD_ERRORS as err:
            raise VideoError(path, f"its frame times cannot be read ({_short(err)}); {_FIX}") from err
        if avg_fps > 0 and math.isfinite(avg_fps):
            seconds = max(seconds, total / avg_fps)
        if seconds > max_seconds:
            raise _over(path, f"its length, {seconds:.1f} s ({total} frames),", f"limits.max_video_seconds = {max_seconds:g} s",
                        "cut the clip")
    indices = sample_frame_indices(total, avg_fps, num_frames=num_frames, fps=fps, max_frames=max_frames)
    try:
        frames = reader.get_batch(indices).asnumpy()  # (T, H, W, 3) uint8
        times = reader.get_frame_timestamp(indices)  # (T, 2) start, end seconds
    except _DECORD_ERRORS as err:
        problem = f"decoding frames {indices} failed (truncated or corrupt: {_short(err)}); {_FIX}"
        raise VideoError(path, problem) from err
    return VideoClip(
        frames=torch.from_numpy(frames),
        indices=torch.tensor(indices, dtype=torch.long),
        timestamps=torch.from_numpy(times[:, 0].copy()).float(),
        total_frames=total,
        avg_fps=avg_fps,
        path=str(path),
    )


def _short(err: BaseException) -> str:
    """decord's message without its multi-line C++ stack trace."""
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def frames_to_pixels(frames: torch.Tensor, image_transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """Apply an image encoder's transform (PIL image → ``(3, h, w)``) to each frame of
    ``frames (T, H, W, 3)`` uint8; returns ``(T, 3, h, w)``.
    """
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be a (T, H, W, 3) uint8 tensor, got {tuple(frames.shape)} {frames.dtype}")
    if frames.shape[0] == 0:
        raise ValueError("frames is empty (T == 0)")
    array = frames.cpu().numpy()
    return torch.stack([image_transform(Image.fromarray(array[t])) for t in range(array.shape[0])])


def pool_frame_tokens(
    tokens: torch.Tensor, grid: tuple[int, int], stride: int
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Average-pool each frame's token grid with a ``stride × stride`` window (LLaVA-NeXT's spatial
    pooling of video frames; ``stride=1`` is the identity).

    ``tokens (T, N, D)`` with ``N == H * W`` tokens per frame in row-major ``(H, W)`` order →
    ``(T, H' * W', D)`` with ``H' = ceil(H / stride)``, ``W' = ceil(W / stride)``; a window cut by the
    grid's bottom or right edge averages only the tokens inside it. Returns the pooled tokens and the
    layout ``(T, H', W')``.
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (T, N, D), got shape {tuple(tokens.shape)}")
    T, N, D = tokens.shape
    H, W = (int(g) for g in grid)
    if H * W != N:
        raise ValueError(f"grid {H}x{W} = {H * W} tokens per frame, but tokens have N = {N}")
    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride}")
    stride = int(stride)
    if stride == 1:
        return tokens, (T, H, W)
    x = tokens.reshape(T, H, W, D).permute(0, 3, 1, 2)  # (T, D, H, W)
    x = F.avg_pool2d(x, stride, stride, ceil_mode=True, count_include_pad=False)  # (T, D, H', W')
    h, w = x.shape[-2:]
    return x.permute(0, 2, 3, 1).reshape(T, h * w, D), (T, h, w)  # (T, H'W', D)
