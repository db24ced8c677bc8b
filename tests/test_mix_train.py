"""Mixed-modality training data (DataSpec type mix) and the training entry on a mix of image, video,
audio and text samples: the spec's validation errors, the combined dataset, one mixed batch through
the model, and a 2-step run of the real entry that exports a model which loads and answers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_deft.data import build_collator
from llava_deft.errors import ConfigError
from llava_deft.model import LlavaDeftForCausalLM
from llava_deft.train import check_stages
from llava_deft.config import load_train_config
from llava_deft.data.sources import MixedDataset, build_dataset

ROOT = Path(__file__).resolve().parent.parent

# the tiny default with audio on and 4 frames per clip: every modality, small enough for a 2-core CPU
MIX_MODEL = {"audio": {"enabled": True, "encoder": {"chunk_length": 2}}, "video": {"num_frames": 4}}


def mix(tasks: Path, **extra) -> list[str]:
    sources = [
        {"type": "easyvqa", "limit": 3, "repeat": 2},
        {"type": "llava_json", "path": str(tasks / "video_shapes" / "train.json"), "limit": 4},
        {"type": "llava_json", "path": str(tasks / "audio_words" / "train.json")},
        {"type": "llava_json", "path": str(tasks / "passkey" / "train.json"), "repeat": 3},
    ]
    return ["data.type=mix", f"data.sources={json.dumps(sources)}", *[f"{k}={v}" for k, v in extra.items()]]


def test_mix_combines_sources_with_limit_and_repeat(tiny_tasks_dir):
    cfg = load_train_config(None, mix(tiny_tasks_dir))
    ds = build_dataset(cfg.data, {"num_frames": 4}, 16000)
    assert isinstance(ds, MixedDataset)
    n_audio = len(json.loads((tiny_tasks_dir / "audio_words" / "train.json").read_text()))
    assert ds.names == ["easyvqa", "video_shapes", "audio_words", "passkey"]
    assert ds.sizes == [3 * 2, 4, n_audio, 4 * 3] and len(ds) == sum(ds.sizes)
    # items keep their source's order: easy-VQA twice, the first 4 video questions, audio, passkey x3
    ids = [ds[i]["id"] for i in range(len(ds))]
    assert ids[:6] == [f"easyvqa-train-{i}" for i in (0, 1, 2, 0, 1, 2)]
    assert all(i.startswith("video-train-00000") for i in ids[6:10])
    assert [ds.source_of(i) for i in (0, 6, 10, len(ds) - 1)] == ["easyvqa", "video_shapes", "audio_words", "passkey"]
    assert ids[-4:] == ids[-8:-4] == ids[-12:-8]
    video, audio, passage = ds[6], ds[10], ds[len(ds) - 1]
    assert video["videos"][0].frames.shape[0] == 4  # the model's frame sampling reached the source
    assert audio["audios"][0].ndim == 1 and passage["texts"] and not passage["images"]
    # a mix-level limit and repeat apply after the sources are combined
    cfg = load_train_config(None, mix(tiny_tasks_dir, **{"data.limit": 7, "data.repeat": 2}))
    assert len(build_dataset(cfg.data, {"num_frames": 4}, 16000)) == 14


def test_mix_sample_rate_follows_the_model(tiny_tasks_dir):
    cfg = load_train_config(None, mix(tiny_tasks_dir))
    ds = build_dataset(cfg.data, {"num_frames": 4}, 8000)
    seconds = json.loads((tiny_tasks_dir / "audio_words" / "train_clips.json").read_text())[0]["seconds"]
    assert abs(ds[6 + 4]["audios"][0].shape[0] - seconds * 8000) <= 1


@pytest.mark.parametrize("overrides, message", [
    (["data.type=mix"], r"data: .*type 'mix' needs a non-empty list of sources"),
    (["data.type=mix", "data.sources=[{type: easyvqa}, {type: llava_json}]"],
     r"data\.sources\.1: .*type 'llava_json' needs path"),
    (["data.type=mix", "data.sources=[{type: easyvqa}, {type: easyvqa, path: x.json, name: second}]"],
     r"data\.sources\.1: .*'second' \(easyvqa\) sets keys that do not apply to it: path \(llava_json and text only\)"),
    (["data.type=mix", "data.sources=[{type: llava_json, path: a.json, group_by_image: true}]"],
     r"data\.sources\.0: .*group_by_image \(easyvqa only\)"),
    (["data.type=mix", "data.sources=[{type: easyvqa}, {type: easyvqa, repeat: 0}]"],
     r"data\.sources\.1\.repeat: Input should be greater than 0"),
    (["data.type=mix", "data.sources=[{type: easyvqa}, {type: mix, sources: [{type: easyvqa}]}]"],
     r"sources \[1\] are mixes themselves"),
    (["data.type=mix", "data.sources=[{type: easyvqa}, {type: easyvqa, split: test}]"],
     r"share the name\(s\) \['easyvqa'\]; give each a distinct `name`"),
    (["data.sources=[{type: easyvqa}]"], r"data: .*type 'easyvqa' sets keys .*sources \(type mix only\)"),
    (["data.type=mix", "data.sources=[{type: video}]"], r"data\.sources\.0\.type: Input should be"),
])
def test_mix_spec_errors_name_the_source(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, overrides)


def test_missing_source_file_names_the_source_and_the_generator(tmp_path):
    cfg = load_train_config(None, ["data.type=mix", "data.sources=[{type: easyvqa, limit: 2}, "
                                   f"{{type: llava_json, path: {tmp_path}/tasks/passkey/train.json}}]"])
    with pytest.raises(FileNotFoundError, match=r"data\.sources\.1 \('passkey', llava_json\): LLaVA JSON file .* does not "
                       rf"exist; generate the task data with `python -m llava_deft.tasks --out {tmp_path}/tasks`"):
        build_dataset(cfg.data)


def test_empty_and_malformed_sources_name_themselves(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "bad.json").write_text('[{"id": 1}]')
    for name, message in (("empty", r"data\.sources\.1 \('e', llava_json\): .* holds no records"),
                          ("bad", r"data\.sources\.1 \('e', llava_json\): .*record 0 \(id '1'\): key 'conversations' is missing")):
        cfg = load_train_config(None, ["data.type=mix", "data.sources=[{type: easyvqa, limit: 2}, "
                                       f"{{type: llava_json, name: e, path: {tmp_path}/{name}.json}}]"])
        with pytest.raises(ValueError, match=message):
            build_dataset(cfg.data)


def test_stage_freeze_audio():
    cfg = load_train_config(None, ["stages=[{freeze_audio: true}]"])
    with pytest.raises(ConfigError, match=r"stages\.0\.freeze_audio set but the model has no audio encoder"):
        check_stages(cfg, load_model_config_of(cfg))
    cfg = load_train_config(None, ["stages=[{freeze_audio: true}]", f"model={json.dumps(MIX_MODEL)}"])
    check_stages(cfg, load_model_config_of(cfg))
    model = LlavaDeftForCausalLM(MIX_MODEL)
    model.apply_freeze(vision=False, llm=False, audio=cfg.stages[0].freeze_audio)
    assert not any(p.requires_grad for p in model.audio.parameters())
    assert all(p.requires_grad for p in model.audio_projector.parameters())
    model.apply_freeze(vision=False, llm=False, audio=None)  # None: the model config's audio.freeze (False)
    assert any(p.requires_grad for p in model.audio.parameters())


def load_model_config_of(cfg):
    from llava_deft.config import load_model_config

    return load_model_config(cfg.model)


def test_one_batch_of_every_modality_trains(tiny_tasks_dir):
    """Easy-VQA image, video, audio and passage samples in ONE batch: one loss, gradients reach the
    vision tower (images and frames), the audio encoder and the LLM embeddings (passages)."""
    torch.manual_seed(0)
    model = LlavaDeftForCausalLM(MIX_MODEL)
    cfg = load_train_config(None, mix(tiny_tasks_dir))
    ds = build_dataset(cfg.data, model.config.video.sampling(), model.config.audio.sampling_rate())
    collate = build_collator(model.processors)
    picks = [0, 6, 10, len(ds) - 1, 1]  # image, video, audio, passage, image
    batch = collate([ds[i] for i in picks])
    assert batch["media_counts"].tolist() == [1, 0, 0, 0, 1]
    assert batch["video_counts"].tolist() == [0, 1, 0, 0, 0] and batch["video_frames"].tolist() == [4]
    assert batch["audio_counts"].tolist() == [0, 0, 1, 0, 0] and batch["text_counts"].tolist() == [0, 0, 0, 1, 0]
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for part in (model.vision, model.audio, model.llm):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), type(part).__name__


@pytest.mark.slow
def test_two_step_mixed_run_exports_and_loads(tiny_tasks_dir, tmp_path):
    """The real entry with configs/train/mix_tiny.yaml on the tiny task folder: 2 steps of batch 4
    (shuffled mix), export, and the export answers an image, a video, an audio clip and a passage."""
    out = tmp_path / "run"
    t = tiny_tasks_dir
    cmd = [sys.executable, "-m", "llava_deft.train", "--config", "configs/train/mix_tiny.yaml", "--output_dir", str(out),
           "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1", "num_workers=0",
           "model.video.num_frames=4", "data.sources.0.limit=16",
           f"data.sources.1.path={t}/video_shapes/train.json", f"data.sources.2.path={t}/audio_words/train.json",
           "data.sources.3.size=12"]  # pass-key passages generated on the fly
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert "[train] data: mix of 4 sources (easyvqa 4, video_shapes 30, audio_words 42, passkey 12)" in res.stdout
    assert "frozen vision=False llm=False audio=False" in res.stdout
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log)

    import llava_deft

    model = llava_deft.load_model(out / "final", device="cpu")
    assert model.model.config.audio.enabled and model.model.config.video.num_frames == 4
    from PIL import Image

    answers = model.generate(
        ["what color?", "which way?", "what number?", "what is the pass key?"],
        images=[[Image.new("RGB", (64, 64), "red")], [], [], []],
        videos=[[], [t / "video_shapes" / "test" / "clips" / "00000.mp4"], [], []],
        audios=[[], [], [t / "audio_words" / "test" / "clips" / "000000.wav"], []],
        texts=[[], [], [], ["The pass key is 12345. Remember it."]],
        max_new_tokens=3,
    )
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
