"""Audio and text passages through the model: mixed image + audio + text batches against one sample at a
time, pipeline rows and layouts, count and input errors, gradients, save/load, and LlavaJsonDataset's
"audio" and "text" records. (load_audio's own errors on files are covered in tests/test_audio.py.)"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from llava_deft.data import LlavaJsonDataset, MultimodalCollator, build_collator
from llava_deft.errors import AudioError, MediaCountMismatchError, SampleTooLongError
from llava_deft.model import LlavaDeftForCausalLM
from pipeline import Modality
from tests.batching import assert_generate_matches_one_at_a_time, assert_logits_match_one_at_a_time, pipeline_inputs
from pipeline.group import group_neighbours

# 1 s chunk -> 100 mel frames -> 50 encoder tokens -> 25 after pool_stride 2 (one token per 40 ms)
AUDIO = {"enabled": True, "pool_stride": 2,
         "encoder": {"chunk_length": 1, "d_model": 64, "encoder_layers": 1, "encoder_attention_heads": 2,
                     "encoder_ffn_dim": 128}}
PASSAGE = "The quiet farmer paints the wooden bridge in the morning. The pass key is 48213. Remember it."


def image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy())


def wave(seed: int, seconds: float) -> torch.Tensor:
    """(S,) float32 noise at 16 kHz."""
    g = torch.Generator().manual_seed(200 + seed)
    return 0.1 * torch.randn(int(16000 * seconds), generator=g)


def turn(sid, user, answer, images=(), audios=(), texts=()):
    return {"id": sid, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "images": list(images), "audios": list(audios), "texts": list(texts)}


def mixed():
    """Text only; image; 0.3 s audio; a passage; and <audio> <text> <image> <audio> (0.9 s and 0.5 s)."""
    return [
        turn("text", "say yes", "yes"),
        turn("img", "<image>\nwhat shape?", "circle", images=[image(0)]),
        turn("aud", "<audio>\nwhat number is said?", "seven", audios=[wave(0, 0.3)]),
        turn("psg", "<text>\nWhat is the pass key?", "48213", texts=[PASSAGE]),
        turn("all", "<audio>\n<text>\nand <image> then <audio>\nsame colour?", "no",
             images=[image(1)], audios=[wave(1, 0.9), wave(2, 0.5)], texts=["The red circle is small."]),
    ]


def collate(model, items, generation=False, max_length=1024):
    c = build_collator(replace(model.processors, max_length=max_length), generation=generation)
    return c(items)


def n_text(model, text: str) -> int:
    return len(model.tokenizer.encode(text, add_special_tokens=False))


PIPELINES = {"none": None, "fgcs": [{"name": "fgcs", "retention_ratio": 0.5}]}


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def model(request):
    torch.manual_seed(0)
    return LlavaDeftForCausalLM({"pipeline": PIPELINES[request.param], "audio": AUDIO}).eval()


def media_tokens(model) -> list[int]:
    """Unreduced media tokens per sample of ``mixed()``: 64 per image, ceil(ceil(S/160)/2/2) per clip,
    the passage's length per text."""
    a = [model.audio_processor.num_tokens(int(16000 * s)) for s in (0.3, 0.9, 0.5)]
    assert a == [8, 23, 13]
    return [0, 64, a[0], n_text(model, PASSAGE), a[1] + a[2] + 64 + n_text(model, "The red circle is small.")]


def test_collator_audio_and_text_outputs(model):
    batch = collate(model, mixed())
    assert batch["audio_values"].shape == (3, 80, 100) and batch["audio_values"].dtype == torch.float32
    assert batch["audio_lengths"].tolist() == [4800, 14400, 8000]
    assert batch["audio_counts"].tolist() == [0, 0, 1, 0, 2]
    lengths = [n_text(model, PASSAGE), n_text(model, "The red circle is small.")]
    assert batch["text_lengths"].tolist() == lengths and batch["text_counts"].tolist() == [0, 0, 0, 1, 1]
    assert batch["text_ids"].shape == (2, max(lengths))
    assert batch["text_ids"][0].tolist() == model.tokenizer.encode(PASSAGE, add_special_tokens=False)
    assert torch.all(batch["text_ids"][1, lengths[1]:] == model.tokenizer.pad_token_id)
    assert batch["media_counts"].tolist() == [0, 1, 0, 0, 1]


