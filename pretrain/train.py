"""The PAST pretraining loop under DeepSpeed: one readable loop, components in small modules.

Run with ``deepspeed launch/pretrain.py --config configs/pretrain/<name>.yaml [key=value ...]``
(one process per device; on a CPU-only machine DeepSpeed's "cpu" accelerator and gloo).

Per optimizer step each rank takes ``train.grad_accumulation`` micro batches of
``train.micro_batch_size`` cells; the contrastive loss of a micro batch uses as negatives that
micro batch gathered from every rank (``world_size × micro_batch_size`` pairs), and DeepSpeed
averages the gradients over ranks and micro batches. Global batch per optimizer step =
micro batch × accumulation × world size.

Position in training (what a checkpoint records and a resume restores):
  step       optimizer steps taken so far (the learning rate is a function of it)
  epoch      data epoch being read (0-based); every rank reads disjoint shards of it
  micro      micro batches of that epoch already consumed on each rank
The data stream is a deterministic function of (data seed, epoch, rank), so a resumed run skips
the ``micro`` batches it had already trained on and continues with exactly the next ones.

Outputs under ``out_dir``: ``config.yaml`` (resolved), ``checkpoints/`` (see
:mod:`pretrain.checkpoint`), ``tensorboard/``, ``final_metrics.json`` and, with
``debug.log_samples``, ``debug/samples_rank<r>.jsonl`` (the sample keys each rank trained on).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from data_shards.atomic import atomic_path, write_json
from data_shards.config import save_config
from data_shards.errors import InputError, read_json_file
from data_shards.logs import setup_logging
from data_shards.manifest import load_manifest
from data_shards.vocabulary import GENE_OFFSET

from . import checkpoint as ckpt
from .loss import LearnableTemperature, retrieval_accuracy, similarity_adjusted_loss
from .schedule import WarmupCosineSchedule, check_schedule
from .tb_logging import ScalarWriter, StepTimer, WindowMean, gather_floats, throughput_scalars

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "out_dir": "runs/pretrain",
    "seed": 0,  # model initialisation (same on every rank) and per-rank random streams
    "resume": None,  # null: start fresh; "latest": newest complete checkpoint if any; or a tag
    "data": {
        "manifest": None,  # data_shards manifest.json (or its folder)
        "seed": None,  # shard order / shuffles; null: the run's seed
        "num_workers": 2,
        "shuffle_buffer": 1000,
        "resample": False,
        "augment": True,
        "decoder": "imagecodecs",
    },
    "model": {},  # pretrain.models.DEFAULT_MODEL_CONFIG; cell.vocab_size / context_length null = from the manifest
    "train": {
        "micro_batch_size": 64,  # cells per rank per micro batch
        "grad_accumulation": 1,
        "epochs": 10,
        "max_steps": None,  # stop after this many optimizer steps (the schedule then spans them)
        "steps_per_epoch": None,  # optimizer steps per epoch; null: one pass over the manifest
        "lr": 1.0e-3,  # peak (PAST)
        "start_lr": 1.0e-6,  # warm-up start (PAST)
        "final_lr": 1.0e-5,  # cosine floor
        "warmup_epochs": 1.0,  # PAST: the first epoch
        "warmup_steps": None,  # overrides warmup_epochs when set
        "weight_decay": 0.05,
        "betas": [0.9, 0.98],
        "eps": 1.0e-6,
        "grad_clip": 1.0,  # max global gradient norm (DeepSpeed gradient_clipping); 0 disables
        "temperature": {"init": 0.07, "min": 0.01, "max": 1.0},
        "precision": "auto",  # auto: bf16 where the accelerator has it (not on CPU), else fp32; or bf16/fp32
        "cpu_threads": "auto",  # torch threads per rank on CPU: cores / local ranks
    },
    "loss": {
        # λ of pretrain.loss (targets = (1 − λ)·I + λ·PAST soft targets), linear from start to end over the
        # first ramp_epochs epochs, then end. 1/1/0 is the paper's objective; start 0 begins as CLIP.
        "target_mix": {"start": 1.0, "end": 1.0, "ramp_epochs": 0.0},
        "detach_targets": True,
    },
    "deepspeed": {
        "config": None,  # configs/deepspeed/*.json; the train.* keys above fill batch, clipping, precision
        "overrides": {},  # merged over the JSON (e.g. zero_optimization.stage=2)
        "dist_backend": "auto",  # auto: gloo on CPU, the accelerator's (nccl) otherwise
    },
    "checkpoint": {"every_steps": 1000, "at_epoch_end": True, "keep_last": None},
    "log": {
        "every_steps": 10,
        "window_steps": 20,  # final metrics average the last N steps
        "per_rank_limit": 16,  # write per-rank throughput scalars up to this many ranks
        "peak_tflops_per_device": None,  # for MFU (e.g. 312 for A100 bf16, 989 for H100 SXM)
    },
    "debug": {"log_samples": False, "dump_final_weights": False},
}

_PRECISIONS = ("auto", "bf16", "fp32")
_PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Parameters without weight decay besides biases and norm gains (any 0/1-d parameter).
_NO_DECAY_NAMES = ("pos_embed", "position_embedding", "cls_token", "reg_token", "logit_scale")


# ---------------------------------------------------------------------------------------------
# Model and optimizer


class PASTTrainingModule(nn.Module):
    """The PAST model and the loss's learnable temperature as one module, so DeepSpeed sees both.

    State dict keys: ``model.*`` (a :class:`pretrain.models.PASTModel`) and
    ``temperature.logit_scale`` (shape (1,)).
    """

    def __init__(self, model: nn.Module, temperature: LearnableTemperature):
        super().__init__()
        # DeepSpeed's initial broadcast views every parameter as bytes, which fails on 0-dim
        # tensors (deepspeed 0.19: "self.dim() cannot be 0 to view Float as Byte"): hold τ's
        # logit as a (1,) tensor instead. LearnableTemperature's clamp and forward work unchanged.
        if temperature.logit_scale.ndim == 0:
            temperature.logit_scale = nn.Parameter(temperature.logit_scale.detach().reshape(1))
        self.model = model
        self.temperature = temperature

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(self.model(batch))
        out["temperature"] = self.temperature().reshape(())  # 0-dim, differentiable
        return out


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices; none on biases, norms, embeddings of position, τ."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or any(part in name for part in _NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def resolve_model_section(cfg: DictConfig, manifest: dict) -> dict:
    """The model section with vocab_size and context_length filled in from the shard manifest."""
    from .models import resolve_model_config

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if cfg.model is not None else {}
    cell = dict(model_cfg.get("cell") or {})
    vocab = manifest.get("vocabulary") or {}
    if cell.get("vocab_size") is None:
        if "size" not in vocab:
            raise InputError(cfg.data.manifest, "vocabulary.size", "the vocabulary size (or model.cell.vocab_size)", "missing")
        cell["vocab_size"] = GENE_OFFSET + int(vocab["size"])
    elif "size" in vocab and int(cell["vocab_size"]) < GENE_OFFSET + int(vocab["size"]):
        raise InputError(None, "model.cell.vocab_size", f">= {GENE_OFFSET + int(vocab['size'])} for the shards' "
                         f"{vocab['size']} genes", cell["vocab_size"])
    if cell.get("context_length") is None:
        tokens_cfg = ((manifest.get("config") or {}).get("tokens") or {})
        if "context_length" not in tokens_cfg:
            raise InputError(cfg.data.manifest, "config.tokens.context_length",
                             "the token context length (or model.cell.context_length)", "missing")
        cell["context_length"] = int(tokens_cfg["context_length"])
    model_cfg["cell"] = cell
    return resolve_model_config(model_cfg)


def target_mix_at(step: int, start: float, end: float, ramp_steps: int) -> float:
    """λ for the loss at optimizer step ``step`` (0-based): linear from start to end over ramp_steps, then end."""
    for name, value in (("start", start), ("end", end)):
        if not 0.0 <= float(value) <= 1.0:
            raise InputError(None, f"loss.target_mix.{name}", "a number in [0, 1]", value)
    if ramp_steps <= 0 or step >= ramp_steps:
        return float(end)
    return float(start) + (float(end) - float(start)) * step / ramp_steps


# ---------------------------------------------------------------------------------------------
# DeepSpeed configuration


def use_bf16(precision: str, accelerator: Any) -> bool:
    """bf16 on accelerators that have it (CUDA and others), never on DeepSpeed's CPU accelerator."""
    if precision not in _PRECISIONS:
        raise InputError(None, "train.precision", f"one of {_PRECISIONS}", precision)
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


