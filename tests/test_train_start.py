"""How the training entry starts: data that gives no optimizer step is refused at once, and DeepSpeed's
JIT-built C++ op (the CPU accelerator's shm comm op) comes from a cache of this checkout, built once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from llava_deft.config import load_train_config
from llava_deft.errors import ConfigError
from llava_deft.train.trainer import check_batches, torch_extensions_dir

ROOT = Path(__file__).resolve().parent.parent


def train(args: list[str], env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}  # the entry's own choice
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "llava_deft.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_llava_json(root: Path, n: int) -> Path:
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        Image.new("RGB", (16, 16), (20 * i, 0, 0)).save(root / "images" / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is it?"}, {"from": "gpt", "value": "red"}]})
    js = root / "data.json"
    js.write_text(json.dumps(records))
    return js


@pytest.mark.timeout(60)
def test_data_that_gives_no_optimizer_step_is_refused_before_training(tmp_path):
    """10 records at batch 16 (drop_last) used to hang at step 0 with no message."""
    js = tiny_llava_json(tmp_path, 10)
    out = tmp_path / "run"
    res = train(["--data_path", str(js), "--image_folder", str(tmp_path / "images"), "--output_dir", str(out),
                 "--model_config", "configs/model/tiny.yaml", "--per_device_train_batch_size", "16"], timeout=55)
    assert res.returncode != 0
    assert ("ConfigError: the training data has 10 samples, fewer than one optimizer step needs: world size 1 x "
            "per_device_batch_size 16 x gradient_accumulation_steps 1 = 16 (incomplete batches are dropped); "
            "lower per_device_batch_size to at most 10, or add data") in res.stderr, res.stderr[-3000:]
    assert not out.exists()  # refused before the run folder, the process group and the engine


def test_check_batches_names_the_numbers_and_the_fix():
    cfg = load_train_config(None, ["per_device_batch_size=4", "gradient_accumulation_steps=3"])
    check_batches(24, 2, cfg)  # exactly one step
    with pytest.raises(ConfigError, match=r"has 23 samples, .* world size 2 x per_device_batch_size 4 x "
                                          r"gradient_accumulation_steps 3 = 24 .*; lower per_device_batch_size to at most 3, or add data"):
        check_batches(23, 2, cfg)
    with pytest.raises(ConfigError, match=r"has 5 samples, .*= 24 .*; lower gradient_accumulation_steps \(at most 2 with "
                                          r"per_device_batch_size 1\) or use fewer ranks, or add data"):
        check_batches(5, 2, cfg)


@pytest.mark.slow
def test_start_loads_deepspeeds_cpu_op_from_the_checkouts_cache_without_building_it(tmp_path):
    """torch's default extension folder is shared by every checkout and venv of a machine, and the op
    was rebuilt there (40-75 s on 2 cores) whenever another venv had built it last. The entry puts it
    in this checkout's ``.cache``, versioned; once built, a start runs no compiler."""
    ext = torch_extensions_dir()
    assert ext.is_relative_to(ROOT / ".cache" / "torch_extensions")
    import deepspeed
    import torch

    assert f"torch{torch.__version__}-deepspeed{deepspeed.__version__}-py" in ext.name
    # a first start builds the op there if this checkout has never built it (a fresh clone)
    warm = subprocess.run([sys.executable, "-c", "from llava_deft.train import init_distributed; init_distributed(); "
                           "import os; print(os.environ['TORCH_EXTENSIONS_DIR'])"], cwd=ROOT, capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"},
                               "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}, timeout=300)
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert warm.stdout.split()[-1] == str(ext)
    build = ext / "deepspeed_shm_comm"
    ninja_log, library = build / ".ninja_log", build / "deepspeed_shm_comm.so"
    before = (ninja_log.read_text(), library.stat().st_mtime_ns)
    res = train(["--config", "configs/train/easyvqa_tiny.yaml", "--output_dir", str(tmp_path / "run"),
                 "stages.0.max_steps=1", "data.limit=8", "per_device_batch_size=4", "model=configs/model/tiny.yaml"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stage 0 (finetune): 1 steps" in res.stdout
    assert (ninja_log.read_text(), library.stat().st_mtime_ns) == before  # ninja compiled nothing


@pytest.mark.timeout(120)
def test_the_training_entry_reads_with_the_model_configs_limits(tmp_path):
    """``model.limits`` reaches the training data: 16x16 images over a 100-pixel limit stop the run naming the file."""
    js = tiny_llava_json(tmp_path, 4)
    res = train(["--data_path", str(js), "--image_folder", str(tmp_path / "images"), "--output_dir", str(tmp_path / "run"),
                 "--model_config", "configs/model/tiny.yaml", "--per_device_train_batch_size", "2",
                 "stages.0.max_steps=1", "model.limits.max_image_pixels=100"], timeout=110)
    assert res.returncode != 0
    assert "MediaLimitError" in res.stderr and "0.png" in res.stderr and "max_image_pixels" in res.stderr, res.stderr[-3000:]


@pytest.mark.slow
def test_init_from_keeps_the_command_lines_model_overrides_and_swaps_the_pipeline(tmp_path):
    """`init_from=<base>/final model.pipeline=<other>` (the sweep's finetuned protocol): the run starts from
    the base's weights (its LLM frozen: exported equal to the base's) with the other pipeline, which it exports;
    the override is printed, not dropped in favour of the saved config.json."""
    from safetensors.torch import load_file

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "model": str(ROOT / "configs/model/tiny.yaml"), "data": {"type": "easyvqa", "split": "train", "limit": 16},
        "stages": [{"name": "finetune", "max_steps": 1}], "per_device_batch_size": 8, "bf16": False,
        "log_steps": 1, "deepspeed": "configs/deepspeed/zero2.json"}))
    base = train(["--config", str(recipe), "--output_dir", str(tmp_path / "base")])
    assert base.returncode == 0, base.stderr[-3000:]
    random_pipe = ROOT / "configs/pipeline/random.yaml"
    ft = train(["--config", str(recipe), "--output_dir", str(tmp_path / "ft"), f"init_from={tmp_path / 'base/final'}",
                "stages.0.freeze_llm=true", f"model.pipeline={random_pipe}"])
    assert ft.returncode == 0, ft.stderr[-3000:]
    assert f"[train] init_from {tmp_path / 'base/final'}: its config.json replaces `model:`, then model.pipeline={random_pipe}" in ft.stdout
    saved = json.loads((tmp_path / "ft/final/config.json").read_text())["pipeline"]
    assert [s["name"] for s in saved["stages"]] == ["random"], saved
    before, after = (load_file(tmp_path / d / "final/model.safetensors") for d in ("base", "ft"))
    llm = [k for k in before if k.startswith("llm.")]
    assert llm and all(after[k].equal(before[k]) for k in llm)
    assert not any(k.startswith("pipeline.") for k in after)  # random has no parameters; the base's are gone


