"""Training: ``python -m llava_deft.train`` (or the ``deepspeed`` launcher with ``--module llava_deft.train``).
The loop, stages, checkpoints and export live in ``trainer.py``."""

from .trainer import (
    LLAVA_FLAGS,
    ResumableSampler,
    check_stages,
    consolidated_state_dict,
    deepspeed_config,
    init_distributed,
    lr_lambda,
    main,
    parse_args,
    resolve_config,
    run_stage,
    stage_summary,
)

__all__ = [
    "LLAVA_FLAGS", "ResumableSampler", "check_stages", "consolidated_state_dict", "deepspeed_config",
    "init_distributed", "lr_lambda", "main", "parse_args", "resolve_config", "run_stage", "stage_summary",
]
