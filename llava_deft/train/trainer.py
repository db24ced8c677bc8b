"""Training entry point, started by the ``deepspeed`` launcher (or plain ``python`` for one rank).

    deepspeed --num_gpus 8 -m llava_deft.train --config configs/train/easyvqa_tiny.yaml \
        --deepspeed configs/deepspeed/zero3.json --output_dir runs/x
    python -m llava_deft.train --config configs/train/easyvqa_tiny.yaml   # one CPU process

LLaVA's stages run in order (each its own DeepSpeed engine; stage i+1 starts from stage i's
export, as LLaVA's finetune starts from the pretrain projector).  Run folder layout::

    output_dir/train_config.yaml          resolved config
    output_dir/train_log.jsonl            one line per logging step
    output_dir/stage{i}_{name}/checkpoints/  DeepSpeed checkpoints (resume)
    output_dir/stage{i}_{name}/export/       consolidated safetensors export of that stage
    output_dir/final/                        export of the last stage: ``load_model(output_dir/final)``,
                                             with train_config.yaml and training.json (command, commit,
                                             device, steps: llava_deft.provenance)
"""

from __future__ import annotations

import os

import torch

# DeepSpeed picks its accelerator at import time; with no GPU it must be told to use the CPU.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

import argparse  # noqa: E402
from contextlib import nullcontext  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import deepspeed  # noqa: E402
import numpy as np  # noqa: E402
import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402
from torch.utils.data import DataLoader, Sampler  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pipeline import RetentionSchedule  # noqa: E402

from ..config import ModelConfig, StageSpec, TrainConfig, apply_overrides, load_model_config, load_train_config, read_model_config_file  # noqa: E402
from ..data.collate import build_collator  # noqa: E402
from ..data.sources import MixedDataset, build_dataset  # noqa: E402
from ..errors import ConfigError  # noqa: E402
from ..model.llava import LlavaDeftForCausalLM  # noqa: E402
from ..provenance import TRAIN_CONFIG, TRAINING_RECORD, training_record, utc_now  # noqa: E402

