"""`python -m llava_deft.tasks`: every generated task in one folder, deterministic, cached, and a clear
stop (or a skip) when espeak-ng is missing."""

import json
import shutil

import pytest

from llava_deft.tasks import prepare
from llava_deft.tasks.prepare import MissingToolError, main, prepare_tasks

from llava_deft.tasks.audio_words import clip_spec

TINY = {
    "video_shapes": {"n_train": 2, "n_test": 1, "frames": 4},
    "passkey": {"n_train": 2, "n_test": 1, "min_tokens": 64, "max_tokens": 80},
    "audio_words": {"n_train": 2, "n_test": 1},
}


def files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_arguments_same_files_and_a_cache(tmp_path):
    a = prepare_tasks(tmp_path / "a", "small", ["video_shapes", "passkey"], progress=False, overrides=TINY)
    prepare_tasks(tmp_path / "b", "small", ["video_shapes", "passkey"], progress=False, overrides=TINY)
    fa, fb = files(tmp_path / "a"), files(tmp_path / "b")
    assert set(fa) == set(fb) and len([f for f in fa if f.endswith(".mp4")]) == 3
    assert all(fa[k] == fb[k] for k in fa if k != "tasks.json")  # the manifest names its own folder
    assert a["tasks"]["video_shapes"]["records"] == {"train": 10, "test": 5}  # 5 questions per clip
    assert a["tasks"]["passkey"]["records"] == {"train": 2, "test": 1}
    manifest = json.loads((tmp_path / "a" / "tasks.json").read_text())
    assert manifest["tasks"]["passkey"]["args"] == {**TINY["passkey"], "seed": 0} and manifest["preset"] == "small"

    again = prepare_tasks(tmp_path / "a", "small", ["video_shapes", "passkey"], progress=False, overrides=TINY)
    assert {t: m["status"] for t, m in again["tasks"].items()} == {"video_shapes": "cached", "passkey": "cached"}
    # other arguments regenerate, and nothing of the larger run survives
    fewer = {**TINY, "video_shapes": {**TINY["video_shapes"], "n_train": 1}}
    redo = prepare_tasks(tmp_path / "a", "small", ["video_shapes"], progress=False, overrides=fewer)
    assert redo["tasks"]["video_shapes"]["status"] == "generated"
    assert sorted(p.name for p in (tmp_path / "a" / "video_shapes" / "train" / "clips").iterdir()) == ["00000.mp4"]
    assert prepare_tasks(tmp_path / "a", "small", ["video_shapes"], progress=False, overrides=fewer, force=True)[
        "tasks"]["video_shapes"]["status"] == "generated"


def test_missing_espeak_stops_before_writing_or_is_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare.shutil, "which", lambda name: None)
    with pytest.raises(MissingToolError, match=r"espeak-ng is not installed.*sudo apt-get install -y espeak-ng.*--skip-missing"):
        prepare_tasks(tmp_path / "t", "small", progress=False, overrides=TINY)
    assert not (tmp_path / "t").exists()
    assert main(["--out", str(tmp_path / "t"), "--preset", "small", "--only", "audio_words"]) == 2
    assert "apt-get install -y espeak-ng" in capsys.readouterr().err

    done = prepare_tasks(tmp_path / "t", "small", skip_missing=True, progress=False, overrides=TINY)
    assert done["tasks"]["audio_words"]["status"] == "skipped"
    assert {t: m["status"] for t, m in done["tasks"].items() if t != "audio_words"} == {
        "video_shapes": "generated", "passkey": "generated"}
    assert not (tmp_path / "t" / "audio_words").exists()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_audio_task_with_espeak(tmp_path):
    done = prepare_tasks(tmp_path, "small", ["audio_words"], progress=False, overrides=TINY)
    assert done["tasks"]["audio_words"]["status"] == "generated"
    records = json.loads((tmp_path / "audio_words" / "test.json").read_text())
    # one record per question of each test clip: as many as the clip specs hold answers
    want = sum(len(clip_spec(0, "test", i).answers) for i in range(TINY["audio_words"]["n_test"]))
    assert want >= 1 and len(records) == done["tasks"]["audio_words"]["records"]["test"] == want
    assert all((tmp_path / "audio_words" / r["audio"]).is_file() for r in records)
    assert prepare_tasks(tmp_path, "small", ["audio_words"], progress=False, overrides=TINY)[
        "tasks"]["audio_words"]["status"] == "cached"


def test_unknown_task_and_preset():
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['vidoe'\]; the tasks are"):
        prepare_tasks("unused", "small", ["vidoe"])
    with pytest.raises(ValueError, match=r"unknown preset 'tiny'; the presets are \['full', 'small'\]"):
        prepare_tasks("unused", "tiny")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_flac_clips_hold_the_same_samples_as_wav(tmp_path):
    from llava_deft.encoders.audio import load_audio

    prepare_tasks(tmp_path / "wav", "small", ["audio_words"], progress=False, overrides=TINY)
    flac = {"audio_words": {**TINY["audio_words"], "audio_format": "flac"}}
    prepare_tasks(tmp_path / "flac", "small", ["audio_words"], progress=False, overrides=flac)
    wav_records = json.loads((tmp_path / "wav" / "audio_words" / "train.json").read_text())
    flac_records = json.loads((tmp_path / "flac" / "audio_words" / "train.json").read_text())
    assert [r["audio"].replace(".wav", ".flac") for r in wav_records] == [r["audio"] for r in flac_records]
    assert all(r["audio"].endswith(".flac") for r in flac_records)
    for w, f in zip(wav_records, flac_records):
        a = load_audio(tmp_path / "wav" / "audio_words" / w["audio"])
        b = load_audio(tmp_path / "flac" / "audio_words" / f["audio"])
        assert a.shape == b.shape and a.numel() > 0 and bool((a == b).all())  # lossless
    assert json.loads((tmp_path / "flac" / "audio_words" / "meta.json").read_text())["audio_format"] == "flac"
    with pytest.raises(ValueError, match=r"audio_format='mp3': choose one of \['wav', 'flac'\]"):
        prepare_tasks(tmp_path / "mp3", "small", ["audio_words"], progress=False,
                      overrides={"audio_words": {**TINY["audio_words"], "audio_format": "mp3"}})
