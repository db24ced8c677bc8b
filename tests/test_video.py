"""Video groundwork: decord loading and frame sampling, per-frame pixels and pooling, typed errors, and
the generated video-QA task (determinism, lossless clips)."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

from llava_deft.errors import MediaFileError, VideoError
from llava_deft.encoders.video import (
    VideoClip,
    frames_to_pixels,
    load_video,
    pool_frame_tokens,
    sample_frame_indices,
    uniform_indices,
)
from llava_deft.tasks.video_shapes import (
    COLORS,
    DIRECTIONS,
    QUESTIONS,
    SHAPES,
    main,
    make_video_task,
    render_clip,
    sample_clip,
    write_clip,
)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A tiny generated task: 3 train / 2 test clips of 12 frames."""
    out = tmp_path_factory.mktemp("video_task")
    make_video_task(out, n_train=3, n_test=2, frames=12, seed=7, progress=False)
    return out


# ------------------------------------------------------------------------------------------- sampling


def test_uniform_indices_hand_computed():
    # round(i * 15 / 7) for i = 0..7: 0, 2.14, 4.29, 6.43, 8.57, 10.71, 12.86, 15
    assert uniform_indices(16, 8) == [0, 2, 4, 6, 9, 11, 13, 15]
    assert uniform_indices(10, 4) == [0, 3, 6, 9]
    assert uniform_indices(5, 8) == [0, 1, 2, 3, 4]  # more asked than there are: every frame once
    assert uniform_indices(9, 1) == [4]  # one frame: the middle one
    assert uniform_indices(9, 2) == [0, 8]


@pytest.mark.parametrize("total, k", [(n, k) for n in (1, 2, 7, 16, 301) for k in (1, 2, 3, 8, 32)])
def test_uniform_indices_properties(total, k):
    idx = uniform_indices(total, k)
    assert len(idx) == min(total, k)
    assert idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] <= total - 1
    if 1 < k < total:
        assert idx[0] == 0 and idx[-1] == total - 1
        ref = [math.floor(i * (total - 1) / (k - 1) + 0.5) for i in range(k)]
        assert idx == ref


def test_fps_sampling_hand_computed():
    # 16 frames at 8 fps (2 s) sampled at 3 fps: times 0, 1/3, 2/3, 1, 4/3, 5/3 s → floor(t * 8)
    assert sample_frame_indices(16, 8.0, fps=3) == [0, 2, 5, 8, 10, 13]
    # 30 frames at 30 fps sampled at 4 fps: times 0, .25, .5, .75 s → 0, 7.5, 15, 22.5
    assert sample_frame_indices(30, 30.0, fps=4) == [0, 7, 15, 22]
    # integer steps land exactly (no float floor below): 24 fps at 8 fps is every 3rd frame
    assert sample_frame_indices(24, 24.0, fps=8) == list(range(0, 24, 3))
    # faster than the file: every frame once, no duplicates
    assert sample_frame_indices(5, 8.0, fps=20) == [0, 1, 2, 3, 4]
    # num_frames is ignored in fps mode
    assert sample_frame_indices(16, 8.0, num_frames=2, fps=3) == [0, 2, 5, 8, 10, 13]


def test_frame_budget_caps_both_modes():
    chosen = sample_frame_indices(16, 8.0, fps=3)  # [0, 2, 5, 8, 10, 13]
    capped = sample_frame_indices(16, 8.0, fps=3, max_frames=4)
    assert capped == [chosen[p] for p in uniform_indices(6, 4)] == [0, 5, 8, 13]
    assert sample_frame_indices(16, 8.0, fps=3, max_frames=100) == chosen  # under budget: unchanged
    # uniform mode: the budget lowers the count, still spread over the whole clip (round(7.5) = 8)
    assert sample_frame_indices(16, 8.0, num_frames=8, max_frames=3) == uniform_indices(16, 3) == [0, 8, 15]
    assert sample_frame_indices(16, 8.0, num_frames=4, max_frames=8) == uniform_indices(16, 4)
    long = sample_frame_indices(3000, 30.0, fps=2, max_frames=32)  # 100 s at 2 fps = 200 → 32
    assert len(long) == 32 and long[0] == 0 and long == sorted(set(long))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_frames": 0}, "num_frames"),
        ({"max_frames": 0}, "max_frames"),
        ({"fps": 0}, "fps"),
        ({"fps": float("nan")}, "fps"),
    ],
)
def test_sampling_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_frame_indices(16, 8.0, **kwargs)


def test_fps_sampling_needs_a_frame_rate():
    with pytest.raises(ValueError, match="frame rate"):
        sample_frame_indices(16, 0.0, fps=2)


# ------------------------------------------------------------------------------------------- loading


def test_decord_reads_generated_clip_losslessly(tmp_path):
    spec = sample_clip(np.random.default_rng(3), frames=12, size=64)
    frames = render_clip(spec)
    path = tmp_path / "clip.mp4"
    write_clip(frames, path, fps=8)
    clip = load_video(path, num_frames=12)
    assert isinstance(clip, VideoClip)
    assert clip.total_frames == 12 and clip.avg_fps == pytest.approx(8.0)
    assert clip.frames.shape == (12, 64, 64, 3) and clip.frames.dtype == torch.uint8
    assert clip.indices.tolist() == list(range(12))
    torch.testing.assert_close(clip.timestamps, torch.arange(12, dtype=torch.float32) / 8)
    # libx264rgb at crf 0 is lossless: decord gives back the rendered frames exactly
    assert np.array_equal(clip.frames.numpy(), frames)


