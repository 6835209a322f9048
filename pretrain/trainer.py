"""The PAST pretraining loop under DeepSpeed: a small trainer (setup / step / train).

Run with ``deepspeed launch/pretrain.py --config configs/pretrain/<name>.yaml [key=value ...]``
(one process per device; on a CPU-only machine DeepSpeed's "cpu" accelerator and gloo).

Per optimizer step each rank takes ``train.grad_accumulation`` micro batches of
``train.micro_batch_size`` cells; the contrastive loss of a micro batch uses as negatives that
micro batch gathered from every rank (``world_size × micro_batch_size`` pairs), and DeepSpeed
averages the gradients over ranks and micro batches. Global batch per optimizer step =
micro batch × accumulation × world size.

Position in training (:class:`Position`: what a checkpoint records and a resume restores):
  step       optimizer steps taken so far (the learning rate is a function of it)
  epoch      data epoch being read (0-based); every rank reads disjoint shards of it
  micro      micro batches of that epoch already consumed on each rank
The data stream is a deterministic function of (data seed, epoch, rank), so a resumed run skips
the ``micro`` batches it had already trained on and continues with exactly the next ones.

:class:`Trainer` reads as the run does:
  ``setup()``   process group, the run's length (:class:`Plan`), model + DeepSpeed engine,
                resume from a checkpoint, the loader, TensorBoard;
  ``step()``    one micro batch: forward, loss, backward, DeepSpeed step;
  ``train()``   the loop: for each epoch, skip what a resumed run already trained on, step,
                log, save checkpoints; then the final checkpoint and metrics.

Outputs under ``out_dir``: ``config.yaml`` (resolved), ``checkpoints/`` (see
:mod:`pretrain.checkpoint`), ``tensorboard/``, ``final_metrics.json`` and, with
``debug.log_samples``, ``debug/samples_rank<r>.jsonl`` (the sample keys each rank trained on).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from common.atomic import atomic_path, write_json
from common.config import apply_schema, save_config
from common.errors import InputError
from common.logs import setup_logging
from data_shards.manifest import load_manifest

from . import checkpoint as ckpt
from .augment import DeviceImages
from .bad_data import BadData
from .collapse import CollapseError, CollapseGuard
from .config import PretrainConfig
from .data import make_loader, steps_per_epoch_for
from .deepspeed_config import build_deepspeed_config, use_bf16
from .loss import LearnableTemperature, retrieval_accuracy, similarity_adjusted_loss
from .models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_model,
    compile_towers,
    estimate_flops_per_sample,
    prepare_host_batch,
    resolve_model_config,
)
from .schedule import WarmupCosineSchedule, check_schedule, target_mix_at
from .tb_logging import ScalarWriter, StepTimer, WindowMean, gather_floats, start_wandb, throughput_scalars
from .training_module import PASTTrainingModule, parameter_groups, resolve_model_section

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Position:
    """Where training is; saved with every checkpoint (module docstring)."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # data epoch being read (0-based)
    micro_in_epoch: int = 0  # micro batches of that epoch consumed on each rank
    samples_seen: int = 0  # cells trained on, over all ranks


@dataclasses.dataclass(frozen=True)
class Plan:
    """The run's length, fixed by the config, the manifest and the world size (in optimizer steps)."""

    steps_per_epoch: int
    micro_per_epoch: int  # micro batches per rank per epoch (steps_per_epoch × accumulation)
    total_steps: int
    warmup_steps: int
    mix_ramp_steps: int  # loss.target_mix ramp


def run(cfg: DictConfig | Mapping) -> dict:
    """Train according to ``cfg`` (checked against :class:`pretrain.config.PretrainConfig`); the final metrics."""
    setup_logging(os.environ.get("LOG_LEVEL", "INFO"))
    return Trainer(cfg).train()