# LLaVA's flag names -> (our config key, type); "stages.*." sets the key in every stage
LLAVA_FLAGS = {
    "data_path": ("data.path", str), "image_folder": ("data.image_folder", str), "model_config": ("model", str),
    "per_device_train_batch_size": ("per_device_batch_size", int), "seed": ("seed", int),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", int), "learning_rate": ("stages.*.lr", float),
    "num_train_epochs": ("stages.*.epochs", float), "max_steps": ("stages.*.max_steps", int),
    "save_steps": ("save_steps", int), "logging_steps": ("log_steps", int), "output_dir": ("output_dir", str),
    "deepspeed": ("deepspeed", str),
}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="llava_deft.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="training recipe YAML (configs/train/*.yaml)")
    for flag, (_, typ) in LLAVA_FLAGS.items():
        p.add_argument(f"--{flag}", type=typ, default=None)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key.path=value overrides (value parsed as YAML)")
    args = p.parse_intermixed_args(argv)  # key=value overrides may sit between flags
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"unrecognised arguments {bad}; overrides look like key.path=value")
    return args, args.overrides


def resolve_config(args: argparse.Namespace, overrides: list[str]) -> TrainConfig:
    flag_over = []
    base = load_train_config(args.config)
    for flag, (key, _) in LLAVA_FLAGS.items():
        val = getattr(args, flag)
        if val is None or flag == "model_config":
            continue
        if key.startswith("stages.*."):
            for i in range(len(base.stages)):
                flag_over.append(f"stages.{i}.{key.split('.', 2)[2]}={val}")
        else:
            flag_over.append(f"{key}={val}")
    if args.data_path is not None:
        flag_over.append("data.type=llava_json")
    if args.bf16 is not None:
        flag_over.append(f"bf16={str(args.bf16).lower()}")
    data = base.model_dump()
    if args.model_config is not None:
        data["model"] = read_model_config_file(args.model_config)
    return TrainConfig.model_validate(apply_overrides(data, flag_over + overrides))


# ---------------------------------------------------------------------------------- distributed
def init_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU); one rank works too."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ and not dist.is_initialized():
        # plain `python -m llava_deft.train`: a world of one, rendezvous through an in-process store.
        # (No TCP port: picking a free one and binding it later races with other runs started at once.)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend)  # adopts the group above, or joins the launcher's
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), local


class ResumableSampler(Sampler[int]):
    """Shuffled, rank-sharded indices for one epoch, starting after ``skip`` samples (resume)."""

    def __init__(self, n: int, rank: int, world: int, seed: int, epoch: int, skip: int = 0):
        g = torch.Generator().manual_seed(seed + epoch)
        perm = torch.randperm(n, generator=g)
        per_rank = n // world  # drop the tail so every rank runs the same number of steps
        self.indices = perm[rank * per_rank : (rank + 1) * per_rank][skip:].tolist()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    """Read the DeepSpeed JSON and fill its "auto" values from the recipe (as HF Trainer does)."""
    path = Path(cfg.deepspeed)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config '{path}' does not exist (see configs/deepspeed/)")
    ds = json.loads(path.read_text())
    bf16 = torch.cuda.is_available() if cfg.bf16 == "auto" else bool(cfg.bf16)
    fill = {
        "train_micro_batch_size_per_gpu": cfg.per_device_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world,
        "gradient_clipping": cfg.gradient_clipping,
    }
    for k, v in fill.items():
        if ds.get(k, "auto") == "auto":
            ds[k] = v
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = bf16
    if not torch.cuda.is_available():  # DeepSpeed's CPU accelerator does not run ZeRO's overlapped comm
        ds.setdefault("zero_optimization", {})["overlap_comm"] = False
    if ds.get("zero_optimization", {}).get("offload_optimizer"):
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def lr_lambda(total: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Full state dict (floats in fp32) on rank 0 (gathers ZeRO-3 partitions); None on other ranks."""
    module = engine.module
    params = list(module.parameters())
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if engine.zero_optimization_stage() == 3 else nullcontext()
    with ctx:
        if dist.get_rank() == 0:
            # floats exported as fp32 (bf16 training included); integer buffers keep their dtype
            return {
                k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                for k, v in module.state_dict().items()
            }
    return None


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def latest_step(ckpt_dir: Path) -> int | None:
    f = ckpt_dir / "latest"
    return int(f.read_text().strip().removeprefix("step")) if f.is_file() else None


# ---------------------------------------------------------------------------------- one stage
def run_stage(
    cfg: TrainConfig, i: int, stage: StageSpec, init_from: Path | None, dataset, rank: int, world: int, resume: bool
) -> Path:
    out = Path(cfg.output_dir) / f"stage{i}_{stage.name}"
    export_dir = out / "export"
    ckpt_dir = out / "checkpoints"
    if resume and (export_dir / "config.json").is_file():
        if rank == 0:
            print(f"[train] stage {i} ({stage.name}) already exported at {export_dir}; skipping")
        return export_dir

    if init_from is not None:
        model = LlavaDeftForCausalLM.from_pretrained(init_from)
    else:
        model = LlavaDeftForCausalLM(cfg.model)
    model.apply_freeze(vision=stage.freeze_vision, llm=stage.freeze_llm, audio=stage.freeze_audio)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)

    collate = build_collator(model.processors)
    per_rank = len(dataset) // world
    micro_per_epoch = per_rank // cfg.per_device_batch_size
    steps_per_epoch = max(1, micro_per_epoch // cfg.gradient_accumulation_steps)
    total = stage.max_steps or max(1, math.ceil(stage.epochs * steps_per_epoch))
    warmup = int(stage.warmup_ratio * total)
    retention = RetentionSchedule(model.pipeline, total, stage.retention_hold_ratio, stage.retention_ramp_ratio)

    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay, fused=torch.cuda.is_available())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup, stage.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg, world))

    step = 0
    if resume and latest_step(ckpt_dir) is not None:
        _, client = engine.load_checkpoint(str(ckpt_dir))
        step = int(client["step"])
        if rank == 0:
            print(f"[train] stage {i} ({stage.name}): resumed at step {step}/{total}")
    if rank == 0:
        print(
            f"[train] stage {i} ({stage.name}): {total} steps, {len(dataset)} samples, world {world}, "
            f"{n_train / 1e6:.2f}M trainable params, frozen vision={stage.freeze_vision} llm={stage.freeze_llm}"
            + (f" audio={model.config.audio.freeze if stage.freeze_audio is None else stage.freeze_audio}"
               if model.audio is not None else "")
        )
        if isinstance(dataset, MixedDataset):
            print(f"[train] data: mix of {len(dataset.names)} sources ({dataset.summary()})")

    log_path = Path(cfg.output_dir) / "train_log.jsonl"
    bar = tqdm(total=total, initial=step, desc=f"stage {i} {stage.name}", disable=rank != 0, dynamic_ncols=True)
    accum = cfg.gradient_accumulation_steps
    t0, seen, run_loss, run_n = time.perf_counter(), 0, 0.0, 0
    engine.train()
    while step < total:
        epoch, done_micro = divmod(step * accum, max(1, micro_per_epoch))
        sampler = ResumableSampler(len(dataset), rank, world, cfg.seed, epoch, skip=done_micro * cfg.per_device_batch_size)
        loader = DataLoader(
            dataset, batch_size=cfg.per_device_batch_size, sampler=sampler, collate_fn=collate,
            num_workers=cfg.num_workers, drop_last=True,
        )
        for micro, batch in enumerate(loader):
            batch = to_device(batch, engine.device)
            retention.apply(step)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            run_loss += float(loss.detach())
            run_n += 1
            seen += cfg.per_device_batch_size * world
            if (micro + 1) % accum:
                continue
            step += 1
            bar.update(1)
            if step % cfg.log_steps == 0 or step == total:
                rate = seen / (time.perf_counter() - t0)
                avg = run_loss / max(1, run_n)
                record = {"stage": i, "step": step, "loss": avg, "lr": sched.get_last_lr()[0], "samples_per_s": rate}
                if retention.enabled:
                    record["retention"] = retention.ratios(step - 1)  # the ratios this step ran with
                bar.set_postfix(loss=f"{avg:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}", samples_s=f"{rate:.1f}")
                if rank == 0:
                    with log_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                run_loss, run_n = 0.0, 0
            if step % cfg.save_steps == 0 or step == total:
                save_checkpoint(engine, ckpt_dir, step, cfg.save_total_limit, rank)
            if step >= total:
                break
    bar.close()
    retention.apply(total)  # the targets: what the exported model runs with

    state = consolidated_state_dict(engine)
    if rank == 0:
        engine.module.save_pretrained(export_dir, state_dict=state)
        print(f"[train] stage {i} ({stage.name}) exported to {export_dir}")
    dist.barrier()
    return export_dir


def stage_summary(log_path: Path, n_stages: int) -> list[dict]:
    """Per stage, its last logged step and loss (``train_log.jsonl``; a resumed run appends to it)."""
    last: dict[int, dict] = {}
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            rec = json.loads(line)
            last[rec["stage"]] = rec
    return [{"steps": last[i]["step"], "final_loss": last[i]["loss"]} if i in last else {"steps": None, "final_loss": None}
            for i in range(n_stages)]


def save_checkpoint(engine, ckpt_dir: Path, step: int, keep: int, rank: int) -> None:
    engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}", client_state={"step": step})
    if rank == 0:
        tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def check_stages(cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """Stage switches that need a part of the model the config does not build."""
    bad = [f"stages.{i}.freeze_audio" for i, s in enumerate(cfg.stages) if s.freeze_audio is not None]
    if bad and not model_cfg.audio.enabled:
        raise ConfigError(f"{', '.join(bad)} set but the model has no audio encoder; set model.audio.enabled: true or remove them")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    started = utc_now()
    args, overrides = parse_args(argv)
    cfg = resolve_config(args, overrides)
    rank, world, _ = init_distributed()
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / TRAIN_CONFIG).write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    model_cfg = load_model_config(cfg.model)
    check_stages(cfg, model_cfg)
    dataset = build_dataset(cfg.data, model_cfg.video.sampling(), model_cfg.audio.sampling_rate())
    prev: Path | None = None
    for i, stage in enumerate(cfg.stages):
        prev = run_stage(cfg, i, stage, prev, dataset, rank, world, args.resume)
    final = out / "final"
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(prev, final)
        shutil.copy(out / TRAIN_CONFIG, final / TRAIN_CONFIG)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        record = training_record(argv, started, world, device, stage_summary(out / "train_log.jsonl", len(cfg.stages)))
        (final / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        print(f"[train] final model: {final}")
    dist.barrier()
    return final


if __name__ == "__main__":
    main(sys.argv[1:])
