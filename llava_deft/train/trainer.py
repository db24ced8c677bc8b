"""Training entry point, started by the ``deepspeed`` launcher (or plain ``python`` for one rank).

    deepspeed --num_gpus 8 -m llava_deft.train --config configs/train/easyvqa_tiny.yaml \
        --deepspeed configs/deepspeed/zero3.json --output_dir runs/x
    python -m llava_deft.train --config configs/train/easyvqa_tiny.yaml   # one CPU process

LLaVA's stages run in order (each its own DeepSpeed engine; stage i+1 starts from stage i's
export, as LLaVA's finetune starts from the pretrain projector).  A stage with ``lora:`` trains
LoRA adapters on the LLM (QLoRA with ``bits: 4``; ``lora.py``) and its export folds them into the
weights; ``projector_lr`` gives the projector(s) and the pipeline their own learning rate.  Run
folder layout::

    output_dir/train_config.yaml          resolved config
    output_dir/train_log.jsonl            one line per logging step
    output_dir/stage{i}_{name}/stage.json    trainable / total parameters, LoRA settings, parameter groups
    output_dir/stage{i}_{name}/checkpoints/  DeepSpeed checkpoints (resume)
    output_dir/stage{i}_{name}/export/       consolidated safetensors export of that stage
    output_dir/final/                        export of the last stage: ``load_model(output_dir/final)``,
                                             with train_config.yaml and training.json (command, commit,
                                             device, steps: llava_deft.provenance)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sys
from pathlib import Path

import torch


def torch_extensions_dir() -> Path:
    """Where torch JIT-builds DeepSpeed's C++ ops (on the CPU accelerator, the shm comm op every start
    loads): ``.cache/torch_extensions/<torch>-<deepspeed>-<python>-<venv>`` in this checkout (in
    ``~/.cache/llava_deft`` beside an installed package), so the op is built once. torch's default,
    ``~/.cache/torch_extensions/py311_cu130``, is shared by every checkout and venv of the machine, and
    ninja rebuilds the op there (40-75 s on 2 cores) whenever the last build came from another venv
    (its include paths differ): then nearly every start paid that build."""
    root = Path(__file__).resolve().parents[2]
    base = root / ".cache" if (root / "pyproject.toml").is_file() else Path.home() / ".cache" / "llava_deft"
    venv = hashlib.sha1(sys.prefix.encode()).hexdigest()[:8]
    tag = (f"torch{torch.__version__}-deepspeed{importlib.metadata.version('deepspeed')}"
           f"-py{sys.version_info.major}{sys.version_info.minor}-{venv}")
    return base / "torch_extensions" / tag


# DeepSpeed picks its accelerator at import time; with no GPU it must be told to use the CPU.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))

import argparse  # noqa: E402
from contextlib import nullcontext  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

import deepspeed  # noqa: E402
import numpy as np  # noqa: E402
import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402
from pydantic import ValidationError  # noqa: E402
from torch.utils.data import DataLoader, Sampler  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pipeline import RetentionSchedule  # noqa: E402
from pipeline.recursive import EmergencyParachute, compression_stats  # noqa: E402

from ..config import ModelConfig, StageSpec, TrainConfig, apply_overrides, load_model_config, load_train_config, read_model_config_file  # noqa: E402
from ..config.base import config_error, error_lines  # noqa: E402
from ..data.collate import build_collator  # noqa: E402
from ..data.sources import MixedDataset, build_dataset  # noqa: E402
from ..errors import ConfigError  # noqa: E402
from ..model.checkpoint import read_config_json  # noqa: E402
from ..model.llava import TOKENIZER_DIR, LlavaDeftForCausalLM  # noqa: E402
from ..provenance import TRAIN_CONFIG, TRAINING_RECORD, save_gzipped_trace, training_record, utc_now  # noqa: E402
from . import seed_flags  # noqa: E402
from .lora import add_lora, merged_state_dict, parameter_counts, qlora_problems  # noqa: E402

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
    seed_flags.add_seed_flags(p)
    p.add_argument("overrides", nargs="*", help="key.path=value overrides (value parsed as YAML)")
    args = p.parse_intermixed_args(argv)  # key=value overrides may sit between flags
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"unrecognised arguments {bad}; overrides look like key.path=value")
    return args, args.overrides


def _every_stage(item: str, n: int) -> list[str]:
    """``stages.*.key=value`` as one override per stage; any other override as it is."""
    return [item.replace("stages.*.", f"stages.{i}.", 1) for i in range(n)] if item.startswith("stages.*.") else [item]


def resolve_config(args: argparse.Namespace, overrides: list[str]) -> TrainConfig:
    flag_over = []
    seeded = seed_flags.used(args)
    base = load_train_config(args.config or (seed_flags.DEFAULT_RECIPE if seeded else None))
    for flag, (key, _) in LLAVA_FLAGS.items():
        val = getattr(args, flag)
        if val is None or flag == "model_config":
            continue
        if key.startswith("stages.*."):
            for i in range(len(base.stages)):
                flag_over.append(f"stages.{i}.{key.split('.', 2)[2]}={val}")
        else:
            flag_over.append(f"{key}={val}")
    if args.data_path is not None:  # LLaVA's conversation JSON; any other file is a text corpus (the seeds' flag)
        flag_over.append("data.type=" + ("llava_json" if Path(args.data_path).suffix in (".json", ".jsonl") else "text"))
    if args.bf16 is not None:
        flag_over.append(f"bf16={str(args.bf16).lower()}")
    data = base.model_dump()
    if args.model_config is not None:
        data["model"] = read_model_config_file(args.model_config)
    if seeded:
        def depth(extra: list[str]) -> int:
            d = apply_overrides(data, flag_over + extra)
            start = d.get("init_from")
            return seed_flags.llm_depth(read_config_json(Path(start)) if start else d["model"])

        flag_over += seed_flags.seed_overrides(args, depth)
    flag_over = [o for item in flag_over for o in _every_stage(item, len(base.stages))]
    # what init_from's saved model config gets on top (main): the model.* overrides of flags and command line
    args.model_overrides = [o for o in flag_over + overrides if o.startswith("model.")]
    try:
        return TrainConfig.model_validate(apply_overrides(data, flag_over + overrides))
    except ValidationError as e:
        where = f"train config '{args.config}'" if args.config else "train config"
        raise config_error(f"{where} with the command line's flags and overrides", error_lines(e)) from None


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
    bf16 = use_bf16(cfg)
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


def use_bf16(cfg: TrainConfig) -> bool:
    """Train in bf16: ``bf16: auto`` means on GPUs."""
    return torch.cuda.is_available() if cfg.bf16 == "auto" else bool(cfg.bf16)


def zero_stage(cfg: TrainConfig) -> int:
    """The ZeRO stage of the recipe's DeepSpeed config (0 when it sets none)."""
    path = Path(cfg.deepspeed)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config '{path}' does not exist (see configs/deepspeed/)")
    return int(json.loads(path.read_text()).get("zero_optimization", {}).get("stage", 0))


