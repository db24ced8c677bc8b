"""Audio loading, log-mel features, the Whisper-style encoder and the espeak-ng audio task (CPU, fast)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file

from llava_deft.encoders.audio import AudioEncoder, build_feature_extractor, load_audio, log_mel
from llava_deft.data import LlavaJsonDataset
from llava_deft.errors import AudioError, CheckpointError, MediaFileError
from llava_deft.tasks.audio_words import clip_spec, espeak_version, generate_audio_task

FIXTURES = Path(__file__).parent / "fixtures" / "audio_task"
HAS_ESPEAK = espeak_version() is not None


def sine(freq: float, rate: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


# ------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_load_wav_and_flac_at_16k(tmp_path, fmt):
    wave = sine(440, 16000)
    path = tmp_path / f"a.{fmt}"
    sf.write(path, wave, 16000)
    out = load_audio(path)
    assert out.dtype == torch.float32 and out.shape == (16000,)
    assert torch.allclose(out, torch.from_numpy(wave), atol=1e-4)  # PCM-16 quantisation


def test_stereo_is_downmixed_to_mono(tmp_path):
    left, right = sine(440, 16000), sine(880, 16000)
    sf.write(tmp_path / "s.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    out = load_audio(tmp_path / "s.wav")
    assert out.shape == (16000,)
    assert torch.allclose(out, torch.from_numpy((left + right) / 2), atol=1e-6)


@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_resampling_keeps_length_and_frequency(tmp_path, rate):
    n = int(rate * 1.3) + 7  # not a whole number of output samples
    wave = sine(1000, rate, n / rate)
    sf.write(tmp_path / "r.flac", wave, rate)
    out = load_audio(tmp_path / "r.flac").numpy()
    assert abs(len(out) - n * 16000 / rate) <= 1
    assert abs(peak_hz(out, 16000) - 1000) <= 16000 / len(out)  # within one FFT bin
    middle = out[len(out) // 4 : 3 * len(out) // 4]  # the cut ends ring (Gibbs)
    assert abs(np.abs(middle).max() - 0.5) < 0.01  # amplitude kept


def test_load_audio_other_target_rate(tmp_path):
    sf.write(tmp_path / "a.wav", sine(300, 16000), 16000)
    assert load_audio(tmp_path / "a.wav", sampling_rate=8000).shape == (8000,)


def test_missing_file_is_a_file_not_found_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.wav.*does not exist"):
        load_audio(tmp_path / "nope.wav")


def test_empty_audio_raises(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match=r"empty\.wav.*empty \(0 samples\)"):
        load_audio(tmp_path / "empty.wav")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_audio_raises(tmp_path, bad):
    wave = sine(440, 16000)
    wave[100:103] = bad
    sf.write(tmp_path / "nan.wav", wave, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan\.wav.*3 non-finite"):
        load_audio(tmp_path / "nan.wav")


@pytest.mark.parametrize("content", [b"", b"RIFF\x00\x00\x00\x00WAVEnot audio at all", b"fLaC" + bytes(range(200))])
def test_corrupt_audio_raises(tmp_path, content):
    path = tmp_path / "broken.flac"
    path.write_bytes(content)
    with pytest.raises(AudioError, match=r"broken\.flac.*cannot be decoded") as info:
        load_audio(path)
    assert isinstance(info.value, MediaFileError) and info.value.path == str(path)
    again = pickle.loads(pickle.dumps(info.value))  # as a DataLoader worker re-raises it
    assert type(again) is AudioError and str(again) == str(info.value)


# ------------------------------------------------------------------------------------------ features


def test_feature_extractor_shape_and_chunk():
    ext = build_feature_extractor(num_mel_bins=80, chunk_length=5)
    feats = log_mel([torch.from_numpy(sine(440, 16000)), np.zeros(100, np.float32)], ext)
    assert feats.shape == (2, 80, 500) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    assert log_mel([np.zeros(16000, np.float32)], build_feature_extractor(64, 2)).shape == (1, 64, 200)


def test_too_long_clip_is_refused_unless_truncated():
    ext = build_feature_extractor(chunk_length=1)
    long = np.zeros(16001, np.float32)
    with pytest.raises(ValueError, match="longer than the 1 s chunk"):
        log_mel([long], ext)
    assert log_mel([long], ext, truncate=True).shape == (1, 80, 100)


# ------------------------------------------------------------------------------------------- encoder


def test_audio_encoder_shapes_and_layout():
    torch.manual_seed(0)
    enc = AudioEncoder().eval()
    assert enc.width == 128 and enc.num_tokens == 250 and enc.layout == (250, 1, 1)
    feats = enc.features([torch.from_numpy(sine(440, 16000)), torch.zeros(8000)])
    tokens = enc(feats)
    assert tokens.shape == (2, 250, 128) and torch.isfinite(tokens).all()
    pooled = AudioEncoder({"d_model": 64, "encoder_attention_heads": 2, "num_mel_bins": 64}, pool_stride=4)
    feats = pooled.features([torch.zeros(4000)])
    assert feats.shape == (1, 64, 500)
    assert pooled(feats).shape == (1, 63, 64) and pooled.layout == (63, 1, 1)  # ceil(250 / 4)


@pytest.mark.parametrize("pool_stride", [1, 2, 3])
def test_processor_token_counts_match_the_feature_extractor_mask(pool_stride):
    """num_tokens(S) = ceil(ceil(mask frames / 2) / pool_stride), the mask being WhisperFeatureExtractor's."""
    enc = AudioEncoder({"chunk_length": 1}, pool_stride=pool_stride)
    proc = enc.processor
    assert (proc.sampling_rate, proc.max_samples, proc.max_tokens) == (16000, 16000, enc.num_tokens)
    lengths = [1, 159, 160, 161, 320, 321, 4800, 15999, 16000]
    mask = proc.feature_extractor([np.zeros(n, np.float32) for n in lengths], sampling_rate=16000,
                                  padding="max_length", return_attention_mask=True)["attention_mask"]
    frames = mask.sum(1)
    expected = [-(-(-(-int(f) // 2)) // pool_stride) for f in frames]
    assert [proc.num_tokens(n) for n in lengths] == expected
    assert proc.num_tokens(torch.tensor(lengths)).tolist() == expected
    assert proc.num_tokens(10**6) == enc.num_tokens  # at most the chunk
    assert pickle.loads(pickle.dumps(proc)).num_tokens(4800) == proc.num_tokens(4800)  # DataLoader workers


def test_pooling_averages_the_unpooled_tokens():
    torch.manual_seed(0)
    enc = AudioEncoder({"chunk_length": 1}).eval()
    feats = torch.randn(2, 80, 100)
    full = enc(feats)  # (2, 50, 128)
    enc.pool_stride = 5
    assert torch.allclose(enc(feats), full.view(2, 10, 5, 128).mean(2), atol=1e-6)


def test_audio_encoder_gradients_flow():
    torch.manual_seed(0)
    enc = AudioEncoder({"chunk_length": 1}, pool_stride=2).train()
    feats = torch.randn(2, 80, 100, requires_grad=True)
    enc(feats).square().mean().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    trainable = [(n, p) for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_audio_encoder_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = AudioEncoder({"chunk_length": 1}).eval()
    path = tmp_path / "audio.safetensors"
    enc.save_weights(path)
    torch.manual_seed(1)
    other = AudioEncoder({"chunk_length": 1}).eval()
    feats = torch.randn(2, 80, 100)
    assert not torch.equal(enc(feats), other(feats))
    loaded = AudioEncoder({"chunk_length": 1}, weights=path).eval()
    assert torch.equal(enc(feats), loaded(feats))


def test_whisper_checkpoint_keys_and_longer_position_table(tmp_path):
    """A Whisper model's ``model.encoder.*`` keys load; its 30 s position table is cut to the chunk."""
    torch.manual_seed(0)
    full = AudioEncoder({"chunk_length": 30}).eval()  # 1500 positions
    save_file({f"model.encoder.{k}": v.contiguous() for k, v in full.encoder.state_dict().items()},
              str(tmp_path / "whisper.safetensors"))
    short = AudioEncoder({"chunk_length": 1}, weights=tmp_path / "whisper.safetensors")
    assert torch.equal(short.encoder.embed_positions.weight, full.encoder.embed_positions.weight[:50])
    assert torch.equal(short.encoder.conv1.weight, full.encoder.conv1.weight)


def test_weights_errors(tmp_path):
    AudioEncoder({"chunk_length": 1}).save_weights(tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="do not match.*shape mismatches"):
        AudioEncoder({"chunk_length": 1, "d_model": 64}, weights=tmp_path / "w.safetensors")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickles are never loaded"):
        AudioEncoder(weights=tmp_path / "w.bin")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        AudioEncoder(weights=tmp_path / "nope.safetensors")


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown audio config key\(s\) \['d_modle'\]"):
        AudioEncoder({"d_modle": 64})
    with pytest.raises(ValueError, match="max_source_positions 1500 does not match"):
        AudioEncoder({"max_source_positions": 1500})
    with pytest.raises(ValueError, match="pool_stride"):
        AudioEncoder(pool_stride=0)
    with pytest.raises(ValueError, match=r"expected \(B, 80, 500\)"):
        AudioEncoder()(torch.zeros(1, 80, 3000))


# -------------------------------------------------------------------------------------- task + fixtures


def test_clip_spec_is_a_pure_function_of_seed_split_index():
    assert clip_spec(0, "train", 5) == clip_spec(0, "train", 5)
    specs = [clip_spec(0, "train", i) for i in range(50)]
    assert len({(s.text, s.voice, s.speed, s.pitch) for s in specs}) == 50
    assert [clip_spec(1, "train", i) for i in range(50)] != specs
    for s in specs:
        assert s.answers and all(a in s.text.split() or a + "s" in s.text.split() for a in s.answers.values())


@pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_generator_is_deterministic(tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != "meta.json"}

    generate_audio_task(tmp_path / "a", n_train=4, n_test=2, seed=3, workers=1, progress=False)
    generate_audio_task(tmp_path / "b", n_train=4, n_test=2, seed=3, workers=4, progress=False)
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert len([k for k in a if k.endswith(".wav")]) == 6 and a == b
    generate_audio_task(tmp_path / "c", n_train=4, n_test=2, seed=4, workers=2, progress=False)
    assert files(tmp_path / "c") != a


@pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_committed_fixtures_regenerate_byte_for_byte(tmp_path):
    meta = json.loads((FIXTURES / "meta.json").read_text())
    if meta["espeak_ng"] != espeak_version():
        pytest.skip(f"fixtures were made with {meta['espeak_ng']!r}, this machine has {espeak_version()!r}")
    generate_audio_task(tmp_path, meta["n_train"], meta["n_test"], meta["seed"], progress=False)
    for p in sorted(FIXTURES.rglob("*")):
        if p.is_file() and p.name != "meta.json":
            assert (tmp_path / p.relative_to(FIXTURES)).read_bytes() == p.read_bytes(), p


def test_committed_fixtures_load_and_match_their_json():
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < 1_000_000
    meta = json.loads((FIXTURES / "meta.json").read_text())
    enc = AudioEncoder()
    for split in ("train", "test"):
        clips = {c["audio"]: c for c in json.loads((FIXTURES / f"{split}_clips.json").read_text())}
        records = json.loads((FIXTURES / f"{split}.json").read_text())
        assert len(clips) == meta["splits"][split]["clips"] and len(records) == meta["splits"][split]["samples"]
        assert len(LlavaJsonDataset(FIXTURES / f"{split}.json")) == len(records)  # valid LLaVA JSON
        assert {r["audio"] for r in records} == set(clips)
        waves = {}
        for rel, clip in clips.items():
            wave = load_audio(FIXTURES / rel)
            assert sf.info(str(FIXTURES / rel)).samplerate == 16000
            assert abs(len(wave) / 16000 - clip["seconds"]) < 1e-6 and wave.abs().max() > 0.05
            waves[rel] = wave
        for r in records:
            human, gpt = r["conversations"]
            qtype = r["id"].rsplit("-", 1)[1]
            assert human["value"].startswith("<audio>\n") and human["value"].count("<audio>") == 1
            assert qtype in human["value"] and gpt["value"] == clips[r["audio"]]["answers"][qtype]
        assert enc.features(list(waves.values())).shape == (len(waves), 80, 500)  # all fit the 5 s chunk