class Trainer:
    """One pretraining run on this rank (every rank builds one; DeepSpeed keeps them in step)."""

    def __init__(self, cfg: DictConfig | Mapping):
        # Everything that can be checked without a process group is checked here, before one starts.
        self.cfg = cfg = apply_schema(PretrainConfig, cfg)
        if OmegaConf.is_missing(cfg.data, "manifest") or not cfg.data.manifest:
            raise InputError(None, "data.manifest", "the path of a shard manifest.json", "none given")
        resolve_model_config(cfg.model)  # unknown model.* keys are refused now, not after the process group
        self.micro, self.accum = int(cfg.train.micro_batch_size), int(cfg.train.grad_accumulation)
        if self.micro < 1 or self.accum < 1:
            raise InputError(
                None, "train.micro_batch_size/grad_accumulation", "positive integers", (self.micro, self.accum)
            )
        self.data_seed = int(cfg.data.seed if cfg.data.seed is not None else cfg.seed)
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.position = Position()
        self.resume_tag: str | None = None
        self.resume_state: dict = {}
        self.last_saved_step = -1
        self.steps_this_run = 0
        self._step_loss: torch.Tensor | float = 0.0  # summed on the device; read once per optimizer step
        self._step_acc = [0.0, 0.0]
        self._is_setup = False

    # -----------------------------------------------------------------------------------------
    # setup

    def setup(self) -> None:
        """Process group, plan, model and engine, resume, outputs, loader, logging (in that order)."""
        self._init_distributed()
        manifest = load_manifest(self.cfg.data.manifest)
        self.plan = self._make_plan(manifest)
        self._build_engine(manifest)
        self.load_checkpoint()
        self._prepare_outputs()
        self._build_loader()
        self._build_logging()
        self._is_setup = True

    def _init_distributed(self) -> None:
        cfg = self.cfg
        self.accelerator = accelerator = get_accelerator()
        backend = cfg.deepspeed.dist_backend
        if backend in (None, "auto"):
            backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
        self.backend = backend
        deepspeed.init_distributed(dist_backend=backend)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_rank0 = self.rank == 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if accelerator.device_name() == "cpu":
            self.device = torch.device("cpu")
            threads = cfg.train.cpu_threads
            if threads in (None, "auto"):
                local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
                threads = max(1, len(os.sched_getaffinity(0)) // max(1, local_size))
            torch.set_num_threads(int(threads))
        else:
            accelerator.set_device(self.local_rank)
            self.device = torch.device(accelerator.device_name(self.local_rank))
        self.global_micro = self.micro * self.world_size  # pairs each contrastive loss sees
        self.global_batch = self.global_micro * self.accum

    def _make_plan(self, manifest: dict) -> Plan:
        """The epoch length in optimizer steps, and micro batches per rank (a multiple of the accumulation)."""
        cfg, train = self.cfg, self.cfg.train
        if train.steps_per_epoch:
            steps_per_epoch = int(train.steps_per_epoch)
        else:
            steps_per_epoch = steps_per_epoch_for(int(manifest["n_samples"]), self.micro, self.world_size) // self.accum
        if steps_per_epoch < 1:
            raise InputError(
                cfg.data.manifest,
                "n_samples",
                f"at least one global batch of {self.global_batch} cells "
                f"(micro {self.micro} x accumulation {self.accum} x {self.world_size} ranks)",
                manifest["n_samples"],
            )
        total_steps = int(train.max_steps) if train.max_steps else int(train.epochs) * steps_per_epoch
        warmup_steps = (
            int(train.warmup_steps) if train.warmup_steps is not None else round(train.warmup_epochs * steps_per_epoch)
        )
        check_schedule(train.lr, warmup_steps, total_steps, train.start_lr, train.final_lr)
        mix = cfg.loss.target_mix
        mix_ramp_steps = round(float(mix.ramp_epochs) * steps_per_epoch)
        target_mix_at(0, mix.start, mix.end, mix_ramp_steps)  # validate before building anything
        return Plan(steps_per_epoch, steps_per_epoch * self.accum, total_steps, warmup_steps, mix_ramp_steps)

    def _build_engine(self, manifest: dict) -> None:
        cfg, train, plan = self.cfg, self.cfg.train, self.plan
        # Model: identical initialisation on every rank, then per-rank random streams.
        self.model_config = model_cfg = resolve_model_section(cfg, manifest)
        cfg.model = model_cfg  # the resolved section is what config.yaml records
        torch.manual_seed(int(cfg.seed))
        self.model = build_model(model_cfg)
        if model_cfg["compile"]:
            compile_towers(self.model)  # the towers only; checkpoints keep the plain state-dict keys
        temperature = LearnableTemperature(train.temperature.init, train.temperature.min, train.temperature.max)
        module = PASTTrainingModule(self.model, temperature)
        torch.manual_seed(int(cfg.seed) * 1000 + self.rank + 1)

        self.bf16 = use_bf16(train.precision, self.accelerator)
        ds_config = build_deepspeed_config(cfg, self.world_size, self.bf16)
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        optimizer = torch.optim.AdamW(
            parameter_groups(module, float(train.weight_decay)),
            lr=float(train.start_lr),
            betas=tuple(train.betas),
            eps=float(train.eps),
        )

        def make_schedule(opt: torch.optim.Optimizer) -> WarmupCosineSchedule:
            return WarmupCosineSchedule(
                opt,
                peak_lr=float(train.lr),
                warmup_steps=plan.warmup_steps,
                total_steps=plan.total_steps,
                start_lr=float(train.start_lr),
                final_lr=float(train.final_lr),
            )

        self.engine, _, _, self.schedule = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=make_schedule,
            config=ds_config,
            dist_init_required=False,
        )
        self.float_dtype = torch.bfloat16 if self.bf16 else torch.float32

    def load_checkpoint(self) -> None:
        """Resume from ``cfg.resume`` (a tag, or ``latest`` when one exists): weights, optimizer, position."""
        tag = self.resume_tag = ckpt.resolve_resume(self.ckpt_dir, self.cfg.resume)
        if tag is None:
            return
        state = self.resume_state = ckpt.load_checkpoint(self.engine, self.ckpt_dir, tag)
        pos = self.position = Position(
            int(state["step"]), int(state["epoch"]), int(state["micro_in_epoch"]), int(state.get("samples_seen", 0))
        )
        if (
            int(state.get("data_seed", self.data_seed)) != self.data_seed
            or int(state.get("micro_per_epoch", self.plan.micro_per_epoch)) != self.plan.micro_per_epoch
        ):
            log.warning("resuming %s with a different data seed or epoch length: the data order will differ", tag)
        if int(state.get("world_size", self.world_size)) != self.world_size:
            log.warning(
                "resuming %s saved with %s ranks on %d ranks: each rank's shard split changes",
                tag,
                state.get("world_size"),
                self.world_size,
            )
        self.schedule.set_step(pos.step)
        self.last_saved_step = pos.step
        log.info(
            "resumed from %s: step %d, epoch %d, micro batch %d of the epoch",
            tag,
            pos.step,
            pos.epoch,
            pos.micro_in_epoch,
        )

    def _prepare_outputs(self) -> None:
        plan = self.plan
        if self.is_rank0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out_dir / "config.yaml")
            log.info(
                "training %d steps (%d per epoch, warm-up %d) on %d ranks [%s, %s, ZeRO-%d]: global batch %d = micro %d "
                "x accumulation %d x %d ranks; negatives per loss %d",
                plan.total_steps,
                plan.steps_per_epoch,
                plan.warmup_steps,
                self.world_size,
                self.backend,
                "bf16" if self.bf16 else "fp32",
                self.zero_stage,
                self.global_batch,
                self.micro,
                self.accum,
                self.world_size,
                self.global_micro,
            )

    def _build_loader(self) -> None:
        data = self.cfg.data
        augment = OmegaConf.to_container(data.augment) if isinstance(data.augment, DictConfig) else data.augment
        self.loader, _ = make_loader(
            data.manifest,
            self.micro,
            rank=self.rank,
            world_size=self.world_size,
            epoch=self.position.epoch,
            seed=self.data_seed,
            num_workers=int(data.num_workers),
            shuffle_buffer=int(data.shuffle_buffer),
            resample=bool(data.resample),
            augment=augment,
            steps_per_epoch=self.plan.micro_per_epoch,
            decoder=data.decoder,
            pin_memory=self.device.type == "cuda",
            split=data.split,
        )
        self.bad_data = BadData(float(data.max_bad_fraction), int(data.bad_samples_allowed), self.rank, self.device)
        if self.resume_tag is not None:
            self.bad_data.restore(self.resume_state, self.position.epoch)

    def _build_logging(self) -> None:
        cfg = self.cfg
        try:
            self.flops_per_sample = float(estimate_flops_per_sample(self.model_config)["train"])
        except Exception as exc:  # FLOP estimates are for logging only
            log.warning("no FLOP estimate for this model (%s): MFU is not logged", exc)
            self.flops_per_sample = None
        peak = cfg.log.peak_tflops_per_device
        self.peak_flops = float(peak) * 1e12 if peak else None
        # purge_step: TensorBoard drops what a crashed run logged after the checkpoint we resume from.
        self.writer = ScalarWriter(
            self.out_dir / "tensorboard",
            enabled=self.is_rank0,
            purge_step=self.position.step + 1 if self.resume_tag else None,
            wandb_run=(
                start_wandb(cfg.log.wandb, self.out_dir, OmegaConf.to_container(cfg, resolve=True))
                if self.is_rank0
                else None
            ),
        )
        self.sample_log = _SampleLog(
            self.out_dir / "debug" / f"samples_rank{self.rank}.jsonl" if cfg.debug.log_samples else None
        )
        self.window = WindowMean(int(cfg.log.window_steps))
        guard = cfg.loss.collapse_guard
        self.collapse_guard = CollapseGuard(
            self.global_micro,
            self.plan.warmup_steps,
            epsilon=float(guard.epsilon),
            window_steps=int(guard.window_steps),
            stop_after_steps=guard.stop_after_steps,
            enabled=bool(guard.enabled),
        )
        self.timer = StepTimer()
        self.start_time = time.perf_counter()

    # -----------------------------------------------------------------------------------------
    # step

    def step(self, batch: Mapping[str, Any]) -> dict | None:
        """One micro batch: forward, loss, backward, DeepSpeed step (which steps the optimizer and the
        schedule at the accumulation boundary). After the last micro batch of an optimizer step:
        position advanced, and that step's figures returned; before it, None. (τ needs no clamp: it is a
        bounded function of its parameter, pretrain.loss.LearnableTemperature.)"""
        pos, plan, mix = self.position, self.plan, self.cfg.loss.target_mix
        lr = self.schedule.lr
        # Padding trim and niche-graph edges on the host: the forward on the device reads no size back.
        out = self.engine(_to_device(prepare_host_batch(batch, self.model_config), self.device, self.float_dtype))
        target_mix = target_mix_at(pos.step, mix.start, mix.end, plan.mix_ramp_steps)
        loss = similarity_adjusted_loss(
            out["img_emb"],
            out["cell_emb"],
            out["temperature"],
            detach_targets=bool(self.cfg.loss.detach_targets),
            target_mix=target_mix,
        )
        self.engine.backward(loss)
        self.engine.step()
        measure = self._measures_retrieval(pos.step + 1)
        if measure:  # gathers + B×B similarities + host syncs: only where they are written
            acc = retrieval_accuracy(out["img_emb"].detach(), out["cell_emb"].detach())
            self._step_acc = [self._step_acc[0] + acc[0] / self.accum, self._step_acc[1] + acc[1] / self.accum]
        self._step_loss = self._step_loss + loss.detach() / self.accum  # no host sync per micro batch
        self.sample_log.write(
            {
                "step": pos.step + 1,
                "epoch": pos.epoch,
                "micro": pos.micro_in_epoch,
                "lr": lr,
                "keys": list(batch["key"]),
            }
        )
        pos.micro_in_epoch += 1
        if pos.micro_in_epoch % self.accum:
            return None

        # One optimizer step done (DeepSpeed stepped at the accumulation boundary).
        pos.step += 1
        pos.samples_seen += self.global_batch
        self.steps_this_run += 1
        # One host sync per optimizer step: the loss (for the collapse guard) and τ (from the forward:
        # works with partitioned ZeRO-3 weights).
        step_loss, tau = torch.stack([self._step_loss.float(), out["temperature"].detach().float()]).tolist()
        figures = {
            "loss": step_loss,
            "acc_img_to_cell": self._step_acc[0] if measure else None,  # None: not measured at this step
            "acc_cell_to_img": self._step_acc[1] if measure else None,
            "lr": lr,
            "target_mix": target_mix,
            "tau": tau,
        }
        self._step_loss, self._step_acc = 0.0, [0.0, 0.0]
        return figures

    def _measures_retrieval(self, step: int) -> bool:
        """Retrieval top-1 is measured at logging steps and over the final metrics' window (1-based step)."""
        total = self.plan.total_steps
        every = max(1, int(self.cfg.log.every_steps))
        return step % every == 0 or step >= total or step > total - int(self.cfg.log.window_steps)

    # -----------------------------------------------------------------------------------------
    # train

    def train(self) -> dict:
        """The loop (module docstring); returns the final metrics."""
        if not self._is_setup:
            self.setup()
        cfg, pos, plan, timer = self.cfg, self.position, self.plan, self.timer
        log_every = max(1, int(cfg.log.every_steps))
        every_ckpt = int(cfg.checkpoint.every_steps or 0)
        progress = tqdm(
            total=plan.total_steps,
            initial=pos.step,
            disable=not self.is_rank0,
            desc="pretrain",
            unit="step",
            dynamic_ncols=True,
        )
        self.engine.train()
        while pos.step < plan.total_steps:
            # Resume mid-epoch: the same stream, minus the batches already trained on, which the loader
            # passes over without decoding them (keys found unreadable then are passed over uncounted).
            self.loader.set_epoch(pos.epoch, skip=pos.micro_in_epoch, bad_keys=self.bad_data.epoch_keys)
            if pos.micro_in_epoch and self.is_rank0:
                log.info("skipping %d micro batches of epoch %d already trained on", pos.micro_in_epoch, pos.epoch)
            batches = self.bad_data.watch(_timed_batches(iter(self.loader), timer), pos.epoch)
            timer.restart()
            for batch in batches:
                figures = self.step(batch)
                if figures is None:
                    continue
                step_time = timer.elapsed_s()
                self.window.add(loss=figures["loss"], tau=figures["tau"])
                if figures["acc_img_to_cell"] is not None:
                    self.window.add(
                        acc_img_to_cell=figures["acc_img_to_cell"], acc_cell_to_img=figures["acc_cell_to_img"]
                    )
                try:  # warns and flags after loss.collapse_guard.window_steps at ln(pairs); raises at stop_after_steps
                    figures["collapsed"] = self.collapse_guard.update(pos.step, figures["loss"])
                except CollapseError as exc:
                    self.writer.write(pos.step, {"train/collapsed": 1.0, "train/loss": figures["loss"]})
                    self.writer.close()
                    if self.is_rank0:
                        log.error("%s", exc)
                    raise
                if pos.step % log_every == 0 or pos.step == plan.total_steps:
                    self._write_scalars(figures, step_time)
                    self.bad_data.check(self.writer, pos.step)  # the same totals, and error, on every rank
                if figures["acc_img_to_cell"] is not None:
                    progress.set_postfix(
                        loss=f"{figures['loss']:.3f}",
                        acc=f"{figures['acc_img_to_cell']:.2f}/{figures['acc_cell_to_img']:.2f}",
                        lr=f"{figures['lr']:.2e}",
                        tau=f"{figures['tau']:.3f}",
                        refresh=False,
                    )
                progress.update(1)

                if pos.micro_in_epoch >= plan.micro_per_epoch:
                    pos.epoch, pos.micro_in_epoch = pos.epoch + 1, 0
                    if cfg.checkpoint.at_epoch_end:
                        self.save()
                if every_ckpt and pos.step % every_ckpt == 0 and self.last_saved_step != pos.step:
                    self.save()
                if pos.step % log_every == 0:
                    self.writer.flush()
                timer.restart()
                if pos.step >= plan.total_steps:
                    break
            if pos.step < plan.total_steps and pos.micro_in_epoch:  # the loader ran dry before the epoch's end
                raise RuntimeError(
                    f"rank {self.rank}: epoch {pos.epoch} ended after {pos.micro_in_epoch} of "
                    f"{plan.micro_per_epoch} micro batches"
                )
        progress.close()
        if self.last_saved_step != pos.step:
            self.save()
        return self._finish()

    def _write_scalars(self, figures: Mapping[str, float], step_time: float) -> None:
        pos, timer = self.position, self.timer
        # (world_size, 3): samples/s, data wait (s) and step time (s) of every rank
        per_rank = gather_floats(
            [self.micro * self.accum / max(step_time, 1e-9), timer.data_wait_s, step_time], self.device
        )
        scalars = {
            "train/loss": figures["loss"],
            "train/temperature": figures["tau"],
            "train/target_mix": figures["target_mix"],
            "train/lr": figures["lr"],
            "train/retrieval_top1_img_to_cell": figures["acc_img_to_cell"],
            "train/retrieval_top1_cell_to_img": figures["acc_cell_to_img"],
            "train/collapsed": float(figures.get("collapsed", False)),  # 1: loss at ln(pairs) (pretrain.collapse)
            "train/retrieval_chance": 1.0 / self.global_micro,
            "train/epoch": pos.epoch + pos.micro_in_epoch / self.plan.micro_per_epoch,
            "train/samples_seen": pos.samples_seen,
        }
        scalars.update(
            throughput_scalars(
                per_rank,
                self.global_batch,
                int(self.cfg.log.per_rank_limit),
                self.flops_per_sample,
                self.peak_flops,
            )
        )
        self.writer.write(pos.step, {name: value for name, value in scalars.items() if value is not None})

    def client_state(self) -> dict:
        """The position and what it depends on, saved with every checkpoint."""
        pos, plan = self.position, self.plan
        return {
            "step": pos.step,
            "epoch": pos.epoch,
            "micro_in_epoch": pos.micro_in_epoch,
            "micro_per_epoch": plan.micro_per_epoch,
            "steps_per_epoch": plan.steps_per_epoch,
            "data_seed": self.data_seed,
            "seed": int(self.cfg.seed),
            "samples_seen": pos.samples_seen,
            "world_size": self.world_size,
            "lr_next": self.schedule.lr,
        }

    def save(self) -> None:
        """A checkpoint of this step on every rank, published as ``latest`` once complete."""
        ckpt.save_checkpoint(
            self.engine,
            self.ckpt_dir,
            self.position.step,
            {**self.client_state(), **self.bad_data.state()},  # bad_data.state(): collective, every rank
            write_extras=lambda tag_dir: save_config(self.cfg, tag_dir / "config.yaml"),
            keep_last=self.cfg.checkpoint.keep_last,
        )
        self.last_saved_step = self.position.step

    def _finish(self) -> dict:
        pos = self.position
        bad = self.bad_data.check()  # collective; raises past the bound like the logging steps
        wall_s = time.perf_counter() - self.start_time
        window = self.window
        metrics = {
            "step": pos.step,
            "epoch": pos.epoch,
            "steps_this_run": self.steps_this_run,
            "window_steps": window.count("loss"),
            "loss": window.mean("loss"),
            "temperature": window.mean("tau"),
            "retrieval_top1_img_to_cell": window.mean("acc_img_to_cell"),
            "retrieval_top1_cell_to_img": window.mean("acc_cell_to_img"),
            "chance": 1.0 / self.global_micro,
            "global_micro_batch": self.global_micro,
            "global_batch": self.global_batch,
            "world_size": self.world_size,
            "samples_seen": pos.samples_seen,
            "wall_time_s": wall_s,
            "samples_per_s": self.steps_this_run * self.global_batch / max(wall_s, 1e-9),
            # Model FLOP utilisation over the whole run (wall time incl. start-up; TensorBoard has it per step).
            "mfu": (
                self.steps_this_run
                * self.global_batch
                * self.flops_per_sample
                / max(wall_s, 1e-9)
                / (self.world_size * self.peak_flops)
                if self.flops_per_sample and self.peak_flops
                else None
            ),
            "bad_samples": bad["bad_samples"],  # unreadable samples skipped (all ranks, whole run)
            "bad_fraction": bad["bad_fraction"],
            "bad_examples": self.bad_data.examples,  # this rank's first few: shard, key, error
        }
        if self.is_rank0 and self.steps_this_run:
            write_json(self.out_dir / "final_metrics.json", metrics)
            log.info(
                "retrieval top-1 (mean of the last %d steps): image→cell %.3f, cell→image %.3f; chance %.4f (1/%d)",
                metrics["window_steps"],
                metrics["retrieval_top1_img_to_cell"],
                metrics["retrieval_top1_cell_to_img"],
                metrics["chance"],
                self.global_micro,
            )
        if self.cfg.debug.dump_final_weights:
            _dump_weights(self.engine, self.out_dir / "debug" / f"final_weights_rank{self.rank}.pt", self.zero_stage)
        self.writer.close()
        self.sample_log.close()
        dist.barrier()
        return metrics


