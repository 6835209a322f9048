"""Entry point of pretraining: load the run config (YAML + ``key=value`` overrides) and train.

``deepspeed launch/pretrain.py --config configs/pretrain/<name>.yaml [key=value ...]`` calls
:func:`main` in every rank. The loop itself is :class:`pretrain.trainer.Trainer`; the settings
are :class:`pretrain.config.PretrainConfig`; DeepSpeed's config is built by
:mod:`pretrain.deepspeed_config`.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from common.config import load_config

from .config import PretrainConfig
from .deepspeed_config import build_deepspeed_config, use_bf16
from .schedule import target_mix_at
from .trainer import Trainer, run
from .training_module import PASTTrainingModule, parameter_groups, resolve_model_section

__all__ = [
    "PASTTrainingModule",
    "PretrainConfig",
    "Trainer",
    "build_deepspeed_config",
    "main",
    "parameter_groups",
    "resolve_model_section",
    "run",
    "target_mix_at",
    "use_bf16",
]


def main(config_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> int:
    """Load and check the config, then train; the process exit code.

    The config is checked (unknown keys, wrong types, the model section) before the process group
    starts or any file is written.
    """
    trainer = Trainer(load_config(config_path, overrides, schema=PretrainConfig))
    trainer.train()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0