def lr_lambda(total: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Full state dict (floats in fp32) on rank 0 (gathers ZeRO-3 partitions), LoRA adapters folded
    into their layers' weights (plain keys, 4-bit weights dequantised); None on other ranks."""
    module = engine.module
    params = list(module.parameters())
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if engine.zero_optimization_stage() == 3 else nullcontext()
    with ctx:
        if dist.get_rank() == 0:
            # floats exported as fp32 (bf16 training included); integer buffers keep their dtype
            state = {
                k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                for k, v in module.state_dict().items()
            }
            return merged_state_dict(module, state)
    return None


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device``; from pinned memory (the loader pins on CUDA) the copies are
    asynchronous, so the host does not wait for the previous step's kernels before it can queue the next."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


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

    model = stage_model(cfg, i, stage, init_from)
    model.loss_window = cfg.loss_window  # supervise only each sequence's last tokens (pair-compressed layers)
    groups = param_groups(model, stage)
    n_train, n_total = parameter_counts(model)

    collate = build_collator(model.processors)
    per_rank = len(dataset) // world
    micro_per_epoch = per_rank // cfg.per_device_batch_size
    steps_per_epoch = max(1, micro_per_epoch // cfg.gradient_accumulation_steps)
    total = stage.max_steps or max(1, math.ceil(stage.epochs * steps_per_epoch))
    warmup = int(stage.warmup_ratio * total)
    retention = RetentionSchedule(model.pipeline, total, stage.retention_hold_ratio, stage.retention_ramp_ratio)
    parachute, compressors = build_parachute(cfg, model)

    opt = torch.optim.AdamW(groups, lr=stage.lr, weight_decay=stage.weight_decay, fused=torch.cuda.is_available())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, warmup, stage.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg, world))

    step = 0
    if resume and latest_step(ckpt_dir) is not None:
        _, client = engine.load_checkpoint(str(ckpt_dir))
        step = int(client["step"])
        if rank == 0:
            print(f"[train] stage {i} ({stage.name}): resumed at step {step}/{total}")
    if rank == 0:
        share = n_train / max(1, n_total)
        print(
            f"[train] stage {i} ({stage.name}): {total} steps, {len(dataset)} samples, world {world}, "
            f"{n_train / 1e6:.2f}M of {n_total / 1e6:.2f}M params trainable ({100 * share:.2f}%), "
            f"frozen vision={stage.freeze_vision} llm={stage.freeze_llm}"
            + (f" audio={model.config.audio.freeze if stage.freeze_audio is None else stage.freeze_audio}"
               if model.audio is not None else "")
            + (f", LoRA r={stage.lora.r} alpha={stage.lora.alpha:g} on {stage.lora.target_modules}"
               + (" over 4-bit weights" if stage.lora.bits == 4 else "") if stage.lora_enabled else "")
            + "".join(f", {g['name']} lr {g['lr']:g}" for g in groups if len(groups) > 1)
        )
        out.mkdir(parents=True, exist_ok=True)
        (out / STAGE_RECORD).write_text(json.dumps({
            "trainable_params": n_train, "total_params": n_total, "trainable_share": share,
            "lora": stage.lora.model_dump() if stage.lora_enabled else None,
            "param_groups": [{"name": g["name"], "lr": g["lr"], "params": sum(p.numel() for p in g["params"])} for g in groups],
        }, indent=2) + "\n")
        if isinstance(dataset, MixedDataset):
            print(f"[train] data: mix of {len(dataset.names)} sources ({dataset.summary()})")

    log_path = Path(cfg.output_dir) / "train_log.jsonl"
    bar = tqdm(total=total, initial=step, desc=f"stage {i} {stage.name}", disable=rank != 0, dynamic_ncols=True)
    accum = cfg.gradient_accumulation_steps
    t0, seen, run_loss, run_n = time.perf_counter(), 0, 0.0, 0
    llm_tokens = torch.zeros(2, dtype=torch.long, device=engine.device)  # real, padded; read when logged
    step_lm_loss, step_n = 0.0, 0  # the parachute's LM loss of the current optimizer step
    profiler = StepProfiler(cfg.profile_steps, Path(cfg.output_dir) / f"profile_stage{i}", engine.device, rank)
    profiler.at(step)
    engine.train()
    while step < total:
        epoch, done_micro = divmod(step * accum, max(1, micro_per_epoch))
        sampler = ResumableSampler(len(dataset), rank, world, cfg.seed, epoch, skip=done_micro * cfg.per_device_batch_size)
        loader = DataLoader(
            dataset, batch_size=cfg.per_device_batch_size, sampler=sampler, collate_fn=collate,
            num_workers=cfg.num_workers, drop_last=True, pin_memory=engine.device.type == "cuda",
        )
        for micro, batch in enumerate(loader):
            batch = to_device(batch, engine.device)
            retention.apply(step)
            output = engine(**batch)
            loss = output.loss
            if output.llm_tokens is not None:
                llm_tokens += output.llm_tokens
            engine.backward(loss)
            engine.step()
            run_loss = run_loss + loss.detach().float()  # summed on the device: read only when logged (no sync per step)
            run_n += 1
            if parachute is not None:
                lm = output.lm_loss if output.lm_loss is not None else loss
                step_lm_loss, step_n = step_lm_loss + lm.detach().float(), step_n + 1
            seen += cfg.per_device_batch_size * world
            if (micro + 1) % accum:
                continue
            step += 1
            bar.update(1)
            profiler.at(step)
            if parachute is not None:  # one host read per step (the parachute is off by default)
                mean = step_lm_loss / max(1, step_n)
                if world > 1:  # every rank takes the same decision
                    dist.all_reduce(mean)
                    mean = mean / world
                parachute.update(step, float(mean))
                step_lm_loss, step_n = 0.0, 0
            if step % cfg.log_steps == 0 or step == total:
                rate = seen / (time.perf_counter() - t0)
                avg = float(run_loss) / max(1, run_n)
                elapsed = time.perf_counter() - t0
                counted = llm_tokens.clone()
                if world > 1:  # every rank logs at the same step: the sum over ranks
                    dist.all_reduce(counted)
                real, padded = counted.tolist()  # since this stage (re)started, as elapsed_s
                record = {"stage": i, "step": step, "loss": avg, "lr": sched.get_last_lr()[0], "samples_per_s": rate,
                          "elapsed_s": round(elapsed, 3), "llm_tokens": real, "llm_tokens_padded": padded}
                record.update({f"{g['name']}_lr": lr for g, lr in zip(groups[1:], sched.get_last_lr()[1:])})
                if retention.enabled:
                    record["retention"] = retention.ratios(step - 1)  # the ratios this step ran with
                if compressors:  # recursive compression: thresholds, ratios, cluster sizes of the last batch
                    record["compression"] = compression_stats(compressors)
                if parachute is not None:
                    record["parachute_raise"] = parachute.raise_
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
    profiler.close(step)
    retention.apply(total)  # the targets: what the exported model runs with
    if parachute is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / PARACHUTE_RECORD).write_text(json.dumps(parachute.stats(), indent=2) + "\n")

    state = consolidated_state_dict(engine)
    if rank == 0:
        engine.module.save_pretrained(export_dir, state_dict=state)
        print(f"[train] stage {i} ({stage.name}) exported to {export_dir}")
    dist.barrier()
    return export_dir