def test_mixed_batch_logits_equal_one_at_a_time(model):
    items = mixed()
    batch = collate(model, items)
    with torch.no_grad():
        sp, _, _ = model.prepare_inputs(**{k: v for k, v in batch.items() if k != "ids"})
        together = model(**batch).logits
        reduced = bool(model.pipeline.names)  # fgcs keeps ceil(half) of each row
        half = lambda n: -(-n // 2)  # noqa: E731
        rows = [[], [64], [8], [n_text(model, PASSAGE)], [23, n_text(model, "The red circle is small."), 64, 13]]
        assert [sum(r) for r in rows] == media_tokens(model)
        assert sp.media_positions.sum(1).tolist() == [sum(half(n) if reduced else n for n in r) for r in rows]
        assert_logits_match_one_at_a_time(model, items, lambda xs: collate(model, xs), together, sp.attention_mask)


def test_mixed_batch_generate_equals_one_at_a_time(model):
    assert_generate_matches_one_at_a_time(model, mixed(), lambda xs: collate(model, xs, generation=True))


def test_pipeline_rows_in_placeholder_order_with_audio_and_text_layouts(model):
    seen = pipeline_inputs(model, collate(model, mixed()))
    assert len(seen) == 1, "the pipeline must run once for images, audio and text together"
    rows = seen[0]
    g = model.vision.grid
    p, q = n_text(model, PASSAGE), n_text(model, "The red circle is small.")
    # placeholders in batch order: img <image>; aud <audio>; psg <text>; all <audio> <text> <image> <audio>
    assert rows.modality.tolist() == [Modality.IMAGE, Modality.AUDIO, Modality.TEXT,
                                      Modality.AUDIO, Modality.TEXT, Modality.IMAGE, Modality.AUDIO]
    assert rows.layout.tolist() == [[1, *g], [8, 1, 1], [p, 1, 1], [23, 1, 1], [q, 1, 1], [1, *g], [13, 1, 1]]
    assert rows.mask.sum(1).tolist() == [64, 8, p, 23, q, 64, 13]
    assert rows.tokens.shape[1] == 64  # padded to the longest row
    assert torch.all(rows.tokens[~rows.mask] == 0)
    # the passage rows are the LLM's input embeddings of the passage
    batch = collate(model, mixed())
    torch.testing.assert_close(rows.tokens[2, :p], model.llm.embed(batch["text_ids"][0, :p]))
    # DeFT's group rule: text rows are grouped by their top-k semantic neighbours, never by grid position
    pos, valid = group_neighbours(rows.index, rows.mask, rows.modality, rows.layout, rows.tokens, text_k=5)
    grid_slots = 8 + 2 * 2
    assert not valid[2, :, :grid_slots].any() and valid[2, :p, grid_slots:].sum(-1).eq(5).all()
    assert not valid[1, :, grid_slots:].any() and valid[1, :8, :grid_slots].any()  # audio: ±2 time steps


def test_audio_and_text_count_mismatch_names_sample(model):
    with pytest.raises(MediaCountMismatchError, match=r"sample 'two-clips'.*2 <audio> placeholder\(s\) but 1 media"):
        collate(model, [turn("two-clips", "<audio><audio> what?", "no", audios=[wave(3, 0.2)])])
    with pytest.raises(MediaCountMismatchError, match=r"sample 'no-text'.*0 <text> placeholder\(s\) but 1 media"):
        collate(model, [turn("no-text", "what is the key?", "no", texts=[PASSAGE])])
    batch = collate(model, mixed())
    with pytest.raises(MediaCountMismatchError, match=r"sample 'all'.*2 <audio> placeholder\(s\) but 1 media"):
        model(**{**batch, "audio_counts": torch.tensor([0, 0, 1, 0, 1])})
    with pytest.raises(MediaCountMismatchError, match=r"sample 'psg'.*1 <text> placeholder\(s\) but 0 media"):
        model(**{**batch, "text_counts": torch.tensor([0, 0, 0, 0, 2])})


def test_bad_audio_and_passages_are_refused_naming_the_sample(model):
    no_audio = MultimodalCollator(model.tokenizer, model.image_transform, model.media_tokens_per_image, 1024)
    with pytest.raises(ValueError, match=r"sample 'aud' has 1 audio clip\(s\) but the collator has no audio_processor"):
        no_audio([mixed()[2]])
    with pytest.raises(SampleTooLongError, match=r"sample 'long': audio clip 0 is 1\.50 s, longer than .* 1 s chunk"):
        collate(model, [turn("long", "<audio> q", "a", audios=[wave(0, 1.5)])])
    nan = wave(0, 0.2)
    nan[5] = float("nan")
    with pytest.raises(ValueError, match=r"sample 'nan': audio clip 0 must be a non-empty, finite mono waveform"):
        collate(model, [turn("nan", "<audio> q", "a", audios=[nan])])
    with pytest.raises(ValueError, match=r"sample 'empty': text passage 0 is empty"):
        collate(model, [turn("empty", "<text> q", "a", texts=[""])])
    with pytest.raises(ValueError, match=r"sample 'nested': text passage 0 contains the placeholder\(s\) \['<image>'\]"):
        collate(model, [turn("nested", "<text> q", "a", texts=["look at <image> here"])])
    # audio clips' and passages' tokens count towards max_length
    with pytest.raises(SampleTooLongError, match=rf"sample 'psg' is \d+ tokens long .* 1 text passage\(s\) {n_text(model, PASSAGE)} tokens"):
        collate(model, [mixed()[3]], max_length=20)
    with pytest.raises(SampleTooLongError, match=r"sample 'aud' is \d+ tokens long .* 1 audio clip\(s\) 8 tokens"):
        collate(model, [mixed()[2]], max_length=15)


def test_audio_into_a_model_without_audio_is_refused():
    torch.manual_seed(0)
    plain = LlavaDeftForCausalLM()
    assert plain.audio is None and plain.audio_processor is None
    assert not any(k.startswith("audio") for k in plain.state_dict())  # old checkpoints still match
    torch.manual_seed(0)
    with_audio = LlavaDeftForCausalLM({"audio": AUDIO})
    batch = collate(with_audio, [mixed()[2]])
    with pytest.raises(ValueError, match=r"has no audio encoder; set `audio: \{enabled: true\}`"):
        plain(**batch)


def test_every_trainable_audio_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = LlavaDeftForCausalLM({"audio": AUDIO}).train()
    model(**collate(model, mixed())).loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if n.startswith("audio") and p.requires_grad]
    assert len(trainable) > 10
    for name, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert not model.audio.encoder.embed_positions.weight.requires_grad  # Whisper's fixed sinusoids


