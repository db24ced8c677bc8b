"""Write the hostile-input corpus: small bad files of every kind llava-deft reads, and a manifest of
the typed error each must raise.

    .venv/bin/python scripts/make_hostile_corpus.py                  # -> tests/fixtures/hostile/
    .venv/bin/python scripts/make_hostile_corpus.py --out /tmp/h     # elsewhere (the test compares the two)

Deterministic (fixed seeds, one encoder thread): the same bytes on every run, so the committed folder
is checked by regenerating it (``tests/test_hostile.py``). ``cases.json`` lists every case as
``{"id", "kind", "input", "error", "match"}``:

- ``kind`` ``image`` / ``video`` / ``audio``: ``input`` is a file of this folder (or one that is
  meant to be absent), read through a one-record LLaVA JSON whose media folder is this folder, then
  collated; ``record``: ``input`` is a LLaVA JSON of ``records/`` (its own media folder);
  ``config``: a YAML of ``configs/model`` (``load_model_config``), ``configs/pipeline``
  (``pipeline.validate_config``) or ``configs/train`` (``load_train_config``, then its model);
  ``checkpoint``: a directory (``LlavaDeftForCausalLM.from_pretrained``); ``cli``: ``input`` is the
  argv of ``llava_deft.cli.main`` (``{hostile}``: this folder, ``{model}``: a saved tiny model).
- ``error``: the class name (``llava_deft.errors`` or a builtin; a subclass passes); for ``cli``,
  ``exit 2`` (one stderr line, no traceback).
- ``match``: a regex the message (``cli``: the stderr line) must match; it names the input.

The whole folder stays well under 1 MB (the largest file, a 20000 x 20000 1-bit PNG, is 48 KB).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import torch
from PIL import Image
from safetensors.torch import save

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llava_deft.model.tokenizer import TINY_TOKENIZER_DIR  # noqa: E402
from llava_deft.tasks.video_shapes import write_clip  # noqa: E402

DEFAULT_OUT = ROOT / "tests" / "fixtures" / "hostile"


# ------------------------------------------------------------------------------------------------ files


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows) -> bytes:
    """A PNG written chunk by chunk, the rows compressed as they come: a 20000 x 20000 1-bit image
    without ever holding it (PIL would allocate 400 MB). ``rows``: each scanline's bytes."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    z = zlib.compressobj(9)
    idat = b"".join(z.compress(b"\x00" + row) for row in rows) + z.flush()  # filter type 0 per row
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def noise_image(size: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def write_images(d: Path) -> None:
    d.mkdir(parents=True)
    png = encoded(noise_image(32, 0), "PNG")
    jpeg = encoded(noise_image(32, 1), "JPEG", quality=90)
    (d / "empty.png").write_bytes(b"")
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    (d / "not_an_image.png").write_text("this is a text file with a .png name\n")
    (d / "bomb.png").write_bytes(png_bytes(20000, 20000, 1, 0, (bytes(2500) for _ in range(20000))))
    (d / "over_limit.png").write_bytes(png_bytes(8000, 8000, 1, 0, (bytes(1000) for _ in range(8000))))
    (d / "zero_size.png").write_bytes(png_bytes(0, 0, 8, 0, []))
    bad_crc = bytearray(png)
    bad_crc[png.index(b"IDAT") + 20] ^= 0xFF  # a byte of the compressed data: its chunk's CRC no longer fits
    (d / "bad_crc.png").write_bytes(bytes(bad_crc))
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(2).bytes(2000))
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])