class StepProfiler:
    """``profile_steps: [first, last]``: torch.profiler over optimizer steps ``first+1 .. last`` of a stage.

    :meth:`at` is called with the number of optimizer steps done; the profiler starts when it is ``first``
    and stops at ``last`` (or at :meth:`close`, a stage shorter than ``last``), then rank 0 writes
    ``<stem>.txt`` (the ops by device time, then by host time, averaged per profiled step) and
    ``<stem>.json.gz`` (the trace for chrome://tracing or Perfetto). Host-side checks only: no device read.
    """

    def __init__(self, steps: tuple[int, int] | None, stem: Path, device: torch.device, rank: int):
        self.steps, self.stem, self.rank = steps, stem, rank
        self.cuda = device.type == "cuda"
        self.prof = None

    def at(self, step: int) -> None:
        if self.steps is None:
            return
        first, last = self.steps
        if step == first and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.prof = profile(activities=activities)
            self.prof.start()
            self.start_step = step
        elif step == last and self.prof is not None:
            self.finish(step)

    def close(self, step: int | None = None) -> None:
        if self.prof is not None:
            self.finish(step)

    def finish(self, step: int | None) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.prof.stop()
        prof, self.prof = self.prof, None
        if self.rank != 0:
            return
        n = (step if step is not None else self.steps[1]) - self.start_step
        averages = prof.key_averages()
        device_key = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        text = [f"# torch.profiler over optimizer steps {self.start_step + 1}..{self.start_step + n} ({n} steps); "
                f"totals are over all {n} steps", "", f"## by {'device' if self.cuda else 'host'} time (self)", "",
                averages.table(sort_by=device_key, row_limit=40)]
        if self.cuda:
            text += ["", "## by host time (self)", "", averages.table(sort_by="self_cpu_time_total", row_limit=25)]
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        self.stem.with_suffix(".txt").write_text("\n".join(text) + "\n")
        trace = save_gzipped_trace(prof, self.stem.with_suffix(".json.gz"))
        print(f"[train] profile of {n} steps: {self.stem.with_suffix('.txt')}, {trace}")