@pytest.mark.timeout(150)
def test_profile_steps_writes_the_op_table_and_a_trace(tmp_path):
    """``profile_steps=[1,3]``: steps 2..3 run under torch.profiler; the table names the ops, the trace loads."""
    import gzip

    out = tmp_path / "run"
    res = train(["--config", "configs/train/easyvqa_tiny.yaml", "--output_dir", str(out), "stages.0.max_steps=4",
                 "data.limit=16", "per_device_batch_size=4", "model=configs/model/tiny.yaml", "profile_steps=[1,3]"],
                timeout=140)
    assert res.returncode == 0, res.stderr[-3000:]
    table = (out / "profile_stage0.txt").read_text()
    assert table.startswith("# torch.profiler over optimizer steps 2..3 (2 steps)")
    assert "## by host time (self)" in table and "aten::mm" in table  # the LLM's and the projector's matmuls
    trace = json.loads(gzip.decompress((out / "profile_stage0.json.gz").read_bytes()))
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])
    assert f"[train] profile of 2 steps: {out / 'profile_stage0.txt'}" in res.stdout


def test_profile_steps_are_checked():
    with pytest.raises(ConfigError, match=r"profile_steps must be \[first, last\] with 0 <= first < last, got \[3, 1\]"):
        load_train_config(None, ["profile_steps=[3,1]"])