# Keys the loop owns: a JSON may leave them out or set them to "auto"; other values must agree.
_OWNED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size")


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
            raise InputError(path or "deepspeed.overrides", key, "no optimizer/scheduler section (the loop builds AdamW "
                             "and the warm-up + cosine schedule from train.*)", ds[key])
    given_bf16 = (ds.get("bf16") or {}).get("enabled", "auto")
    if given_bf16 != "auto" and bool(given_bf16) != bool(bf16):
        raise InputError(path or "deepspeed.overrides", "bf16.enabled", f"'auto' or {bool(bf16)} (train.precision="
                         f"{train.precision} on this accelerator)", given_bf16)
    ds["bf16"] = {**(ds.get("bf16") or {}), "enabled": bool(bf16)}
    if ds.get("fp16", {}).get("enabled"):
        raise InputError(path or "deepspeed.overrides", "fp16.enabled", "false (the loop uses bf16 or fp32)", True)
    ds.setdefault("steps_per_print", 10**9)  # the loop logs; keep DeepSpeed's own prints quiet
    ds.setdefault("zero_optimization", {"stage": 1})
    return ds


# ---------------------------------------------------------------------------------------------
# Distributed set-up


def _init_distributed(cfg: DictConfig):
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    backend = cfg.deepspeed.dist_backend
    if backend in (None, "auto"):
        backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if accelerator.device_name() == "cpu":
        device = torch.device("cpu")
        threads = cfg.train.cpu_threads
        if threads in (None, "auto"):
            local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
            threads = max(1, len(os.sched_getaffinity(0)) // max(1, local_size))
        torch.set_num_threads(int(threads))
    else:
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(local_rank))
    return accelerator, backend, rank, world_size, local_rank, device