def test_load_video_sampling_matches_indices(tmp_path):
    frames = render_clip(sample_clip(np.random.default_rng(4), frames=16))
    path = tmp_path / "clip.mp4"
    write_clip(frames, path, fps=8)
    uniform = load_video(path)  # default: 8 frames uniformly
    assert uniform.indices.tolist() == [0, 2, 4, 6, 9, 11, 13, 15]
    assert np.array_equal(uniform.frames.numpy(), frames[uniform.indices.numpy()])
    torch.testing.assert_close(uniform.timestamps, uniform.indices.float() / 8)
    timed = load_video(path, fps=3, max_frames=4)
    assert timed.indices.tolist() == [0, 5, 8, 13] and timed.num_frames == 4
    assert np.array_equal(timed.frames.numpy(), frames[[0, 5, 8, 13]])


def test_frames_to_pixels_applies_transform_per_frame():
    frames = torch.randint(0, 256, (3, 20, 24, 3), dtype=torch.uint8)
    seen = []

    def transform(img):
        seen.append(img.size)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[:, :16, :16]

    pixels = frames_to_pixels(frames, transform)
    assert pixels.shape == (3, 3, 16, 16) and seen == [(24, 20)] * 3
    torch.testing.assert_close(pixels[1], frames[1, :16, :16].permute(2, 0, 1).float() / 255)
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\) uint8"):
        frames_to_pixels(frames.float(), transform)


# ------------------------------------------------------------------------------------------- errors


def test_missing_video_raises_file_not_found(tmp_path):
    path = tmp_path / "nope.mp4"
    with pytest.raises(FileNotFoundError, match="nope.mp4") as info:
        load_video(path)
    assert isinstance(info.value, MediaFileError) and not isinstance(info.value, VideoError)


def test_empty_file_raises_video_error(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(VideoError, match=r"empty\.mp4.*empty \(0 bytes\).*re-encode"):
        load_video(path)


def test_zero_frame_video_raises_video_error(tmp_path):
    import av

    # a valid MP4 (ftyp + empty mdat + moov) holding a video stream and no frames
    path = tmp_path / "zero_frames.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264rgb", rate=8)
        stream.width = stream.height = 64
        stream.pix_fmt = "rgb24"
        container.start_encoding()
    assert path.read_bytes()[4:8] == b"ftyp" and path.stat().st_size > 0
    with pytest.raises(VideoError, match=r"zero_frames\.mp4.*re-encode") as info:
        load_video(path)
    assert info.value.path == str(path)


def test_corrupt_file_raises_video_error(tmp_path):
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(VideoError, match=r"corrupt\.mp4.*cannot open it as a video.*re-encode"):
        load_video(path)


def test_video_error_survives_pickling():
    err = VideoError("a.mp4", "it has no frames")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is VideoError and str(back) == str(err) == "video file 'a.mp4': it has no frames"
    assert isinstance(back, FileNotFoundError)


# ------------------------------------------------------------------------------------------- pooling