PROJECTOR_MODULES = ("projector", "audio_projector", "pipeline")
"""The model's modules that ``projector_lr`` applies to: the projectors into the LLM's width and the
reduction pipeline's stages (they train in every stage, ``LlavaDeftForCausalLM.apply_freeze``)."""

PARACHUTE_RECORD = "parachute.json"
"""In a stage's folder with ``parachute.enabled``: the raise in force at the end and every change
(``EmergencyParachute.stats``)."""


def build_parachute(cfg: TrainConfig, model: LlavaDeftForCausalLM) -> tuple[EmergencyParachute | None, list]:
    """The model's recursive-compression stages (those with a ``threshold_raise``: ``recursive_compression``,
    ``recursive_compression_llm``, ``progressive_compression``) and, with ``parachute.enabled``, the
    parachute over them; enabled without such a stage is a :class:`ConfigError`."""
    stages = [s for s in [*model.pipeline.stages, *model.pipeline.llm] if hasattr(s, "threshold_raise")]
    spec = cfg.parachute
    if not spec.enabled:
        return None, stages
    if not stages:
        raise ConfigError("parachute.enabled: true, but the model's pipeline has no recursive-compression stage "
                          "(recursive_compression, recursive_compression_llm or progressive_compression) for it "
                          "to loosen; add one to the pipeline or set parachute.enabled: false")
    chute = EmergencyParachute(stages, step=spec.step, max_raise=spec.max_raise, spike_tolerance=spec.spike_tolerance,
                               patience=spec.patience, window=spec.window, ema_decay=spec.ema_decay, warmup=spec.warmup)
    return chute, stages