def test_batches_without_audio_still_run_the_audio_encoder():
    """ZeRO-3 needs every rank to run the same modules: a batch without audio still touches it."""
    torch.manual_seed(0)
    model = LlavaDeftForCausalLM({"audio": AUDIO}).train()
    for items in ([mixed()[0]], [mixed()[3]]):  # text only; a passage and no image
        model.zero_grad()
        model(**collate(model, items)).loss.backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None, f"{name} was not in the graph of {[i['id'] for i in items]}"


def test_freeze_audio():
    model = LlavaDeftForCausalLM({"audio": {**AUDIO, "freeze": True}})
    assert not any(p.requires_grad for p in model.audio.parameters())
    assert all(p.requires_grad for p in model.audio_projector.parameters())
    model.apply_freeze(vision=False, llm=False, audio=False)
    assert model.audio.encoder.conv1.weight.requires_grad


def test_save_load_round_trip_with_audio(model, tmp_path):
    weights = tmp_path / "audio.safetensors"
    model.audio.save_weights(weights)
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["audio"]["enabled"] and cfg["audio"]["weights"] is None and cfg["audio"]["pool_stride"] == 2
    torch.manual_seed(123)
    loaded = LlavaDeftForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.text_token_id == model.text_token_id == len(model.tokenizer) - 1
    batch = collate(model, mixed())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
    # the encoder alone, from local safetensors
    torch.manual_seed(7)
    fresh = LlavaDeftForCausalLM({"audio": {**AUDIO, "weights": str(weights)}})
    assert torch.equal(fresh.audio.encoder.conv1.weight, model.audio.encoder.conv1.weight)


# --------------------------------------------------------------------------------------------- dataset