def _pool_reference(tokens, H, W, s):
    """Slow loop: the mean of each stride × stride window (clipped at the grid's edges)."""
    T, _, D = tokens.shape
    grid = tokens.reshape(T, H, W, D)
    h2, w2 = -(-H // s), -(-W // s)
    out = torch.empty(T, h2 * w2, D, dtype=tokens.dtype)
    for t in range(T):
        for i in range(h2):
            for j in range(w2):
                out[t, i * w2 + j] = grid[t, i * s : (i + 1) * s, j * s : (j + 1) * s].reshape(-1, D).mean(0)
    return out, (T, h2, w2)


@pytest.mark.parametrize("H, W, s", [(4, 4, 2), (5, 7, 2), (6, 6, 3), (7, 5, 3), (3, 3, 4), (24, 24, 2), (1, 9, 2)])
def test_pool_frame_tokens_matches_loop(H, W, s):
    torch.manual_seed(0)
    tokens = torch.randn(3, H * W, 5, dtype=torch.float64)
    pooled, layout = pool_frame_tokens(tokens, (H, W), s)
    ref, ref_layout = _pool_reference(tokens, H, W, s)
    assert layout == ref_layout == (3, math.ceil(H / s), math.ceil(W / s))
    assert pooled.shape == (3, layout[1] * layout[2], 5)
    torch.testing.assert_close(pooled, ref)


def test_pool_frame_tokens_stride_one_is_identity_and_grad_flows():
    tokens = torch.randn(2, 12, 4, requires_grad=True)
    same, layout = pool_frame_tokens(tokens, (3, 4), 1)
    assert same is tokens and layout == (2, 3, 4)
    pooled, _ = pool_frame_tokens(tokens, (3, 4), 2)
    pooled.sum().backward()
    assert tokens.grad is not None and torch.isfinite(tokens.grad).all()


def test_pool_frame_tokens_rejects_bad_input():
    with pytest.raises(ValueError, match="grid 3x3"):
        pool_frame_tokens(torch.zeros(2, 10, 4), (3, 3), 2)
    with pytest.raises(ValueError, match="stride"):
        pool_frame_tokens(torch.zeros(2, 9, 4), (3, 3), 0)
    with pytest.raises(ValueError, match=r"\(T, N, D\)"):
        pool_frame_tokens(torch.zeros(9, 4), (3, 3), 2)


# ------------------------------------------------------------------------------------------- task


def test_generated_task_layout_and_answers(task):
    meta = json.loads((task / "meta.json").read_text())
    assert (meta["seed"], meta["frames"], meta["n_train"], meta["n_test"]) == (7, 12, 3, 2)
    for split, n in (("train", 3), ("test", 2)):
        records = json.loads((task / f"{split}.json").read_text())
        assert len(records) == n * len(QUESTIONS)
        assert sorted(p.name for p in (task / split / "clips").iterdir()) == [f"{i:05d}.mp4" for i in range(n)]
        for r in records:
            assert set(r) == {"id", "video", "question_type", "conversations"}
            assert (task / r["video"]).is_file() and r["video"].startswith(f"{split}/clips/")
            human, gpt = r["conversations"]
            assert human["from"] == "human" and human["value"].startswith("<video>\n")
            assert human["value"].split("\n", 1)[1] in QUESTIONS[r["question_type"]]
            allowed = {
                "direction": set(DIRECTIONS), "shape": set(SHAPES), "color_first": set(COLORS),
                "color_last": set(COLORS), "color_change": {"yes", "no"},
            }[r["question_type"]]
            assert gpt["from"] == "gpt" and gpt["value"] in allowed
        # decord reads every clip with the requested frame count
        for i in range(n):
            assert load_video(task / split / "clips" / f"{i:05d}.mp4").total_frames == 12


def test_clip_content_matches_its_answers():
    """Check the answers against the pixels: colours at the ends, direction of the centroid's motion."""
    for seed in range(12):
        spec = sample_clip(np.random.default_rng(seed), frames=10, size=64, change_prob=0.5)
        frames = render_clip(spec).astype(int)
        first = (frames[0] == np.array(COLORS[spec.first_color])).all(-1)  # (H, W) pixels of that exact colour
        last = (frames[9] == np.array(COLORS[spec.last_color])).all(-1)
        assert first.sum() > 50 and last.sum() > 50  # the answer colour really fills the shape
        ys0, xs0 = np.nonzero(first)
        ys1, xs1 = np.nonzero(last)
        move = np.array([xs1.mean() - xs0.mean(), ys1.mean() - ys0.mean()])
        assert np.sign(np.round(move / 5)).astype(int).tolist() == list(DIRECTIONS[spec.direction])
        # the shape is never cut by the frame's edge: the border rows/columns are background only
        border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], 1)
        assert (border == np.array(spec.background)).all()


def test_generator_is_deterministic(tmp_path, task):
    again = tmp_path / "again"
    main(["--out", str(again), "--n-train", "3", "--n-test", "2", "--frames", "12", "--seed", "7"])
    for split, n in (("train", 3), ("test", 2)):
        assert (again / f"{split}.json").read_bytes() == (task / f"{split}.json").read_bytes()
        for i in range(n):
            a = load_video(again / split / "clips" / f"{i:05d}.mp4", num_frames=12).frames
            b = load_video(task / split / "clips" / f"{i:05d}.mp4", num_frames=12).frames
            assert torch.equal(a, b)
            clip = f"{split}/clips/{i:05d}.mp4"
            assert (again / clip).read_bytes() == (task / clip).read_bytes()  # same PyAV/x264 build here
    # another seed gives another task; clip i does not depend on how many clips are made
    other = tmp_path / "other"
    make_video_task(other, n_train=1, n_test=0, frames=12, seed=8, progress=False)
    assert (other / "train.json").read_bytes() != (task / "train.json").read_bytes()
    prefix = tmp_path / "prefix"
    make_video_task(prefix, n_train=1, n_test=0, frames=12, seed=7, progress=False)
    first = json.loads((prefix / "train.json").read_text())
    assert first == json.loads((task / "train.json").read_text())[: len(QUESTIONS)]


def _fps_reference(total, avg_fps, fps):
    """Slow loop: the frame on screen at each sample time j / fps, each frame once."""
    out, j = [], 0
    while (index := math.floor(j * avg_fps / fps + 1e-9)) < total:
        if not out or out[-1] != index:
            out.append(index)
        j += 1
    return out


@pytest.mark.parametrize("avg_fps", [8.0, 24.0, 25.0, 29.97, 60.0])
def test_fps_sampling_matches_loop(avg_fps):
    for total in (1, 2, 9, 50, 301):
        for fps in (0.5, 1, 2, 3, 7.5, 8, 30, 100):
            assert sample_frame_indices(total, avg_fps, fps=fps) == _fps_reference(total, avg_fps, fps)