# ---------------------------------------------------------------------------------------------
# The loop


class _SampleLog:
    """Per-rank JSON lines of the sample keys trained on (debug.log_samples), flushed per line."""

    def __init__(self, path: Path | None):
        self.handle = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(path, "a", encoding="utf-8", buffering=1)

    def write(self, record: dict) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def _to_device(batch: Mapping[str, Any], device: torch.device, float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of a batch on the device; floating tensors in the engine's dtype (bf16/fp32)."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            moved[key] = value.to(float_dtype) if value.is_floating_point() else value
    return moved


def _timed_batches(loader_iter: Iterator[dict], timer: StepTimer) -> Iterator[dict]:
    while True:
        start = time.perf_counter()
        try:
            batch = next(loader_iter)
        except StopIteration:
            return
        timer.add_data_wait(time.perf_counter() - start)
        yield batch


def _clamp_temperature(engine: Any, zero_stage: int) -> None:
    temperature = engine.module.temperature
    if zero_stage < 3:
        temperature.clamp_()
        return
    import deepspeed

    # Under ZeRO-3 the parameter is partitioned: gather it, clamp on rank 0, re-partition.
    with deepspeed.zero.GatheredParameters([temperature.logit_scale], modifier_rank=0):
        if dist.get_rank() == 0:
            temperature.clamp_()


def run(cfg: DictConfig) -> dict:
    """Train according to ``cfg`` (merged over :data:`DEFAULTS`); return the final metrics."""
    cfg = OmegaConf.merge(OmegaConf.create(DEFAULTS), cfg)
    setup_logging(os.environ.get("LOG_LEVEL", "INFO"))
    if OmegaConf.is_missing(cfg.data, "manifest") or not cfg.data.manifest:
        raise InputError(None, "data.manifest", "the path of a shard manifest.json", "none given")
    import deepspeed

    from .data import make_loader, steps_per_epoch_for
    from .models import build_model, estimate_flops_per_sample

    accelerator, backend, rank, world_size, local_rank, device = _init_distributed(cfg)
    is_rank0 = rank == 0
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    train = cfg.train
    micro, accum = int(train.micro_batch_size), int(train.grad_accumulation)
    if micro < 1 or accum < 1:
        raise InputError(None, "train.micro_batch_size/grad_accumulation", "positive integers", (micro, accum))
    data_seed = int(cfg.data.seed if cfg.data.seed is not None else cfg.seed)

    # Data: the epoch length in optimizer steps, and micro batches per rank (a multiple of accum).
    manifest = load_manifest(cfg.data.manifest)
    if train.steps_per_epoch:
        steps_per_epoch = int(train.steps_per_epoch)
    else:
        steps_per_epoch = steps_per_epoch_for(int(manifest["n_samples"]), micro, world_size) // accum
    if steps_per_epoch < 1:
        raise InputError(cfg.data.manifest, "n_samples", f"at least one global batch of {micro * accum * world_size} "
                         f"cells (micro {micro} x accumulation {accum} x {world_size} ranks)", manifest["n_samples"])
    micro_per_epoch = steps_per_epoch * accum
    total_steps = int(train.max_steps) if train.max_steps else int(train.epochs) * steps_per_epoch
    warmup_steps = int(train.warmup_steps) if train.warmup_steps is not None else round(train.warmup_epochs * steps_per_epoch)
    check_schedule(train.lr, warmup_steps, total_steps, train.start_lr, train.final_lr)
    mix_cfg = cfg.loss.target_mix
    mix_ramp_steps = round(float(mix_cfg.ramp_epochs) * steps_per_epoch)
    target_mix_at(0, mix_cfg.start, mix_cfg.end, mix_ramp_steps)  # validate before building anything

    # Model: identical initialisation on every rank, then per-rank random streams.
    model_cfg = resolve_model_section(cfg, manifest)
    cfg.model = model_cfg
    torch.manual_seed(int(cfg.seed))
    model = build_model(model_cfg)
    temp_cfg = train.temperature
    module = PASTTrainingModule(model, LearnableTemperature(temp_cfg.init, temp_cfg.min, temp_cfg.max))
    torch.manual_seed(int(cfg.seed) * 1000 + rank + 1)

    bf16 = use_bf16(train.precision, accelerator)
    ds_config = build_deepspeed_config(cfg, world_size, bf16)
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    optimizer = torch.optim.AdamW(
        parameter_groups(module, float(train.weight_decay)), lr=float(train.start_lr),
        betas=tuple(train.betas), eps=float(train.eps),
    )

    def make_schedule(opt):
        return WarmupCosineSchedule(
            opt, peak_lr=float(train.lr), warmup_steps=warmup_steps, total_steps=total_steps,
            start_lr=float(train.start_lr), final_lr=float(train.final_lr),
        )

    engine, _, _, schedule = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=make_schedule, config=ds_config, dist_init_required=False,
    )
    float_dtype = torch.bfloat16 if bf16 else torch.float32

    # Resume.
    step = epoch = micro_in_epoch = 0
    samples_seen = 0
    resume_tag = ckpt.resolve_resume(ckpt_dir, cfg.resume)
    if resume_tag is not None:
        state = ckpt.load_checkpoint(engine, ckpt_dir, resume_tag)
        step, epoch, micro_in_epoch = int(state["step"]), int(state["epoch"]), int(state["micro_in_epoch"])
        samples_seen = int(state.get("samples_seen", 0))
        if int(state.get("data_seed", data_seed)) != data_seed or int(state.get("micro_per_epoch", micro_per_epoch)) != micro_per_epoch:
            log.warning("resuming %s with a different data seed or epoch length: the data order will differ", resume_tag)
        if int(state.get("world_size", world_size)) != world_size:
            log.warning("resuming %s saved with %s ranks on %d ranks: each rank's shard split changes",
                        resume_tag, state.get("world_size"), world_size)
        schedule.set_step(step)
        log.info("resumed from %s: step %d, epoch %d, micro batch %d of the epoch", resume_tag, step, epoch, micro_in_epoch)

    if is_rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    global_micro = micro * world_size  # pairs each contrastive loss sees
    global_batch = global_micro * accum
    if is_rank0:
        log.info(
            "training %d steps (%d per epoch, warm-up %d) on %d ranks [%s, %s, ZeRO-%d]: global batch %d = micro %d x "
            "accumulation %d x %d ranks; negatives per loss %d", total_steps, steps_per_epoch, warmup_steps, world_size,
            backend, "bf16" if bf16 else "fp32", zero_stage, global_batch, micro, accum, world_size, global_micro,
        )

    loader, _ = make_loader(
        cfg.data.manifest, micro, rank=rank, world_size=world_size, epoch=epoch, seed=data_seed,
        num_workers=int(cfg.data.num_workers), shuffle_buffer=int(cfg.data.shuffle_buffer),
        resample=bool(cfg.data.resample), augment=OmegaConf.to_container(cfg.data.augment) if isinstance(
            cfg.data.augment, DictConfig) else cfg.data.augment,
        steps_per_epoch=micro_per_epoch, decoder=cfg.data.decoder, pin_memory=device.type == "cuda",
    )

    try:
        flops_per_sample = float(estimate_flops_per_sample(model_cfg)["train"])
    except Exception as exc:  # FLOP estimates are for logging only
        log.warning("no FLOP estimate for this model (%s): MFU is not logged", exc)
        flops_per_sample = None
    peak_flops = float(cfg.log.peak_tflops_per_device) * 1e12 if cfg.log.peak_tflops_per_device else None

    # purge_step: TensorBoard drops what a crashed run logged after the checkpoint we resume from.
    writer = ScalarWriter(out_dir / "tensorboard", enabled=is_rank0, purge_step=step + 1 if resume_tag else None)
    sample_log = _SampleLog(out_dir / "debug" / f"samples_rank{rank}.jsonl" if cfg.debug.log_samples else None)
    window = WindowMean(int(cfg.log.window_steps))
    log_every = max(1, int(cfg.log.every_steps))
    every_ckpt = int(cfg.checkpoint.every_steps or 0)
    last_saved_step = step if resume_tag is not None else -1
    start_time = time.perf_counter()
    steps_this_run = 0

    def client_state() -> dict:
        return {
            "step": step, "epoch": epoch, "micro_in_epoch": micro_in_epoch, "micro_per_epoch": micro_per_epoch,
            "steps_per_epoch": steps_per_epoch, "data_seed": data_seed, "seed": int(cfg.seed),
            "samples_seen": samples_seen, "world_size": world_size, "lr_next": schedule.lr,
        }

    def save() -> None:
        nonlocal last_saved_step
        ckpt.save_checkpoint(
            engine, ckpt_dir, step, client_state(),
            write_extras=lambda tag_dir: save_config(cfg, tag_dir / "config.yaml"),
            keep_last=cfg.checkpoint.keep_last,
        )
        last_saved_step = step

    from tqdm import tqdm

    progress = tqdm(total=total_steps, initial=step, disable=not is_rank0, desc="pretrain", unit="step", dynamic_ncols=True)
    engine.train()
    timer = StepTimer()
    step_loss = 0.0
    step_acc = [0.0, 0.0]
    while step < total_steps:
        loader.set_epoch(epoch)
        batches = _timed_batches(iter(loader), timer)
        skipped = 0
        while skipped < micro_in_epoch:  # resume mid-epoch: the same stream, minus what was trained on
            if next(batches, None) is None:
                break
            skipped += 1
        if skipped and is_rank0:
            log.info("skipped %d micro batches of epoch %d already trained on", skipped, epoch)
        timer.restart()
        for batch in batches:
            lr = schedule.lr
            inputs = _to_device(batch, device, float_dtype)
            out = engine(inputs)
            target_mix = target_mix_at(step, mix_cfg.start, mix_cfg.end, mix_ramp_steps)
            loss = similarity_adjusted_loss(out["img_emb"], out["cell_emb"], out["temperature"],
                                            detach_targets=bool(cfg.loss.detach_targets), target_mix=target_mix)
            engine.backward(loss)
            engine.step()
            acc = retrieval_accuracy(out["img_emb"].detach(), out["cell_emb"].detach())
            step_loss += float(loss.detach()) / accum
            step_acc = [step_acc[0] + acc[0] / accum, step_acc[1] + acc[1] / accum]
            sample_log.write({"step": step + 1, "epoch": epoch, "micro": micro_in_epoch, "lr": lr,
                              "keys": list(batch["key"])})
            micro_in_epoch += 1
            if micro_in_epoch % accum:
                continue

            # One optimizer step done (DeepSpeed stepped at the accumulation boundary).
            _clamp_temperature(engine, zero_stage)
            step += 1
            steps_this_run += 1
            samples_seen += global_batch
            step_time = timer.elapsed_s()
            tau = float(out["temperature"].detach())  # from the forward: works with partitioned (ZeRO-3) weights
            window.add(loss=step_loss, acc_img_to_cell=step_acc[0], acc_cell_to_img=step_acc[1], tau=tau)
            if step % log_every == 0 or step == total_steps:
                # (world_size, 3): samples/s, data wait (s) and step time (s) of every rank
                per_rank = gather_floats([micro * accum / max(step_time, 1e-9), timer.data_wait_s, step_time], device)
                scalars = {
                    "train/loss": step_loss,
                    "train/temperature": tau,
                    "train/target_mix": target_mix,
                    "train/lr": lr,
                    "train/retrieval_top1_img_to_cell": step_acc[0],
                    "train/retrieval_top1_cell_to_img": step_acc[1],
                    "train/retrieval_chance": 1.0 / global_micro,
                    "train/epoch": epoch + micro_in_epoch / micro_per_epoch,
                    "train/samples_seen": samples_seen,
                }
                scalars.update(throughput_scalars(
                    per_rank, global_batch, int(cfg.log.per_rank_limit), flops_per_sample, peak_flops,
                ))
                writer.write(step, scalars)
            progress.set_postfix(loss=f"{step_loss:.3f}", acc=f"{step_acc[0]:.2f}/{step_acc[1]:.2f}", lr=f"{lr:.2e}",
                                 tau=f"{tau:.3f}", refresh=False)
            progress.update(1)
            step_loss, step_acc = 0.0, [0.0, 0.0]

            if micro_in_epoch >= micro_per_epoch:
                epoch, micro_in_epoch = epoch + 1, 0
                if cfg.checkpoint.at_epoch_end:
                    save()
            if every_ckpt and step % every_ckpt == 0 and last_saved_step != step:
                save()
            if step % log_every == 0:
                writer.flush()
            timer.restart()
            if step >= total_steps:
                break
        if step < total_steps and micro_in_epoch:  # the loader ran dry before the planned end of the epoch
            raise RuntimeError(f"rank {rank}: epoch {epoch} ended after {micro_in_epoch} of {micro_per_epoch} micro batches")
    progress.close()
    if last_saved_step != step:
        save()

    metrics = _final_metrics(window, steps_this_run, step, epoch, samples_seen, global_micro, global_batch, world_size,
                             time.perf_counter() - start_time)
    if is_rank0 and steps_this_run:
        write_json(out_dir / "final_metrics.json", metrics)
        log.info(
            "retrieval top-1 (mean of the last %d steps): image→cell %.3f, cell→image %.3f; chance %.4f (1/%d)",
            metrics["window_steps"], metrics["retrieval_top1_img_to_cell"], metrics["retrieval_top1_cell_to_img"],
            metrics["chance"], global_micro,
        )
    if cfg.debug.dump_final_weights:
        _dump_weights(engine, out_dir / "debug" / f"final_weights_rank{rank}.pt", zero_stage)
    writer.close()
    sample_log.close()
    dist.barrier()
    return metrics