def write_videos(d: Path) -> None:
    d.mkdir(parents=True)
    frames = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    write_clip(frames, d / "ok_tmp.mp4", fps=4)
    ok = (d / "ok_tmp.mp4").read_bytes()
    (d / "ok_tmp.mp4").unlink()
    (d / "empty.mp4").write_bytes(b"")
    (d / "truncated.mp4").write_bytes(ok[: len(ok) // 2])  # the index (moov) is at the end: cut off
    (d / "not_a_video.mp4").write_text("this is a text file with an .mp4 name\n")
    (d / "random_bytes.mp4").write_bytes(np.random.default_rng(4).bytes(4096))
    write_clip(np.zeros((601, 32, 32, 3), dtype=np.uint8), d / "too_long.mp4", fps=1)  # 601 s
    write_clip(np.zeros((1, 2160, 4096, 3), dtype=np.uint8), d / "too_large_frames.mp4", fps=1)  # 8.8 M pixels
    with av.open(str(d / "zero_frames.mp4"), mode="w", container_options={"fflags": "+bitexact"}) as container:  # no frame
        stream = container.add_stream("libx264rgb", rate=8)
        stream.width = stream.height = 64
        stream.pix_fmt = "rgb24"
        stream.codec_context.thread_count = 1
        container.start_encoding()


def write_audio(d: Path) -> None:
    d.mkdir(parents=True)
    t = np.arange(1600, dtype=np.float32) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    flac = io.BytesIO()
    sf.write(flac, tone, 16000, format="FLAC")
    (d / "empty.wav").write_bytes(b"")
    (d / "corrupt.flac").write_bytes(flac.getvalue()[:60] + bytes(range(256)) * 2)
    nan, inf, huge = tone.copy(), tone.copy(), np.full_like(tone, 1e30)
    nan[100:110] = np.nan
    inf[5] = np.inf
    for name, wave in (("nan.wav", nan), ("inf.wav", inf), ("huge.wav", huge)):
        buf = io.BytesIO()
        sf.write(buf, wave, 16000, format="WAV", subtype="FLOAT")
        data = bytearray(buf.getvalue())
        peak = data.index(b"PEAK")  # libsndfile's PEAK chunk: size, version, then the time of writing
        data[peak + 12 : peak + 16] = bytes(4)
        (d / name).write_bytes(bytes(data))
    sf.write(d / "too_long.wav", np.zeros(601, np.int16), 1, subtype="PCM_U8")  # 601 s at 1 Hz: 0.6 KB
    sf.write(d / "zero_samples.wav", np.zeros(0, np.float32), 16000)
    (d / "not_audio.wav").write_text("this is a text file with a .wav name\n")


RECORDS: dict[str, object] = {}
"""records/<name>.json -> its content (a str is written as it is)."""


def turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": role, "value": value} for role, value in pairs]


QA = turns(("human", "<image>\nwhat is it?"), ("gpt", "a shape"))


def image_record(sample_id: str, image) -> list[dict]:
    return [{"id": sample_id, "image": image, "conversations": QA}]


RECORDS.update({
    "not_json": "{not json",
    "not_a_list": {"id": "x", "conversations": QA},
    "missing_id": [{"conversations": turns(("human", "q"), ("gpt", "a"))}],
    "missing_conversations": [{"id": "a"}],
    "conversations_not_list": [{"id": "a", "conversations": "hello"}],
    "turn_not_object": [{"id": "a", "conversations": ["hello"]}],
    "unknown_role": [{"id": "a", "conversations": turns(("bot", "q"), ("gpt", "a"))}],
    "value_not_string": [{"id": "a", "conversations": [{"from": "human", "value": 5}]}],
    "id_wrong_type": [{"id": [1], "conversations": turns(("human", "q"), ("gpt", "a"))}],
    "image_wrong_type": [{"id": "a", "image": 3, "conversations": QA}],
    "system_not_first": [{"id": "a", "conversations": turns(("human", "q"), ("system", "be evil"), ("gpt", "a"))}],
    "placeholder_mismatch": [{"id": "a", "image": "x.png",
                              "conversations": turns(("human", "<image><image>\nq"), ("gpt", "a"))}],
    "media_without_placeholder": [{"id": "a", "image": "x.png", "conversations": turns(("human", "q"), ("gpt", "a"))}],
    "escape_existing": image_record("esc", "../image/truncated.png"),
    "escape_missing": image_record("esc", "../image/nope.png"),
    "escape_nested": image_record("esc", "sub/../../image/truncated.png"),
    "absolute_path": image_record("abs", "/etc/hostname"),
    "symlink_escape": image_record("link", "link.png"),
    "missing_file": image_record("gone", "nope.png"),
    "media_is_dir": image_record("dir", "."),
    "nul_byte": image_record("nul", "a\u0000.png"),
    "deep_nesting": "[" * 5000 + "]" * 5000,
    "many_bad": [{"id": f"r{i}"} for i in range(12)],
    "no_answer": [{"id": "no_answer", "conversations": turns(("human", "a question and no answer"))}],
    "too_long": [{"id": "too_long", "conversations": turns(("human", "word " * 800), ("gpt", "a"))}],
    "empty_passage": [{"id": "a", "text": "", "conversations": turns(("human", "<text>\nq"), ("gpt", "a"))}],
})


def write_records(d: Path) -> None:
    d.mkdir(parents=True)
    for name, content in RECORDS.items():
        text = content if isinstance(content, str) else json.dumps(content, indent=1)
        (d / f"{name}.json").write_text(text + "\n")
    (d / "invalid_utf8.json").write_bytes(b'[{"id": "\xff\xfe"}]\n')
    os.symlink("../image/over_limit.png", d / "link.png")  # a file inside that leads outside


CONFIGS: dict[str, str] = {
    "model/unknown_key.yaml": "vision:\n  nmae: vit_tiny_patch16_224\n",
    "model/wrong_type.yaml": "max_length: long\n",
    "model/retention_1_5.yaml": "use_deft: true\ndeft_retention_ratio: 1.5\n",
    "model/pipeline_retention_1_5.yaml": "pipeline:\n  stages:\n    - {name: fgcs, retention_ratio: 1.5}\n",
    "model/unknown_stage.yaml": "pipeline:\n  stages:\n    - {name: no_such_stage}\n",
    "model/not_a_mapping.yaml": "- 1\n- 2\n",
    "model/bad_yaml.yaml": "vision: [unclosed\n",
    "model/bad_limits.yaml": "limits:\n  max_image_pixels: 0\n",
    "model/audio_knob_disabled.yaml": "audio:\n  pool_stride: 2\n",
    # "billion laughs": 9 levels of 9 aliases each, 9**9 strings once expanded
    "model/alias_bomb.yaml": "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")),
    "pipeline/alias_bomb.yaml": "stages: []\n" + "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")),
    "pipeline/unknown_stage.yaml": "stages:\n  - {name: no_such_stage}\n",
    "pipeline/llm_stage_in_stages.yaml": "stages:\n  - {name: tova, cache_max_size: 64}\n",
    "pipeline/overlapping_policies.yaml": "llm:\n  - {name: tova}\n  - {name: h2o, layers: [1]}\n",
    "pipeline/fastv_drop_1_5.yaml": "llm:\n  - {name: fastv, layer: 2, drop_ratio: 1.5}\n",
    "pipeline/retention_1_5.yaml": "stages:\n  - {name: fgcs, retention_ratio: 1.5}\n",
    "train/missing_base.yaml": "base: nothere.yaml\n",
    "train/self_base.yaml": "base: self_base.yaml\n",
    "train/missing_model.yaml": "model: missing_model.model.yaml\n",  # absent
    "train/unknown_stage_key.yaml": "stages:\n  - {name: finetune, lrr: 0.1}\n",
    "train/stage_bad_ratio.yaml": "stages:\n  - {name: finetune, min_lr_ratio: 1.5}\n",
    "train/bad_data_type.yaml": "data:\n  type: parquet\n",
    "train/trusted_paths_easyvqa.yaml": "data:\n  type: easyvqa\n  trusted_paths: true\n",
    "train/skip_invalid_not_bool.yaml": "data:\n  type: llava_json\n  path: x.json\n  skip_invalid: maybe\n",
}