STAGE_RECORD = "stage.json"
"""In a stage's folder: its trainable and total parameters, LoRA settings and parameter groups
(copied into ``final/training.json``)."""


def stage_model(cfg: TrainConfig, i: int, stage: StageSpec, init_from: Path | None) -> LlavaDeftForCausalLM:
    """The model a stage trains: the previous stage's export (or the recipe's model), frozen as the
    stage says, with the stage's LoRA adapters injected into its LLM (4-bit base weights for QLoRA,
    put on this rank's GPU)."""
    if init_from is None:
        model = LlavaDeftForCausalLM(cfg.model)
    else:  # stage 0 of a run with init_from may swap the saved pipeline for its own (model.pipeline=...)
        saved = read_config_json(init_from).get("pipeline")
        mine = cfg.model.get("pipeline") if i == 0 and isinstance(cfg.model, dict) else saved
        model = LlavaDeftForCausalLM.from_pretrained(init_from, pipeline=None if mine == saved else mine)
    model.apply_freeze(vision=stage.freeze_vision, llm=stage.freeze_llm, audio=stage.freeze_audio)
    if stage.lora_enabled:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        add_lora(model.llm, stage.lora, torch.bfloat16 if use_bf16(cfg) else torch.float32, device, where=f"stages.{i}.lora")
    return model


def param_groups(model: LlavaDeftForCausalLM, stage: StageSpec) -> list[dict]:
    """The optimizer's parameter groups of the trainable parameters: with ``projector_lr``, the
    projector(s) and the pipeline (``PROJECTOR_MODULES``) at that rate after the rest at ``lr``;
    groups without parameters are left out."""
    fast, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (fast if name.split(".")[0] in PROJECTOR_MODULES else rest).append(p)
    if stage.projector_lr is None:
        return [{"name": "all", "params": rest + fast, "lr": stage.lr}]
    groups = [{"name": "base", "params": rest, "lr": stage.lr}, {"name": "projector", "params": fast, "lr": stage.projector_lr}]
    return [g for g in groups if g["params"]]


def stage_records(out: Path, cfg: TrainConfig) -> list[dict]:
    """Per stage, its last logged step and loss (``stage_summary``) with its ``stage.json``."""
    records = stage_summary(out / "train_log.jsonl", len(cfg.stages))
    for i, (rec, stage) in enumerate(zip(records, cfg.stages)):
        f = out / f"stage{i}_{stage.name}" / STAGE_RECORD
        if f.is_file():
            rec.update(json.loads(f.read_text()))
    return records


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
    """Stage switches that need a part of the model the config does not build, or a machine this is
    not (QLoRA: CUDA, bitsandbytes and ZeRO stage 2 or lower); every problem in one ``ConfigError``."""
    problems = []
    bad = [f"stages.{i}.freeze_audio" for i, s in enumerate(cfg.stages) if s.freeze_audio is not None]
    if bad and not model_cfg.audio.enabled:
        problems.append(f"{', '.join(bad)} set but the model has no audio encoder; set model.audio.enabled: true or remove them")
    qlora = [f"stages.{i}.lora.bits" for i, s in enumerate(cfg.stages) if s.lora_enabled and s.lora.bits == 4]
    if qlora:
        missing = qlora_problems()
        if zero_stage(cfg) == 3:
            missing.append(f"4-bit weights cannot be partitioned by ZeRO-3 ('{cfg.deepspeed}'): use configs/deepspeed/zero2.json")
        if missing:
            problems.append(f"{', '.join(qlora)}: 4 (QLoRA) cannot run: {'; '.join(missing)}; remove bits (LoRA over "
                            f"full-precision weights) or train on a GPU with bitsandbytes installed")
    if problems:
        raise ConfigError("\n".join(problems))


