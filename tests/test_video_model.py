"""Video through the model: mixed image + video batches against one-sample-at-a-time, pipeline rows,
pooling, count errors, and LlavaJsonDataset's "video" records."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from llava_deft.data import LlavaJsonDataset, build_collator
from llava_deft.errors import MediaCountMismatchError, VideoError
from llava_deft.model import LlavaDeftForCausalLM
from llava_deft.tasks.video_shapes import write_clip
from llava_deft.encoders.video import VideoClip
from pipeline import Modality
from tests.batching import assert_generate_matches_one_at_a_time, assert_logits_match_one_at_a_time, pipeline_inputs


def image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy())


def video(seed: int, frames: int) -> torch.Tensor:
    """(T, 64, 64, 3) uint8 random frames."""
    g = torch.Generator().manual_seed(100 + seed)
    return (torch.rand(frames, 64, 64, 3, generator=g) * 255).byte()


def turn(sid, user, answer, images=(), videos=()):
    return {"id": sid, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "images": list(images), "videos": list(videos)}


def mixed():
    """Text-only, image, video (2 frames), image + video (3 frames; the video's placeholder first)."""
    return [
        turn("text", "say yes", "yes"),
        turn("img", "<image>\nwhat shape?", "circle", images=[image(0)]),
        turn("vid", "<video>\nwhich way does it move?", "left", videos=[video(0, 2)]),
        turn("both", "<video>\nand <image>\nsame colour?", "no", images=[image(1)], videos=[video(1, 3)]),
    ]


def collate(model, items, generation=False):
    c = build_collator(replace(model.processors, max_length=1024), generation=generation)
    return c(items)


PIPELINES = {"none": None, "fgcs": [{"name": "fgcs", "retention_ratio": 0.5}]}


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def model(request):
    torch.manual_seed(0)
    return LlavaDeftForCausalLM({"pipeline": PIPELINES[request.param]}).eval()


def test_collator_video_outputs(model):
    batch = collate(model, mixed())
    assert batch["video_values"].shape == (5, 3, 64, 64)
    assert batch["video_frames"].tolist() == [2, 3]
    assert batch["video_counts"].tolist() == [0, 0, 1, 1]
    assert batch["media_counts"].tolist() == [0, 1, 0, 1]


def test_mixed_batch_logits_equal_one_at_a_time(model):
    items = mixed()
    batch = collate(model, items)
    with torch.no_grad():
        sp, _, _ = model.prepare_inputs(**{k: batch[k] for k in (
            "input_ids", "attention_mask", "pixel_values", "media_counts", "labels",
            "video_values", "video_frames", "video_counts")})
        together = model(**batch).logits
        reduced = bool(model.pipeline.names)  # fgcs keeps half of each row
        per_row = [0, 64, 128, 192 + 64]
        assert sp.media_positions.sum(1).tolist() == [n // 2 if reduced else n for n in per_row]
        assert_logits_match_one_at_a_time(model, items, lambda xs: collate(model, xs), together, sp.attention_mask)


def test_mixed_batch_generate_equals_one_at_a_time(model):
    assert_generate_matches_one_at_a_time(model, mixed(), lambda xs: collate(model, xs, generation=True))


def test_pipeline_rows_in_placeholder_order_with_video_layout(model):
    seen = pipeline_inputs(model, collate(model, mixed()))
    assert len(seen) == 1, "the pipeline must run once for images and videos together"
    rows = seen[0]
    g = model.vision.grid
    # placeholders in batch order: img's <image>, vid's <video>, both's <video>, both's <image>
    assert rows.modality.tolist() == [Modality.IMAGE, Modality.VIDEO, Modality.VIDEO, Modality.IMAGE]
    assert rows.layout.tolist() == [[1, *g], [2, *g], [3, *g], [1, *g]]
    assert rows.mask.sum(1).tolist() == [g[0] * g[1] * t for t in (1, 2, 3, 1)]
    assert rows.tokens.shape[1] == 3 * g[0] * g[1]  # padded to the longest row


def test_pool_stride_changes_video_tokens():
    torch.manual_seed(0)
    pooled = LlavaDeftForCausalLM({"video": {"pool_stride": 2}}).eval()
    assert pooled.media_tokens_per_frame == 16 and pooled.media_tokens_per_image == 64
    seen = []
    pooled.pipeline.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    items = mixed()
    with torch.no_grad():
        sp, _, _ = pooled.prepare_inputs(**{k: v for k, v in collate(pooled, items).items() if k not in ("ids",)})
    assert seen[0].layout.tolist() == [[1, 8, 8], [2, 4, 4], [3, 4, 4], [1, 8, 8]]
    assert sp.media_positions.sum(1).tolist() == [0, 64, 2 * 16, 3 * 16 + 64]


def test_video_count_mismatch_names_sample(model):
    bad = turn("two-videos", "<video><video> what?", "no", videos=[video(2, 2)])
    with pytest.raises(MediaCountMismatchError, match=r"sample 'two-videos'.*2 <video> placeholder\(s\) but 1 media"):
        collate(model, [bad])
    batch = collate(model, mixed())
    with pytest.raises(MediaCountMismatchError, match=r"sample 'both'.*1 <video> placeholder\(s\) but 0 media"):
        model(**{**batch, "video_counts": torch.tensor([0, 0, 1, 0])})


def test_video_tokens_count_towards_max_length(model):
    from llava_deft.errors import SampleTooLongError

    c = build_collator(replace(model.processors, max_length=150))
    c([turn("short", "<video> q", "a", videos=[video(0, 1)])])
    with pytest.raises(SampleTooLongError, match="sample 'long'.*1 video"):
        c([turn("long", "<video> q", "a", videos=[video(0, 3)])])


def test_text_only_batch_still_runs_the_encoder():
    model = LlavaDeftForCausalLM().train()
    model(**collate(model, [mixed()[0]])).loss.backward()
    assert all(p.grad is not None for p in model.vision.parameters())


# --------------------------------------------------------------------------------------------- dataset


def _write_dataset(tmp_path, clip_name="clip.mp4"):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(6, 64, 64, 3), dtype=np.uint8)
    (tmp_path / "media").mkdir()
    write_clip(frames, tmp_path / "media" / "clip.mp4", fps=8)
    records = [{"id": "v0", "video": clip_name,
                "conversations": [{"from": "human", "value": "<video>\nwhich way?"}, {"from": "gpt", "value": "left"}]}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    return frames


def test_llava_json_dataset_loads_video(tmp_path, model):
    frames = _write_dataset(tmp_path)
    ds = LlavaJsonDataset(tmp_path / "data.json", tmp_path / "media", num_frames=3)
    item = ds[0]
    (clip,) = item["videos"]
    assert isinstance(clip, VideoClip) and clip.frames.shape == (3, 64, 64, 3) and clip.frames.dtype == torch.uint8
    assert clip.indices.tolist() == [0, 3, 5]
    torch.testing.assert_close(clip.frames, torch.from_numpy(frames[[0, 3, 5]]))
    batch = collate(model, [item])
    assert batch["video_frames"].tolist() == [3] and batch["video_counts"].tolist() == [1]
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_llava_json_dataset_corrupt_video_names_file(tmp_path):
    _write_dataset(tmp_path, clip_name="broken.mp4")
    (tmp_path / "media" / "broken.mp4").write_bytes(np.random.default_rng(1).bytes(4096))
    ds = LlavaJsonDataset(tmp_path / "data.json", tmp_path / "media")
    with pytest.raises(VideoError, match=r"broken\.mp4.*sample 'v0'"):
        ds[0]
