"""Training: ``python -m llava_deft.train`` (or the ``deepspeed`` launcher with ``--module llava_deft.train``).
The loop, stages, checkpoints and export live in ``trainer.py``; LoRA / QLoRA in ``lora.py``. Lazy
exports, so ``llava_deft.train.lora`` imports without DeepSpeed (``eval/bench_qlora.py`` on a bare GPU box)."""

from .._lazy import lazy_exports

_TRAINER = ("LLAVA_FLAGS", "ResumableSampler", "check_batches", "check_stages", "consolidated_state_dict",
            "deepspeed_config", "init_distributed", "lr_lambda", "main", "param_groups", "parse_args",
            "resolve_config", "run_stage", "stage_model", "stage_summary", "torch_extensions_dir")
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(_TRAINER, ".trainer"),
    **dict.fromkeys(("add_lora", "merged_state_dict", "parameter_counts", "qlora_problems"), ".lora"),
})
__all__ = __dir__()