def check_batches(n_samples: int, world: int, cfg: TrainConfig) -> None:
    """One optimizer step needs world × per_device_batch_size × gradient_accumulation_steps samples
    (incomplete batches are dropped, so every rank runs the same steps); fewer would loop forever
    without a step."""
    need = world * cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    if n_samples >= need:
        return
    fits = n_samples // (world * cfg.gradient_accumulation_steps)
    fix = (f"lower per_device_batch_size to at most {fits}" if fits else
           f"lower gradient_accumulation_steps (at most {n_samples // world} with per_device_batch_size 1) or use fewer ranks")
    raise ConfigError(
        f"the training data has {n_samples} samples, fewer than one optimizer step needs: world size {world} x "
        f"per_device_batch_size {cfg.per_device_batch_size} x gradient_accumulation_steps "
        f"{cfg.gradient_accumulation_steps} = {need} (incomplete batches are dropped); {fix}, or add data"
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _text_tokenizer(spec, model_cfg: ModelConfig):
    """The model's tokenizer when the data has a ``text`` source (its blocks are token ids), else None."""
    if spec.type != "text" and not any(s.type == "text" for s in spec.sources):
        return None
    from ..model.tokenizer import load_model_tokenizer

    return load_model_tokenizer(model_cfg.tokenizer, model_cfg.llm.path)


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    started = utc_now()
    args, overrides = parse_args(argv)
    cfg = resolve_config(args, overrides)
    # what can be refused is refused before the process group (and DeepSpeed's comm op) is set up
    start: Path | None = None
    if cfg.init_from is not None:
        start = Path(cfg.init_from)
        if not (start / "config.json").is_file():
            raise FileNotFoundError(f"init_from '{start}' is not a saved llava-deft model folder (no config.json); "
                                    f"give a run's final/ folder (e.g. runs/passkey_long_a/final)")
        saved = {**read_config_json(start), "tokenizer": str(start / TOKENIZER_DIR)}
        # the saved config replaces `model:`; the command line's model.* overrides (e.g. model.pipeline=...,
        # a reducer fine-tuned from a base) still apply on top of it, they are never dropped silently
        mine = getattr(args, "model_overrides", None) or [o for o in overrides if o.startswith("model.")]
        model = apply_overrides({"model": saved}, mine)["model"] if mine else saved
        cfg = cfg.model_copy(update={"model": model})
        if mine:
            print(f"[train] init_from {start}: its config.json replaces `model:`, then {' '.join(mine)}")
    model_cfg = load_model_config(cfg.model)
    check_stages(cfg, model_cfg)
    dataset = build_dataset(cfg.data, model_cfg.video.sampling(), model_cfg.audio.sampling_rate(), limits=model_cfg.limits,
                            tokenizer=_text_tokenizer(cfg.data, model_cfg), max_length=model_cfg.max_length)
    check_batches(len(dataset), int(os.environ.get("WORLD_SIZE", "1")), cfg)  # the launcher's world, else one
    rank, world, _ = init_distributed()
    seed_everything(cfg.seed)
    out = Path(cfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / TRAIN_CONFIG).write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    prev: Path | None = start
    for i, stage in enumerate(cfg.stages):
        prev = run_stage(cfg, i, stage, prev, dataset, rank, world, args.resume)
    final = out / "final"
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(prev, final)
        shutil.copy(out / TRAIN_CONFIG, final / TRAIN_CONFIG)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        record = training_record(argv, started, world, device, stage_records(out, cfg))
        (final / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        print(f"[train] final model: {final}")
    dist.barrier()
    return final


if __name__ == "__main__":
    main(sys.argv[1:])