def _final_metrics(window: WindowMean, steps_this_run: int, step: int, epoch: int, samples_seen: int,
                   global_micro: int, global_batch: int, world_size: int, wall_s: float) -> dict:
    return {
        "step": step,
        "epoch": epoch,
        "steps_this_run": steps_this_run,
        "window_steps": window.count("loss"),
        "loss": window.mean("loss"),
        "temperature": window.mean("tau"),
        "retrieval_top1_img_to_cell": window.mean("acc_img_to_cell"),
        "retrieval_top1_cell_to_img": window.mean("acc_cell_to_img"),
        "chance": 1.0 / global_micro,
        "global_micro_batch": global_micro,
        "global_batch": global_batch,
        "world_size": world_size,
        "samples_seen": samples_seen,
        "wall_time_s": wall_s,
        "samples_per_s": steps_this_run * global_batch / max(wall_s, 1e-9),
    }


def _dump_weights(engine: Any, path: Path, zero_stage: int) -> None:
    """This rank's copy of the full weights (debug: ranks must agree after training)."""
    if zero_stage >= 3:
        log.warning("debug.dump_final_weights is not supported under ZeRO-3 (weights are partitioned)")
        return
    state = {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def main(config_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> int:
    """Load the config (YAML + ``key=value`` overrides) and train; the process exit code."""
    from data_shards.config import load_config

    cfg = load_config(config_path, overrides, defaults=DEFAULTS)
    run(cfg)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0