def _write_dataset(tmp_path, audio_name="clip.wav"):
    (tmp_path / "media").mkdir()
    sf.write(tmp_path / "media" / "clip.wav", wave(5, 0.4).numpy(), 22050)  # resampled to 16 kHz on load
    records = [
        {"id": "a0", "audio": audio_name,
         "conversations": [{"from": "human", "value": "<audio>\nwhat is said?"}, {"from": "gpt", "value": "seven"}]},
        {"id": "t0", "text": PASSAGE, "image": [],
         "conversations": [{"from": "human", "value": "<text>\nWhat is the pass key?"}, {"from": "gpt", "value": "48213"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))


def test_llava_json_dataset_loads_audio_and_text(tmp_path, model):
    _write_dataset(tmp_path)
    ds = LlavaJsonDataset(tmp_path / "data.json", tmp_path / "media")
    (clip,) = ds[0]["audios"]
    assert clip.dtype == torch.float32 and clip.shape == (round(6400 * 16000 / 22050),)  # 6400 samples at 22.05 kHz
    assert ds[1]["texts"] == [PASSAGE] and ds[1]["audios"] == [] and ds[0]["texts"] == []
    batch = collate(model, [ds[0], ds[1]])
    assert batch["audio_counts"].tolist() == [1, 0] and batch["text_counts"].tolist() == [0, 1]
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_llava_json_dataset_bad_audio_names_file_and_sample(tmp_path):
    _write_dataset(tmp_path, audio_name="silent.wav")
    sf.write(tmp_path / "media" / "silent.wav", np.zeros(0, np.float32), 16000)
    ds = LlavaJsonDataset(tmp_path / "data.json", tmp_path / "media")
    with pytest.raises(AudioError, match=r"silent\.wav.*empty \(0 samples\).*sample 'a0'"):
        ds[0]


@pytest.mark.parametrize("record, match", [
    ({"text": ""}, "key 'text' must be a non-empty passage string or a list of them"),
    ({"audio": 3}, "key 'audio' must be a path string or a list of path strings"),
])
def test_llava_json_dataset_refuses_bad_audio_and_text_keys(tmp_path, record, match):
    from llava_deft.errors import DatasetFormatError

    (tmp_path / "d.json").write_text(json.dumps([{"id": "x", "conversations": [{"from": "human", "value": "q"}], **record}]))
    with pytest.raises(DatasetFormatError, match=match):
        LlavaJsonDataset(tmp_path / "d.json", tmp_path)


# --------------------------------------------------------------------------------------------- inference API


def test_inference_api_takes_audio_text_and_video(model, tmp_path):
    from llava_deft.inference import LlavaDeft
    from llava_deft.tasks.video_shapes import write_clip

    api = LlavaDeft(model, device="cpu")
    sf.write(tmp_path / "a.wav", wave(4, 0.6).numpy(), 16000, subtype="FLOAT")
    write_clip(np.zeros((4, 64, 64, 3), dtype=np.uint8), tmp_path / "v.mp4", fps=4)
    # placeholders are put first, kind by kind, where the prompt has none
    batch = api.build_batch(["what?"], images=[[image(0)]], videos=[[tmp_path / "v.mp4"]],
                            audios=[[tmp_path / "a.wav"]], texts=[[PASSAGE]])
    ids = batch["input_ids"][0].tolist()
    order = [i for i in ids if i in (model.image_token_id, model.video_token_id, model.audio_token_id, model.text_token_id)]
    assert order == [model.image_token_id, model.video_token_id, model.audio_token_id, model.text_token_id]
    assert batch["audio_lengths"].tolist() == [9600] and batch["video_frames"].tolist() == [4]
    # the API's answer is the model's greedy generation on the collated sample
    item = turn("one", "<audio>\n<text>\nwhat?", "", audios=[wave(4, 0.6)], texts=[PASSAGE])
    expected = model.generate(**collate(model, [item], generation=True), max_new_tokens=4)
    text = model.tokenizer.batch_decode(expected, skip_special_tokens=True)[0].strip()
    assert api.generate("<audio>\n<text>\nwhat?", audios=[tmp_path / "a.wav"], texts=[PASSAGE], max_new_tokens=4) == text
    both = api.generate(["<audio>\n<text>\nwhat?", "say yes"], audios=[[wave(4, 0.6)], []], texts=[[PASSAGE], []],
                        max_new_tokens=4)
    assert both[0] == text and both[1] == api.generate("say yes", max_new_tokens=4)
    with pytest.raises(TypeError, match=r"texts must be .* not a bare string; give texts=\[\.\.\.\]"):
        api.generate("what?", texts=PASSAGE)
    with pytest.raises(ValueError, match="2 prompts but 1 audio lists"):
        api.generate(["a", "b"], audios=[[wave(0, 0.1)]])
