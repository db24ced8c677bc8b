"""Integration: the real training entry under DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU ranks (gloo).

Each run trains a few steps on a LLaVA-JSON dataset that mixes text-only and image samples (the
batches that hang LLaVA under ZeRO-3 when one rank skips the vision tower), checkpoints, is
interrupted, resumes from the checkpoint, exports, and the export loads through ``load_model``.
"""

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_deft.data import export_easyvqa
from llava_deft.train import ResumableSampler

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

N_IMAGE, N_TEXT = 6, 6


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    js = export_easyvqa(root, "train", limit=N_IMAGE)
    records = json.loads(js.read_text())
    for i in range(N_TEXT):
        records.append({"id": f"text-{i}", "conversations": [
            {"from": "human", "value": f"is {i} even?"}, {"from": "gpt", "value": "yes" if i % 2 == 0 else "no"}]})
    js.write_text(json.dumps(records))
    return js, root / "images"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], out: Path) -> str:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "llava_deft.train", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    (out.parent / f"{out.name}.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, f"training failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return res.stdout + res.stderr


def test_sampler_puts_text_only_and_image_batches_side_by_side():
    """With batch 1 per rank, some step has one rank on a text-only sample and the other on an image."""
    n, world, seed = N_IMAGE + N_TEXT, 2, 0
    r0 = ResumableSampler(n, 0, world, seed, epoch=0).indices
    r1 = ResumableSampler(n, 1, world, seed, epoch=0).indices
    is_text = lambda i: i >= N_IMAGE  # noqa: E731  (records after the images are text-only)
    assert any(is_text(a) != is_text(b) for a, b in zip(r0[:4], r1[:4]))
    assert sorted(r0 + r1) == list(range(n))


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_zero_train_checkpoint_resume_export_load(zero, mixed_dataset, tmp_path):
    js, images = mixed_dataset
    out = tmp_path / zero
    common = ["--data_path", str(js), "--image_folder", str(images), "--output_dir", str(out),
              "--deepspeed", f"configs/deepspeed/{zero}.json", "--per_device_train_batch_size", "1",
              "--save_steps", "2", "--logging_steps", "1", "model.pipeline.stages=[{name: sam, semantic_dim: 32}, {name: fgcs, retention_ratio: 0.25, hidden_dim: 32}]"]
    schedule = ["stages.0.retention_hold_ratio=0.25", "stages.0.retention_ramp_ratio=0.5"]
    log1 = launch([*common, "--max_steps", "4", *schedule], out)
    assert "stage 0 (finetune): 4 steps" in log1
    stage = out / "stage0_finetune"
    assert (stage / "checkpoints" / "step4").is_dir() and (stage / "checkpoints" / "step2").is_dir()
    first_export = (stage / "export" / "model.safetensors").read_bytes()
    # retention curriculum over 4 steps: hold 1 step at 1.0, ramp over 2 steps, then the target 0.25
    ratios = [json.loads(l)["retention"] for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert ratios == [[1.0], [1.0], [0.625], [0.25]]

    # interrupted after the step-4 checkpoint, before the export: resume continues from step 4
    for p in (stage / "export", out / "final"):
        subprocess.run(["rm", "-rf", str(p)], check=True)
    log2 = launch([*common, "--max_steps", "6", "--resume"], out)
    assert "resumed at step 4/6" in log2
    steps = [json.loads(l)["step"] for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # run 1 logged 1-4, the resumed run 5-6
    assert (stage / "export" / "model.safetensors").read_bytes() != first_export

    # the export carries its recipe and how it was made (the launcher's --local_rank left out)
    record = json.loads((out / "final" / "training.json").read_text())
    assert record["command"] == shlex.join(["deepspeed", "--num_gpus", "2", "-m", "llava_deft.train",
                                            *common, "--max_steps", "6", "--resume"])
    assert record["world_size"] == 2 and record["device"] == "CPU" and record["commit"]
    assert [s["steps"] for s in record["stages"]] == [6] and record["stages"][0]["final_loss"] > 0
    assert (out / "final" / "train_config.yaml").read_text() == (out / "train_config.yaml").read_text()

    import llava_deft

    model = llava_deft.load_model(out / "final", device="cpu")
    assert model.model.pipeline.names == ["sam", "fgcs"]
    answer = model.generate("is 2 even?", max_new_tokens=3)
    assert isinstance(answer, str)
    # the export holds every trained parameter at full size (ZeRO-3 partitions were gathered)
    for name, p in model.model.named_parameters():
        assert p.numel() > 0 and torch.isfinite(p).all(), name


def test_two_llava_stages_freeze_then_finetune(mixed_dataset, tmp_path):
    """Stage 1 (align) leaves LLM and encoder at their init; stage 2 starts from stage 1 and trains them."""
    from safetensors.torch import load_file

    from llava_deft.model import LlavaDeftForCausalLM
    from llava_deft.config import load_train_config

    js, images = mixed_dataset
    out = tmp_path / "two"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "llava_deft.train", "--config", "configs/train/easyvqa_two_stage.yaml",
           "--data_path", str(js), "--image_folder", str(images), "--output_dir", str(out),
           "--per_device_train_batch_size", "2", "--max_steps", "2"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    torch.manual_seed(load_train_config(ROOT / "configs/train/easyvqa_two_stage.yaml").seed)
    init = LlavaDeftForCausalLM(load_train_config(ROOT / "configs/train/easyvqa_two_stage.yaml").model).state_dict()
    s1 = load_file(str(out / "stage0_align" / "export" / "model.safetensors"))
    s2 = load_file(str(out / "stage1_finetune" / "export" / "model.safetensors"))
    frozen = [k for k in s1 if k.startswith(("llm.", "vision."))]
    assert frozen and all(torch.equal(s1[k], init[k]) for k in frozen)
    assert not torch.equal(s1["projector.0.weight"], init["projector.0.weight"])
    assert any(not torch.equal(s2[k], s1[k]) for k in frozen if k.startswith("llm."))
    assert (out / "final" / "model.safetensors").read_bytes() == (out / "stage1_finetune" / "export" / "model.safetensors").read_bytes()
    record = json.loads((out / "final" / "training.json").read_text())
    assert record["command"] == shlex.join(["python", *cmd[1:]]) and record["world_size"] == 1
    assert [s["steps"] for s in record["stages"]] == [2, 2]
    recipe = load_train_config(out / "final" / "train_config.yaml")  # the copied recipe loads as it ran
    assert [s.name for s in recipe.stages] == ["align", "finetune"] and recipe.output_dir == str(out)


def test_world_of_one_needs_no_port_so_parallel_runs_cannot_collide():
    """``python -m llava_deft.train`` without a launcher rendezvous in-process, binding no TCP port
    (the sweep starts many such runs at once; picking a free port and binding it later raced:
    EADDRINUSE). Two processes start at once with MASTER_PORT naming a port this test holds: a TCP
    store there would fail, and a port picked by the code would replace MASTER_PORT."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code = ("import os, torch.distributed as dist; from llava_deft.train import init_distributed; "
                "print(init_distributed(), dist.get_world_size(), dist.get_backend(), os.environ.get('MASTER_PORT'))")
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
        env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
        procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert out.strip().splitlines()[-1] == f"(0, 1, 0) 1 gloo {port}"