# ---------------------------------------------------------------------------------------------
# Helpers of the loop


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


_IMAGES = DeviceImages(IMAGENET_MEAN, IMAGENET_STD)


def _to_device(
    batch: Mapping[str, Any], device: torch.device, float_dtype: torch.dtype, images: DeviceImages = _IMAGES
) -> dict[str, torch.Tensor]:
    """The model's tensors of a loader batch (:mod:`pretrain.collate`) on the device.

    The uint8 crops travel as uint8 (a quarter of float32's bytes); flips/rotations, colour jitter
    and normalisation run there (:class:`pretrain.augment.DeviceImages`), and only the image tensor
    is cast to the engine's dtype (bf16/fp32). µm offsets and every other float stay float32.
    """
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and key not in ("dihedral", "colour"):
            moved[key] = value.to(device, non_blocking=True)
    colour = batch.get("colour")
    if colour is not None:
        colour = colour.to(device, non_blocking=True)
    moved["image"] = images(moved["image"], batch["dihedral"], colour, float_dtype)  # (B, 3, H, W)
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


def _dump_weights(engine: Any, path: Path, zero_stage: int) -> None:
    """This rank's copy of the full weights (debug: ranks must agree after training)."""
    if zero_stage >= 3:
        log.warning("debug.dump_final_weights is not supported under ZeRO-3 (weights are partitioned)")
        return
    state = {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
