"""Bounded encoder memories (``llava_deft.encoders.stream``) and ``compress_all_encoders``: a fixed
footprint whatever the stream's length, the plain encode when the budget holds everything, kept
positions ascending and in range, every cache policy, long-video generation within the budget, the
switch off, and errors that name the argument."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from llava_deft.data import build_collator
from llava_deft.encoders.stream import EncoderMemory, StreamMemory, cache_policy_names, stream_batch
from llava_deft.errors import InvalidArgumentError
from llava_deft.model import LlavaDeftForCausalLM
from pipeline import Modality, TokenBatch

POLICIES = ["h2o", "snapkv", "streaming_llm", "tova"]
AUDIO = {"enabled": True, "pool_stride": 2,  # 1 s chunk -> 25 tokens (one per 40 ms)
         "encoder": {"chunk_length": 1, "d_model": 64, "encoder_layers": 1, "encoder_attention_heads": 2,
                     "encoder_ffn_dim": 128}}


def chunks(n: int, size: int = 7, dim: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, dim, generator=g) for _ in range(n)]


def video(seed: int, frames: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + seed)
    return (torch.rand(frames, 64, 64, 3, generator=g) * 255).byte()


def wave(seed: int, seconds: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(200 + seed)
    return 0.1 * torch.randn(int(16000 * seconds), generator=g)


def sample(sid, user, videos=(), audios=(), answer="yes"):
    return {"id": sid, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "videos": list(videos), "audios": list(audios)}


def collate(model, items, generation=True):
    return build_collator(replace(model.processors, max_length=4096), generation=generation)(items)


MEDIA_KEYS = ("input_ids", "attention_mask", "video_values", "video_frames", "video_counts",
              "audio_values", "audio_lengths", "audio_counts")


def inputs(batch):
    return {k: batch[k] for k in MEDIA_KEYS if k in batch}


@pytest.fixture(scope="module")
def model():
    """Tiny default with 2x2 pooled video frames (16 tokens each) and a small audio encoder."""
    torch.manual_seed(0)
    return LlavaDeftForCausalLM({"video": {"pool_stride": 2}, "audio": AUDIO}).eval()


@pytest.fixture(autouse=True)
def _switch_off(model):
    yield
    model.compress_all_encoders(None)  # tests share the model: leave it as they found it


# ---------------------------------------------------------------------------------------------- StreamMemory


def test_the_policies_are_the_registered_cache_policies():
    assert set(POLICIES) <= set(cache_policy_names())
    assert "fastv" not in cache_policy_names()  # a layer stage, not a cache policy


@pytest.mark.parametrize("policy", POLICIES)
def test_footprint_is_bounded_whatever_the_stream_length(policy):
    peaks, sizes = {}, {}
    for n_chunks in (5, 50):
        memory = StreamMemory(policy, max_tokens=20)
        seen_slots = []
        update = memory.policy.update
        memory.policy.update = lambda view, _u=update: (seen_slots.append(view.keys.shape[2]), _u(view))[1]
        for chunk in chunks(n_chunks):
            memory.add(chunk)
            assert memory.tokens.shape[0] <= 20 and memory.positions.shape == memory.valid.shape == (memory.num_slots,)
            assert all(x.shape[-1] == memory.num_slots for x in memory.extras.values())
        assert max(seen_slots) <= 20 + 7  # what the policy ever sees: memory + one chunk
        peaks[n_chunks], sizes[n_chunks] = memory.peak_slots, memory.nbytes()
        assert memory.seen == 7 * n_chunks and memory.evicted == 7 * n_chunks - 20 and len(memory) == 20
    assert peaks[5] == peaks[50] == 27 and sizes[5] == sizes[50]  # nothing grows with the stream


@pytest.mark.parametrize("policy", POLICIES)
def test_a_budget_that_holds_the_stream_gives_it_back_exactly(policy):
    parts = chunks(6)
    memory = StreamMemory(policy, max_tokens=42)
    for part in parts:
        memory.add(part)
    tokens, positions = memory.result()
    assert torch.equal(tokens, torch.cat(parts)) and torch.equal(positions, torch.arange(42))
    assert memory.evicted == 0


@pytest.mark.parametrize("queries", ["chunk", "mean"])
@pytest.mark.parametrize("policy", POLICIES)
def test_kept_tokens_are_stream_tokens_at_ascending_positions(policy, queries):
    parts = chunks(50, size=5, seed=1)
    stream = torch.cat(parts)
    memory = StreamMemory(policy, max_tokens=16, queries=queries)
    for part in parts:
        memory.add(part)
    tokens, positions = memory.result()
    assert tokens.shape == (16, 16) and positions.shape == (16,)
    assert bool((positions[1:] > positions[:-1]).all()) and 0 <= int(positions.min()) and int(positions.max()) < 250
    assert torch.equal(tokens, stream[positions])  # each kept token is the stream's token at its position


def test_streaming_llm_keeps_its_sinks_and_the_most_recent():
    memory = StreamMemory("streaming_llm", max_tokens=12, num_sinks=4).feed(torch.randn(100, 8), chunk_size=6)
    assert memory.result()[1].tolist() == [0, 1, 2, 3, *range(92, 100)]


def test_tova_keeps_what_the_new_chunk_attends_to():
    eye = torch.eye(8)
    memory = StreamMemory("tova", max_tokens=4).add(eye[:4])  # e0 e1 e2 e3
    memory.add(torch.stack([eye[0], eye[0]]))  # the new chunk looks like e0
    assert memory.result()[1].tolist() == [0, 1, 4, 5]  # e0 stays; e2, e3 go (e1 wins the tie by position)


def test_h2o_accumulates_attention_in_extras_aligned_with_the_slots():
    memory = StreamMemory("h2o", max_tokens=10)
    for part in chunks(8, size=4):
        memory.add(part)
        assert memory.extras["h2o_acc"].shape == (1, 1, memory.num_slots)
    assert float(memory.extras["h2o_acc"].sum()) > 0


def test_stream_memory_errors_name_the_argument():
    with pytest.raises(ValueError, match="max_tokens=0"):
        StreamMemory("tova", 0)
    with pytest.raises(ValueError, match="policy='nope'"):
        StreamMemory("nope", 4)
    with pytest.raises(ValueError, match="temperature=0"):
        StreamMemory("tova", 4, temperature=0)
    with pytest.raises(ValueError, match="queries='last'"):
        StreamMemory("tova", 4, queries="last")
    with pytest.raises(ValueError, match="width 3"):
        StreamMemory("tova", 4).add(torch.randn(2, 4)).add(torch.randn(2, 3))


def test_stream_batch_and_cat_rows_keep_kept_positions():
    rows = [(torch.ones(2, 4), torch.tensor([3, 9])), (torch.ones(3, 4), torch.tensor([0, 1, 5]))]
    batch = stream_batch(rows, torch.tensor([[10, 1, 1], [2, 2, 2]]), Modality.AUDIO)
    assert batch.mask.tolist() == [[True, True, False], [True, True, True]]
    assert batch.index.tolist() == [[3, 9, 10], [0, 1, 5]]  # padding continues past the stream
    fresh = TokenBatch.from_tokens(torch.zeros(1, 5, 4), layout=(1, 1, 5))
    both = TokenBatch.cat_rows([batch, fresh])
    assert both.index.tolist() == [[3, 9, 10, 11, 12], [0, 1, 5, 6, 7], [0, 1, 2, 3, 4]]
    assert TokenBatch.cat_rows([fresh, TokenBatch.from_tokens(torch.zeros(1, 2, 4))]).index.tolist() == [
        [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]  # fresh rows: 0..N-1, as before
    with pytest.raises(ValueError, match="0 .. T\\*H\\*W - 1"):
        stream_batch([(torch.ones(1, 4), torch.tensor([4]))], torch.tensor([[4, 1, 1]]), Modality.AUDIO)


# ---------------------------------------------------------------------------------------------- the model


def test_nothing_changes_unless_asked(model):
    assert model.encoder_memory is None
    keys = set(model.state_dict())
    model.compress_all_encoders("tova", video_tokens=8)
    assert isinstance(model.encoder_memory, EncoderMemory) and set(model.state_dict()) == keys  # not saved


def test_a_budget_that_holds_every_video_gives_the_plain_encode(model):
    batch = collate(model, [sample("a", "<video>\nx", videos=[video(0, 6)]), sample("b", "<video>\ny", videos=[video(1, 3)])])
    with torch.no_grad():
        plain = model.encode_videos(batch["video_values"], batch["video_frames"])
        model.compress_all_encoders("tova", video_tokens=6 * 16, chunk_frames=4)
        streamed = model.encode_videos(batch["video_values"], batch["video_frames"])
    for field in ("tokens", "mask", "layout", "modality"):
        assert torch.equal(getattr(streamed, field), getattr(plain, field)), field
    assert torch.equal(streamed.index[streamed.mask], plain.index[plain.mask])


def test_a_budget_that_holds_every_clip_gives_the_plain_encode(model):
    batch = collate(model, [sample("a", "<audio>\nx", audios=[wave(0, 0.9)]), sample("b", "<audio>\ny", audios=[wave(1, 0.3)])])
    with torch.no_grad():
        plain = model.encode_audios(batch["audio_values"], batch["audio_lengths"])
        model.compress_all_encoders("h2o", audio_tokens=25, chunk_seconds=0.2)
        streamed = model.encode_audios(batch["audio_values"], batch["audio_lengths"])
    for field in ("tokens", "mask", "index", "layout", "modality"):
        assert torch.equal(getattr(streamed, field), getattr(plain, field)), field


@pytest.mark.parametrize("policy", POLICIES)
def test_rows_hold_the_budget_at_their_original_positions(model, policy):
    batch = collate(model, [sample("a", "<video>\nx", videos=[video(0, 20)]), sample("b", "<video>\ny", videos=[video(1, 3)]),
                            sample("c", "<audio>\nz", audios=[wave(0, 0.9)])])
    calls = []
    hook = model.vision.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            model.compress_all_encoders(policy, video_tokens=40, audio_tokens=8, chunk_frames=3, chunk_seconds=0.2)
            v = model.encode_videos(batch["video_values"], batch["video_frames"])
            a = model.encode_audios(batch["audio_values"], batch["audio_lengths"])
    finally:
        hook.remove()
    assert calls == [3] * 6 + [2] + [3]  # chunk_frames at a time: 20 = 6 * 3 + 2, then 3
    assert v.layout.tolist() == [[20, 4, 4], [3, 4, 4]] and v.lengths.tolist() == [40, 40]
    assert a.layout.tolist() == [[23, 1, 1]] and a.lengths.tolist() == [8]
    for rows in (v, a):
        for r in range(rows.tokens.shape[0]):
            idx = rows.index[r][rows.mask[r]]
            assert bool((idx[1:] > idx[:-1]).all()) and 0 <= int(idx.min()) and int(idx.max()) < int(rows.layout[r].prod())


def test_generates_from_a_long_video_within_the_budget(model):
    items = [sample("long", "<video>\nwhat happens?", videos=[video(0, 64)]),
             sample("short", "<video>\nand here?", videos=[video(1, 5)]),
             sample("clip", "<audio>\n<video>\nsame?", videos=[video(2, 9)], audios=[wave(2, 0.9)])]
    batch = collate(model, items)
    plain_out, plain_n = model.generate(**inputs(batch), max_new_tokens=3, return_media_tokens=True)
    assert plain_n.tolist() == [64 * 16, 5 * 16, 9 * 16 + 23]
    model.compress_all_encoders("tova", video_tokens=32, audio_tokens=10, chunk_frames=4, chunk_seconds=0.2)
    out, n, info = model.generate(**inputs(batch), max_new_tokens=3, return_media_tokens=True, return_info=True)
    assert out.shape[0] == 3 and n.tolist() == [32, 32, 32 + 10]
    assert info.prompt_lengths[0] > 64 * 16  # RoPE positions span the whole, unreduced video
    long = info.media[0][0]
    assert long.layout == (64, 4, 4) and long.total == 1024 and len(long.kept) == 32
    assert long.kept == sorted(long.kept) and long.kept[-1] < 1024
    assert [m.kind for m in info.media[2]] == ["audio", "video"] and len(info.media[2][0].kept) == 10
    # switched off: exactly the plain outputs again
    model.compress_all_encoders(None)
    again_out, again_n = model.generate(**inputs(batch), max_new_tokens=3, return_media_tokens=True)
    assert torch.equal(again_out, plain_out) and torch.equal(again_n, plain_n)


def test_switching_off_restores_the_exact_logits(model):
    batch = collate(model, [sample("a", "<video>\n<audio>\nx", videos=[video(0, 12)], audios=[wave(0, 0.6)])], generation=False)
    with torch.no_grad():
        before = model(**inputs(batch)).logits
        model.compress_all_encoders("snapkv", video_tokens=16, audio_tokens=4, window_size=4)
        during = model(**inputs(batch)).logits
        model.compress_all_encoders(None)
        after = model(**inputs(batch)).logits
    assert model.encoder_memory is None and torch.equal(before, after)
    assert during.shape[1] < before.shape[1]  # fewer tokens reached the LLM


def test_streamed_rows_go_through_pipeline_stages():
    torch.manual_seed(0)
    m = LlavaDeftForCausalLM({"video": {"pool_stride": 2}, "audio": AUDIO,
                              "pipeline": [{"name": "fgcs", "retention_ratio": 0.5}]}).eval()
    m.compress_all_encoders("tova", video_tokens=24, audio_tokens=8, chunk_seconds=0.2)
    batch = collate(m, [sample("a", "<audio>\n<video>\nx", videos=[video(0, 16)], audios=[wave(0, 0.9)])])
    _, n, info = m.generate(**inputs(batch), max_new_tokens=2, return_media_tokens=True, return_info=True)
    assert n.tolist() == [4 + 12]  # half of each bounded row
    assert [(m.kind, m.layout, len(m.kept)) for m in info.media[0]] == [("audio", (23, 1, 1), 4), ("video", (16, 4, 4), 12)]
    for item in info.media[0]:
        assert item.kept == sorted(item.kept) and item.kept[-1] < item.total


@pytest.mark.parametrize("call, match", [
    (dict(policy="nope"), "policy='nope'"),
    (dict(policy="fastv"), "policy='fastv'"),
    (dict(video_tokens=0), "video_tokens=0"),
    (dict(audio_tokens=True), "audio_tokens=True"),
    (dict(chunk_frames=0), "chunk_frames=0"),
    (dict(chunk_seconds=-1.0), "chunk_seconds=-1.0"),
    (dict(temperature=0.0), "temperature=0.0"),
    (dict(queries="all"), "queries='all'"),
    (dict(bogus=1), "bogus"),
    (dict(policy="h2o", recent_ratio=2.0), "recent_ratio"),
    (dict(cache_max_size=9), "cache_max_size"),
])
def test_bad_arguments_are_refused_naming_them(model, call, match):
    with pytest.raises(InvalidArgumentError, match=match):
        model.compress_all_encoders(**{"policy": "tova", **call})
    assert model.encoder_memory is None  # nothing was switched on
