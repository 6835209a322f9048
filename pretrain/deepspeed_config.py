"""DeepSpeed's config dict for a run: the JSON file, its overrides, and what the ``train`` section fixes.

A run names a DeepSpeed JSON (``deepspeed.config``, e.g. ``configs/deepspeed/zero2.json``: ZeRO
stage, communication, bucket sizes) and may override any of its keys (``deepspeed.overrides``).
The keys the training loop owns come from ``train.*`` and may be left out of the JSON or set to
"auto"; any other value must agree with them:

    train_micro_batch_size_per_gpu = train.micro_batch_size
    gradient_accumulation_steps    = train.grad_accumulation
    gradient_clipping              = train.grad_clip (0 disables)
    train_batch_size               = micro batch × accumulation × world size
    bf16.enabled                   = train.precision on this accelerator (:func:`use_bf16`)

The JSON may not define an optimizer or a scheduler: the loop builds AdamW and the warm-up + cosine
schedule (:mod:`pretrain.schedule`) itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.errors import InputError, read_json_file

from .config import PRECISIONS

log = logging.getLogger(__name__)

_PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Keys the loop owns: a JSON may leave them out or set them to "auto"; other values must agree.
_OWNED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size")


def use_bf16(precision: str, accelerator: Any) -> bool:
    """bf16 on accelerators that have it (CUDA and others), never on DeepSpeed's CPU accelerator."""
    if precision not in PRECISIONS:
        raise InputError(None, "train.precision", f"one of {PRECISIONS}", precision)
    on_cpu = accelerator.device_name() == "cpu"
    if precision == "fp32":
        return False
    if precision == "bf16":
        if on_cpu:
            log.warning("train.precision=bf16 on the CPU accelerator: slow and unusual, but as asked")
        return True
    return not on_cpu and accelerator.is_bf16_supported()


def _deep_merge(base: dict, extra: Mapping) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_deepspeed_config(cfg: DictConfig, world_size: int, bf16: bool) -> dict:
    """DeepSpeed's config dict: the JSON file (if any) + overrides + what the train section fixes."""
    ds: dict = {}
    path = cfg.deepspeed.config
    if path:
        path = Path(path)
        if not path.is_absolute() and not path.is_file() and (_PROJECT_ROOT / path).is_file():
            path = _PROJECT_ROOT / path  # a project config named relative to the checkout
        if not path.is_file():
            raise InputError(path, "deepspeed.config", "an existing DeepSpeed JSON config", "no such file")
        ds = read_json_file(path, "an existing DeepSpeed JSON config")
    overrides = OmegaConf.to_container(cfg.deepspeed.overrides, resolve=True) if cfg.deepspeed.overrides else {}
    ds = _deep_merge(ds, overrides)
    train = cfg.train
    owned = {
        "train_micro_batch_size_per_gpu": int(train.micro_batch_size),
        "gradient_accumulation_steps": int(train.grad_accumulation),
        "gradient_clipping": float(train.grad_clip or 0.0),
        "train_batch_size": int(train.micro_batch_size) * int(train.grad_accumulation) * world_size,
    }
    for key in _OWNED_KEYS:
        given = ds.get(key, "auto")
        if given != "auto" and given != owned[key]:
            raise InputError(path or "deepspeed.overrides", key, f"'auto' or {owned[key]} (set by train.*)", given)
        ds[key] = owned[key]
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise InputError(
                path or "deepspeed.overrides",
                key,
                "no optimizer/scheduler section (the loop builds AdamW and the warm-up + cosine schedule from train.*)",
                ds[key],
            )
    given_bf16 = (ds.get("bf16") or {}).get("enabled", "auto")
    if given_bf16 != "auto" and bool(given_bf16) != bool(bf16):
        raise InputError(
            path or "deepspeed.overrides",
            "bf16.enabled",
            f"'auto' or {bool(bf16)} (train.precision={train.precision} on this accelerator)",
            given_bf16,
        )
    ds["bf16"] = {**(ds.get("bf16") or {}), "enabled": bool(bf16)}
    if ds.get("fp16", {}).get("enabled"):
        raise InputError(path or "deepspeed.overrides", "fp16.enabled", "false (the loop uses bf16 or fp32)", True)
    ds.setdefault("steps_per_print", 10**9)  # the loop logs; keep DeepSpeed's own prints quiet
    ds.setdefault("zero_optimization", {"stage": 1})
    return ds