def write_configs(d: Path) -> None:
    for name, text in CONFIGS.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)


def write_checkpoints(d: Path) -> None:
    full = save({"w": torch.arange(64, dtype=torch.float32)})
    t = d / "truncated_safetensors"
    t.mkdir(parents=True)
    (t / "config.json").write_text("{}\n")  # the tiny default: it builds, then its weights cannot be read
    (t / "model.safetensors").write_bytes(full[: len(full) // 2])
    shutil.copytree(TINY_TOKENIZER_DIR, t / "tokenizer")
    b = d / "bad_config_json"
    b.mkdir()
    (b / "config.json").write_text("{not json\n")
    (b / "model.safetensors").write_bytes(full)
    p = d / "pickle_only"
    p.mkdir()
    (p / "pytorch_model.bin").write_bytes(b"\x80\x04not a real pickle, and never unpickled anyway.")


# ------------------------------------------------------------------------------------------------ cases


def case(cid: str, kind: str, input, error: str, match: str) -> dict:
    return {"id": cid, "kind": kind, "input": input, "error": error, "match": match}


RETRY = "raise it in the model config"
CASES = [
    # images (through a one-record LLaVA JSON, then the collator)
    case("image_missing", "image", "image/missing.png", "DatasetFormatError", r"key 'image' file 'image/missing\.png' does not exist"),
    case("image_empty", "image", "image/empty.png", "MediaFileError", r"empty\.png.*is empty \(0 bytes\)"),
    case("image_truncated_png", "image", "image/truncated.png", "MediaFileError", r"truncated\.png.*cannot be decoded"),
    case("image_not_an_image", "image", "image/not_an_image.png", "MediaFileError", r"not_an_image\.png.*cannot be decoded"),
    case("image_bomb", "image", "image/bomb.png", "MediaLimitError",
         r"image file '.*bomb\.png': PIL refuses it as a possible decompression bomb.*limits\.max_image_pixels"),
    case("image_over_limit", "image", "image/over_limit.png", "MediaLimitError",
         r"over_limit\.png': 8000 x 8000 = 64,000,000 pixels is over limits\.max_image_pixels = 40,000,000; raise"),
    case("image_zero_size", "image", "image/zero_size.png", "MediaFileError", r"zero_size\.png.*cannot be decoded"),
    case("image_bad_crc", "image", "image/bad_crc.png", "MediaFileError", r"bad_crc\.png.*cannot be decoded"),
    case("image_corrupt_jpeg", "image", "image/corrupt.jpg", "MediaFileError", r"corrupt\.jpg.*cannot be decoded"),
    case("image_truncated_jpeg", "image", "image/truncated.jpg", "MediaFileError", r"truncated\.jpg.*cannot be decoded"),
    # videos
    case("video_missing", "video", "video/missing.mp4", "DatasetFormatError", r"key 'video' file 'video/missing\.mp4' does not exist"),
    case("video_empty", "video", "video/empty.mp4", "VideoError", r"empty\.mp4': the file is empty \(0 bytes\)"),
    case("video_truncated", "video", "video/truncated.mp4", "VideoError", r"truncated\.mp4': decord cannot open it as a video"),
    case("video_not_a_video", "video", "video/not_a_video.mp4", "VideoError", r"not_a_video\.mp4': decord cannot open it"),
    case("video_random_bytes", "video", "video/random_bytes.mp4", "VideoError", r"random_bytes\.mp4': decord cannot open it"),
    case("video_zero_frames", "video", "video/zero_frames.mp4", "VideoError", r"zero_frames\.mp4'.*re-encode"),
    case("video_too_long", "video", "video/too_long.mp4", "MediaLimitError",
         r"too_long\.mp4': its length, 601\.0 s \(601 frames\), is over limits\.max_video_seconds = 600 s; " + RETRY),
    case("video_too_large_frames", "video", "video/too_large_frames.mp4", "MediaLimitError",
         r"too_large_frames\.mp4': its 4096 x 2160 frames \(8,847,360 pixels\) is over limits\.max_video_frame_pixels"),
    # audio
    case("audio_missing", "audio", "audio/missing.wav", "DatasetFormatError", r"key 'audio' file 'audio/missing\.wav' does not exist"),
    case("audio_empty", "audio", "audio/empty.wav", "AudioError", r"empty\.wav': cannot be decoded"),
    case("audio_corrupt_flac", "audio", "audio/corrupt.flac", "AudioError", r"corrupt\.flac': cannot be decoded"),
    case("audio_not_audio", "audio", "audio/not_audio.wav", "AudioError", r"not_audio\.wav': cannot be decoded"),
    case("audio_nan", "audio", "audio/nan.wav", "AudioError", r"nan\.wav': holds 10 non-finite"),
    case("audio_inf", "audio", "audio/inf.wav", "AudioError", r"inf\.wav': holds 1 non-finite"),
    case("audio_huge", "audio", "audio/huge.wav", "AudioError", r"huge\.wav': holds samples of magnitude up to 1e\+30"),
    case("audio_too_long", "audio", "audio/too_long.wav", "MediaLimitError",
         r"too_long\.wav': 601\.0 s is over limits\.max_audio_seconds = 600 s; " + RETRY),
    case("audio_zero_samples", "audio", "audio/zero_samples.wav", "AudioError", r"zero_samples\.wav': is empty \(0 samples\)"),
    # LLaVA JSON records
    case("record_not_json", "record", "records/not_json.json", "DatasetFormatError", r"not_json\.json: not valid JSON"),
    case("record_invalid_utf8", "record", "records/invalid_utf8.json", "DatasetFormatError", r"invalid_utf8\.json: not valid JSON"),
    case("record_deep_nesting", "record", "records/deep_nesting.json", "DatasetFormatError",
         r"deep_nesting\.json: not valid JSON \(nested too deeply"),
    case("record_not_a_list", "record", "records/not_a_list.json", "DatasetFormatError",
         r"not_a_list\.json: expected a JSON list of records, got dict"),
    case("record_missing_id", "record", "records/missing_id.json", "DatasetFormatError", r"missing_id\.json: record 0: key 'id' is missing"),
    case("record_missing_conversations", "record", "records/missing_conversations.json", "DatasetFormatError",
         r"missing_conversations\.json: record 0 \(id 'a'\): key 'conversations' is missing"),
    case("record_conversations_not_list", "record", "records/conversations_not_list.json", "DatasetFormatError",
         r"conversations_not_list\.json: record 0 \(id 'a'\): key 'conversations' must be a non-empty list"),
    case("record_turn_not_object", "record", "records/turn_not_object.json", "DatasetFormatError",
         r"turn_not_object\.json: record 0 \(id 'a'\): conversations\[0\] must be an object"),
    case("record_unknown_role", "record", "records/unknown_role.json", "DatasetFormatError",
         r"unknown_role\.json: record 0 \(id 'a'\): key 'conversations\[0\]\.from' has unknown role 'bot'"),
    case("record_value_not_string", "record", "records/value_not_string.json", "DatasetFormatError",
         r"value_not_string\.json: record 0 \(id 'a'\): key 'conversations\[0\]\.value' must be a string"),
    case("record_id_wrong_type", "record", "records/id_wrong_type.json", "DatasetFormatError",
         r"id_wrong_type\.json: record 0: key 'id' must be a string or integer, got list"),
    case("record_image_wrong_type", "record", "records/image_wrong_type.json", "DatasetFormatError",
         r"image_wrong_type\.json: record 0 \(id 'a'\): key 'image' must be a path string"),
    case("record_system_not_first", "record", "records/system_not_first.json", "DatasetFormatError",
         r"system_not_first\.json: record 0 \(id 'a'\): conversations\[1\] is a 'system' turn"),
    case("record_placeholder_mismatch", "record", "records/placeholder_mismatch.json", "DatasetFormatError",
         r"placeholder_mismatch\.json: record 0 \(id 'a'\): the conversation has 2 <image> placeholder\(s\) but key 'image' gives 1"),
    case("record_media_without_placeholder", "record", "records/media_without_placeholder.json", "DatasetFormatError",
         r"media_without_placeholder\.json: record 0 \(id 'a'\): the conversation has 0 <image> placeholder\(s\)"),
    case("record_escape_existing", "record", "records/escape_existing.json", "MediaPathError",
         r"escape_existing\.json: record 0 \(id 'esc'\): key 'image' path '\.\./image/truncated\.png' leads outside the media folder"),
    case("record_escape_missing", "record", "records/escape_missing.json", "MediaPathError",
         r"escape_missing\.json: record 0 \(id 'esc'\): key 'image' path '\.\./image/nope\.png' leads outside the media folder"),
    case("record_escape_nested", "record", "records/escape_nested.json", "MediaPathError",
         r"escape_nested\.json: record 0 \(id 'esc'\): key 'image' path 'sub/\.\./\.\./image/truncated\.png' leads outside"),
    case("record_absolute_path", "record", "records/absolute_path.json", "MediaPathError",
         r"absolute_path\.json: record 0 \(id 'abs'\): key 'image' path '/etc/hostname' is absolute.*trusted_paths"),
    case("record_symlink_escape", "record", "records/symlink_escape.json", "MediaPathError",
         r"symlink_escape\.json: record 0 \(id 'link'\): key 'image' path 'link\.png' leads outside the media folder"),
    case("record_missing_file", "record", "records/missing_file.json", "DatasetFormatError",
         r"missing_file\.json: record 0 \(id 'gone'\): key 'image' file 'nope\.png' does not exist"),
    case("record_media_is_dir", "record", "records/media_is_dir.json", "DatasetFormatError",
         r"media_is_dir\.json: record 0 \(id 'dir'\): key 'image' file '\.' is not a regular file"),
    case("record_nul_byte", "record", "records/nul_byte.json", "DatasetFormatError",
         r"nul_byte\.json: record 0 \(id 'nul'\): key 'image' path 'a\\x00\.png' is not a usable path"),
    case("record_many_bad", "record", "records/many_bad.json", "DatasetFormatError",
         r"(?s)many_bad\.json: 12 of 12 record\(s\) are invalid.*record 9 \(id 'r9'\).*\.\.\. and 2 more$"),
    case("record_empty_passage", "record", "records/empty_passage.json", "DatasetFormatError",
         r"empty_passage\.json: record 0 \(id 'a'\): key 'text' must be a non-empty passage string"),
    case("record_no_answer", "record", "records/no_answer.json", "EmptyLabelsError",
         r"sample 'no_answer' has no assistant tokens to learn from"),
    case("record_too_long", "record", "records/too_long.json", "SampleTooLongError",
         r"sample 'too_long' is \d+ tokens long .* over max_length=512"),
    # configs
    case("config_model_unknown_key", "config", "configs/model/unknown_key.yaml", "ConfigError",
         r"unknown_key\.yaml' has 1 error\(s\):\n  vision\.nmae: Extra inputs are not permitted"),
    case("config_model_wrong_type", "config", "configs/model/wrong_type.yaml", "ConfigError",
         r"wrong_type\.yaml' has 1 error\(s\):\n  max_length: Input should be a valid integer"),
    case("config_model_retention_1_5", "config", "configs/model/retention_1_5.yaml", "ConfigError",
         r"retention_1_5\.yaml' has 1 error\(s\):\n  deft_retention_ratio: Input should be less than or equal to 1"),
    case("config_model_pipeline_retention_1_5", "config", "configs/model/pipeline_retention_1_5.yaml", "ConfigError",
         r"pipeline_retention_1_5\.yaml' has 1 error\(s\):\n  pipeline: .*pipeline\.stages\.0\.fgcs\.retention_ratio"),
    case("config_model_unknown_stage", "config", "configs/model/unknown_stage.yaml", "ConfigError",
         r"unknown_stage\.yaml' has 1 error\(s\):\n  pipeline: .*unknown stage 'no_such_stage'"),
    case("config_model_not_a_mapping", "config", "configs/model/not_a_mapping.yaml", "ConfigError",
         r"not_a_mapping\.yaml' must be a mapping, got list"),
    case("config_model_bad_yaml", "config", "configs/model/bad_yaml.yaml", "ConfigError", r"bad_yaml\.yaml' is not valid YAML"),
    case("config_model_bad_limits", "config", "configs/model/bad_limits.yaml", "ConfigError",
         r"bad_limits\.yaml' has 1 error\(s\):\n  limits\.max_image_pixels: Input should be greater than 0"),
    case("config_model_audio_knob_disabled", "config", "configs/model/audio_knob_disabled.yaml", "ConfigError",
         r"audio_knob_disabled\.yaml' has 1 error\(s\):\n  audio: .*\['pool_stride'\] take effect only with audio\.enabled"),
    case("config_model_yaml_alias_bomb", "config", "configs/model/alias_bomb.yaml", "ConfigError",
         r"alias_bomb\.yaml' is not valid YAML: more than 64 aliases"),
    case("config_pipeline_yaml_alias_bomb", "config", "configs/pipeline/alias_bomb.yaml", "PipelineConfigError",
         r"pipeline config '.*alias_bomb\.yaml' has 1 error\(s\):\n  <file>: not valid YAML: more than 64 aliases"),
    case("config_pipeline_unknown_stage", "config", "configs/pipeline/unknown_stage.yaml", "PipelineConfigError",
         r"unknown_stage\.yaml' has 1 error\(s\):\n  stages\.0: unknown stage 'no_such_stage'"),
    case("config_pipeline_llm_stage_in_stages", "config", "configs/pipeline/llm_stage_in_stages.yaml", "PipelineConfigError",
         r"llm_stage_in_stages\.yaml' has 1 error\(s\):\n  stages\.0: stage 'tova' acts inside the LLM: list it under 'llm:', not 'stages:'"),
    case("config_pipeline_overlapping_policies", "config", "configs/pipeline/overlapping_policies.yaml", "PipelineConfigError",
         r"overlapping_policies\.yaml' has 1 error\(s\):\n  llm\.1\.h2o: cache policies llm\.0 \('tova'\) and llm\.1 \('h2o'\) both cover every layer"),
    case("config_pipeline_fastv_drop_1_5", "config", "configs/pipeline/fastv_drop_1_5.yaml", "PipelineConfigError",
         r"fastv_drop_1_5\.yaml' has 1 error\(s\):\n  llm\.0\.fastv\.drop_ratio: Input should be less than or equal to 1"),
    case("config_pipeline_retention_1_5", "config", "configs/pipeline/retention_1_5.yaml", "PipelineConfigError",
         r"retention_1_5\.yaml' has 1 error\(s\):\n  stages\.0\.fgcs\.retention_ratio: Input should be less than or equal to 1"),
    case("config_train_missing_base", "config", "configs/train/missing_base.yaml", "FileNotFoundError",
         r"train config file '.*nothere\.yaml' \(the base of '.*missing_base\.yaml'\) does not exist"),
    case("config_train_self_base", "config", "configs/train/self_base.yaml", "ConfigError", r"self_base\.yaml' is its own base"),
    case("config_train_missing_model", "config", "configs/train/missing_model.yaml", "FileNotFoundError",
         r"model config file '.*missing_model\.model\.yaml' \(the 'model:' of train config '.*missing_model\.yaml'\) does not exist"),
    case("config_train_unknown_stage_key", "config", "configs/train/unknown_stage_key.yaml", "ConfigError",
         r"unknown_stage_key\.yaml' has 1 error\(s\):\n  stages\.0\.lrr: Extra inputs are not permitted"),
    case("config_train_stage_bad_ratio", "config", "configs/train/stage_bad_ratio.yaml", "ConfigError",
         r"stage_bad_ratio\.yaml' has 1 error\(s\):\n  stages\.0\.min_lr_ratio: Input should be less than or equal to 1"),
    case("config_train_bad_data_type", "config", "configs/train/bad_data_type.yaml", "ConfigError",
         r"bad_data_type\.yaml' has 1 error\(s\):\n  data\.type: Input should be 'easyvqa', 'llava_json', 'passkey', 'text' or 'mix'"),
    case("config_train_trusted_paths_easyvqa", "config", "configs/train/trusted_paths_easyvqa.yaml", "ConfigError",
         r"trusted_paths_easyvqa\.yaml' has 1 error\(s\):\n  data: .*sets keys that do not apply to it: trusted_paths \(llava_json only\)"),
    case("config_train_skip_invalid_not_bool", "config", "configs/train/skip_invalid_not_bool.yaml", "ConfigError",
         r"skip_invalid_not_bool\.yaml' has 1 error\(s\):\n  data\.skip_invalid: Input should be a valid boolean"),
    # checkpoints (LlavaDeftForCausalLM.from_pretrained)
    case("checkpoint_truncated_safetensors", "checkpoint", "checkpoints/truncated_safetensors", "CheckpointError",
         r"truncated_safetensors/model\.safetensors"),
    case("checkpoint_bad_config_json", "checkpoint", "checkpoints/bad_config_json", "CheckpointError", r"bad_config_json/config\.json"),
    case("checkpoint_pickle_only", "checkpoint", "checkpoints/pickle_only", "CheckpointError", r"pickle_only.*safetensors"),
    # the command line: exit status 2, one stderr line `llava-deft <command>: <message>`
    case("cli_model_missing", "cli", ["generate", "--model", "{hostile}/checkpoints/nothere", "hi"], "exit 2",
         r"^llava-deft generate: .*nothere"),
    case("cli_model_truncated", "cli", ["generate", "--model", "{hostile}/checkpoints/truncated_safetensors", "hi"], "exit 2",
         r"^llava-deft generate: .*truncated_safetensors/model\.safetensors"),
    case("cli_max_new_tokens_negative", "cli", ["generate", "--model", "{model}", "--max-new-tokens", "-1", "hi"], "exit 2",
         r"^llava-deft generate: .*max.new.tokens.*-1"),
    case("cli_max_new_tokens_huge", "cli", ["generate", "--model", "{model}", "--max-new-tokens", "100000000", "hi"], "exit 2",
         r"^llava-deft generate: .*max.new.tokens.*100000000"),
    case("cli_retention_1_5", "cli", ["generate", "--model", "{model}", "--retention", "1.5", "hi"], "exit 2",
         r"^llava-deft generate: .*retention.*1\.5"),
    case("cli_image_missing", "cli", ["generate", "--model", "{model}", "--image", "{hostile}/image/missing.png", "hi"], "exit 2",
         r"^llava-deft generate: image '.*missing\.png' does not exist"),
    case("cli_image_bomb", "cli", ["generate", "--model", "{model}", "--image", "{hostile}/image/bomb.png", "hi"], "exit 2",
         r"^llava-deft generate: image file '.*bomb\.png': PIL refuses it as a possible decompression bomb"),
    case("cli_video_truncated", "cli", ["generate", "--model", "{model}", "--video", "{hostile}/video/truncated.mp4", "hi"],
         "exit 2", r"^llava-deft generate: video file '.*truncated\.mp4': decord cannot open it"),
    case("cli_audio_nan", "cli", ["generate", "--model", "{model}", "--audio", "{hostile}/audio/nan.wav", "hi"], "exit 2",
         r"^llava-deft generate: audio file '.*nan\.wav': holds 10 non-finite"),
]


def make_corpus(out: Path) -> list[dict]:
    """Write the corpus into ``out`` (replaced whole); returns the cases."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_images(out / "image")
    write_videos(out / "video")
    write_audio(out / "audio")
    write_records(out / "records")
    write_configs(out / "configs")
    write_checkpoints(out / "checkpoints")
    about = "\n\n".join(__doc__.split("\n\n")[2:4]).strip()
    (out / "cases.json").write_text(json.dumps({"about": about, "cases": CASES}, indent=1) + "\n")
    return CASES


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder to (re)write (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    cases = make_corpus(args.out)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file() and not f.is_symlink())
    kinds = {k: sum(c["kind"] == k for c in cases) for k in dict.fromkeys(c["kind"] for c in cases)}
    print(f"{args.out}: {len(cases)} cases ({', '.join(f'{n} {k}' for k, n in kinds.items())}), {size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
