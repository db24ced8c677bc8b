"""The generated pass-key training source (DataSpec type passkey, ``PasskeyDataset``): the same samples
as the written JSON, inside a mix with limit and repeat, disjoint train/test keys, the config's errors,
and a 2-step run of the real training entry on it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava_deft.data import LlavaJsonDataset
from llava_deft.errors import ConfigError
from llava_deft.tasks import passkey
from llava_deft.data.passkey import PasskeyDataset
from llava_deft.config import DataSpec, load_train_config
from llava_deft.data.sources import MixedDataset, build_dataset

ROOT = Path(__file__).resolve().parent.parent


def test_items_equal_the_written_json(tmp_path):
    path = passkey.generate_split(tmp_path, "train", 5, 128, 512, seed=0, progress=False)
    written = LlavaJsonDataset(path)
    generated = PasskeyDataset(size=5, seed=0, min_tokens=128, max_tokens=512)
    assert len(generated) == len(written) == 5
    for i in range(5):
        assert generated[i] == written[i]  # id, messages, texts and the (empty) media lists
    assert generated[-1] == written[4]
    with pytest.raises(IndexError, match="index 5 out of range for 5 pass-key passages"):
        generated[5]
    # another seed or length range gives other passages
    assert PasskeyDataset(size=5, seed=1)[0]["texts"] != generated[0]["texts"]
    assert PasskeyDataset(size=5, min_tokens=64, max_tokens=96)[0]["texts"] != generated[0]["texts"]


def test_multi_needle_items_equal_make_sample(tmp_path):
    generated = PasskeyDataset(size=4, split="test", seed=2, min_tokens=128, max_tokens=256, needles=2)
    written = LlavaJsonDataset(passkey.generate_split(tmp_path, "test", 4, 128, 256, seed=2, progress=False, needles=2))
    for i in range(4):
        record = passkey.make_sample(2, "test", i, 128, 256, needles=2)
        assert generated[i] == written[i]
        assert generated[i]["texts"] == [record["text"]] and generated[i]["id"] == record["id"]
        assert [m["content"] for m in generated[i]["messages"]] == [c["value"] for c in record["conversations"]]
        assert record["needles"] == 2 and record["label"] in generated[i]["messages"][0]["content"]
    # built from a DataSpec, needles reaches the dataset
    ds = build_dataset(DataSpec(type="passkey", split="test", size=4, seed=2, min_tokens=128, max_tokens=256, needles=2))
    assert [ds[i] for i in range(4)] == [generated[i] for i in range(4)]
    assert ds[0] != PasskeyDataset(size=4, split="test", seed=2, min_tokens=128, max_tokens=256)[0]


def test_dataset_arguments_are_checked():
    with pytest.raises(ValueError, match="size must be > 0, got 0"):
        PasskeyDataset(0)
    with pytest.raises(ValueError, match="split must be one of"):
        PasskeyDataset(3, split="val")
    with pytest.raises(ValueError, match=r"max_tokens must be >= min_tokens \(200\), got 100"):
        PasskeyDataset(3, min_tokens=200, max_tokens=100)
    with pytest.raises(ValueError, match=r"needles must be >= 1 \(1 is the single-needle task\), got 0"):
        PasskeyDataset(3, needles=0)
    with pytest.raises(ValueError, match=r"min_tokens must be >= 160 for needles=4 .*got 128"):
        PasskeyDataset(3, needles=4)


def test_mix_with_a_passkey_source_limit_and_repeat():
    spec = DataSpec(type="mix", sources=[
        {"type": "passkey", "size": 7, "repeat": 2, "min_tokens": 64, "max_tokens": 96},
        {"type": "easyvqa", "limit": 3},
    ])
    ds = build_dataset(spec)
    assert isinstance(ds, MixedDataset) and ds.names == ["passkey", "easyvqa"] and ds.sizes == [14, 3]
    ids = [ds[i]["id"] for i in range(len(ds))]
    assert ids[:14] == [f"passkey-train-{i:05d}" for i in range(7)] * 2
    assert ids[14:] == [f"easyvqa-train-{i}" for i in range(3)]
    assert ds[0]["texts"] and not ds[0]["images"] and ds[14]["images"] and not ds[14].get("texts")
    # limit keeps the first passages, before repeat
    limited = build_dataset(DataSpec(type="passkey", size=7, limit=3, repeat=2, min_tokens=64, max_tokens=96))
    assert [limited[i]["id"] for i in range(len(limited))] == [f"passkey-train-{i:05d}" for i in range(3)] * 2


def test_train_and_test_keys_are_disjoint():
    keys = {}
    for split in ("train", "test"):
        ds = build_dataset(DataSpec(type="passkey", split=split, size=40, min_tokens=64, max_tokens=96))
        samples = [ds[i] for i in range(len(ds))]
        keys[split] = {s["messages"][-1]["content"] for s in samples}
        assert all(s["id"].startswith(f"passkey-{split}-") for s in samples)
        assert all(passkey.key_split(int(k)) == split for k in keys[split])
    assert len(keys["train"]) > 30 and len(keys["test"]) > 30 and not keys["train"] & keys["test"]


@pytest.mark.parametrize("source, message", [
    ("{type: passkey}", r"data\.sources\.0: .*type 'passkey' needs size"),
    ("{type: passkey, size: 0}", r"data\.sources\.0\.size: Input should be greater than 0"),
    ("{type: easyvqa, size: 5}", r"data\.sources\.0: .*type 'easyvqa' sets keys .*: size \(passkey only\)"),
    ("{type: llava_json, path: a.json, min_tokens: 256, seed: 1}",
     r"data\.sources\.0: .*'a' \(llava_json\) sets keys .*: min_tokens \(passkey only\), seed \(passkey only\)"),
    ("{type: passkey, size: 5, min_tokens: 256, max_tokens: 128}",
     r"data\.sources\.0: .*type 'passkey': max_tokens must be >= min_tokens \(256\), got 128"),
    ("{type: passkey, size: 5, min_tokens: 8, name: pk}",
     rf"data\.sources\.0: .*'pk' \(passkey\): min_tokens must be >= {passkey.MIN_TOKENS}, got 8"),
    ("{type: passkey, size: 5, path: data/tasks/passkey/train.json}",
     r"data\.sources\.0: .*type 'passkey' sets keys .*: path \(llava_json and text only\)"),
    ("{type: passkey, size: 5, group_by_image: true}", r"data\.sources\.0: .*group_by_image \(easyvqa only\)"),
    ("{type: llava_json, path: a.json, split: test}", r"split \(easyvqa, passkey and text only"),
    ("{type: passkey, size: 5, needles: 0}",
     r"data\.sources\.0: .*type 'passkey': needles must be >= 1 \(1 is the single-needle task\), got 0"),
    ("{type: passkey, size: 5, needles: 65, min_tokens: 4096, max_tokens: 4096}",
     r"data\.sources\.0: .*type 'passkey': needles must be <= 64"),
    ("{type: passkey, size: 5, needles: 4, min_tokens: 128}",
     r"data\.sources\.0: .*type 'passkey': min_tokens must be >= 160 for needles=4 .*raise min_tokens or lower needles"),
    ("{type: easyvqa, needles: 2}", r"data\.sources\.0: .*type 'easyvqa' sets keys .*: needles \(passkey only\)"),
])
def test_passkey_spec_errors(source, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, ["data.type=mix", f"data.sources=[{source}]"])


def test_passkey_spec_round_trips_through_its_dump():
    """The trainer writes cfg.model_dump() into the run folder; every source's dump must load again."""
    cfg = load_train_config(None, ["data.type=mix", "data.sources=[{type: easyvqa}, {type: passkey, size: 9, split: test, "
                                   "min_tokens: 96, max_tokens: 192, seed: 3}, {type: llava_json, path: a.json}, "
                                   "{type: passkey, name: kv, size: 4, min_tokens: 2048, max_tokens: 8192, needles: 4}]"])
    assert load_train_config(None, [f"data={json.dumps(cfg.data.model_dump())}"]) == cfg
    pk = cfg.data.sources[1]
    assert (pk.label(), pk.size, pk.split, pk.min_tokens, pk.max_tokens, pk.seed) == ("passkey", 9, "test", 96, 192, 3)
    assert (pk.needles, cfg.data.sources[3].needles, cfg.data.sources[3].max_tokens) == (1, 4, 8192)


@pytest.mark.slow
def test_two_step_run_on_a_generated_passkey_source(tmp_path):
    """The real training entry, 2 steps of batch 4 on easy-VQA + generated passages (15-25 s on 2 CPU cores)."""
    out = tmp_path / "run"
    data = {"type": "mix", "sources": [{"type": "easyvqa", "limit": 4},
                                       {"type": "passkey", "size": 8, "min_tokens": 64, "max_tokens": 96}]}
    cmd = [sys.executable, "-m", "llava_deft.train", "--config", "configs/train/easyvqa_tiny.yaml", "--output_dir", str(out),
           "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1", "num_workers=0",
           f"data={json.dumps(data)}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert "[train] data: mix of 2 sources (easyvqa 4, passkey 8)" in res.stdout
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log)
    assert (out / "final").is_dir()
