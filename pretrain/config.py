"""Typed settings of a pretraining run: one schema for ``configs/pretrain/*.yaml``.

``deepspeed launch/pretrain.py --config <yaml> [key=value ...]`` and ``launch/export.py`` (whose
overrides apply to the run config saved with a checkpoint) check the YAML file and the overrides
against :class:`PretrainConfig` with :func:`common.config.load_config`: an unknown key anywhere
(``train.learning_rate``, ``chekpoint.every_steps``) or a value of the wrong type is refused,
naming the key and the closest valid one, before any process group starts or any file is
written. :func:`common.config.apply_schema` does the same for a dict given by a test or a notebook.

The ``model`` section is left open here: :func:`pretrain.models.resolve_model_config` checks it
against ``pretrain.models.DEFAULT_MODEL_CONFIG`` (its keys, defaults and table live there).
``deepspeed.overrides`` belongs to DeepSpeed's JSON config and is checked by DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class DataConfig:
    """The shards and how they are read (``pretrain.data.make_loader``)."""

    manifest: Optional[str] = None  # data_shards manifest.json (or its folder); required
    seed: Optional[int] = None  # shard order / shuffles; null: the run's seed
    num_workers: int = 2  # loader worker processes per rank
    shuffle_buffer: int = 1000  # samples buffered for shuffling (<= 1 disables it)
    resample: bool = False  # draw shards with replacement (any number of shards per rank)
    augment: Any = True  # true: pretrain.augment.AugmentConfig defaults; false: none; or a dict of its fields
    decoder: str = "imagecodecs"  # JPEG decoder: imagecodecs (fastest measured), torchvision or pil
    split: str = "samples"  # samples: equal sample ranges per rank/worker (any shard sizes); shards: whole shards
    max_bad_fraction: float = 0.001  # stop when more than this fraction of the samples read is unreadable...
    bad_samples_allowed: int = 10  # ...and more than this many are (unreadable samples are skipped and counted)


@dataclass
class TemperatureConfig:
    """The loss's learnable temperature τ (``pretrain.loss.LearnableTemperature``)."""

    init: float = 0.07  # τ at initialisation (strictly between min and max)
    min: float = 0.01  # τ = min + (max − min)·sigmoid(raw): within [min, max] under any optimizer / ZeRO stage
    max: float = 1.0


@dataclass
class TrainConfig:
    """Batch, length of the run, optimizer and learning-rate schedule, precision."""

    micro_batch_size: int = 64  # cells per rank per micro batch
    grad_accumulation: int = 1  # micro batches per optimizer step
    epochs: int = 10
    max_steps: Optional[int] = None  # stop after this many optimizer steps (the schedule then spans them)
    steps_per_epoch: Optional[int] = None  # optimizer steps per epoch; null: one pass over the manifest
    lr: float = 1.0e-3  # peak (PAST)
    start_lr: float = 1.0e-6  # warm-up start (PAST)
    final_lr: float = 1.0e-5  # cosine floor
    warmup_epochs: float = 1.0  # PAST: the first epoch
    warmup_steps: Optional[int] = None  # overrides warmup_epochs when set
    weight_decay: float = 0.05  # AdamW, on weight matrices only (pretrain.training_module.parameter_groups)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW
    eps: float = 1.0e-6  # AdamW
    grad_clip: Optional[float] = 1.0  # max global gradient norm (DeepSpeed gradient_clipping); 0 or null disables
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    precision: str = "auto"  # auto: bf16 where the accelerator has it (not on CPU), else fp32; or bf16/fp32
    cpu_threads: Any = "auto"  # torch threads per rank on CPU: "auto" (cores / local ranks) or a number


@dataclass
class TargetMixConfig:
    """λ of pretrain.loss (targets = (1 − λ)·I + λ·PAST soft targets), linear from start to end over the
    first ramp_epochs epochs, then end. 1/1/0 is the paper's objective; start 0 begins as CLIP."""

    start: float = 1.0
    end: float = 1.0
    ramp_epochs: float = 0.0


@dataclass
class CollapseGuardConfig:
    """Stop a run whose loss sits at ln(pairs per loss), the uniform fixed point (``pretrain.collapse``)."""

    enabled: bool = True
    epsilon: float = 0.01  # nats: |loss − ln(world size × micro batch)| below this counts as a collapsed step
    window_steps: int = 100  # this many consecutive collapsed steps after the warm-up: warning + train/collapsed
    stop_after_steps: Optional[int] = 1000  # ... this many: stop with an error; 0 or null: only warn


@dataclass
class LossConfig:
    """The similarity-adjusted contrastive loss (``pretrain.loss.similarity_adjusted_loss``)."""

    target_mix: TargetMixConfig = field(default_factory=TargetMixConfig)
    # false (the authors' code): gradient flows through the soft targets too. true: targets are labels,
    # which makes "every embedding alike" a stationary point the run can collapse into (README, pretraining).
    detach_targets: bool = False
    collapse_guard: CollapseGuardConfig = field(default_factory=CollapseGuardConfig)


@dataclass
class DeepSpeedSection:
    """DeepSpeed's JSON config and process group (``pretrain.deepspeed_config.build_deepspeed_config``)."""

    config: Optional[str] = None  # configs/deepspeed/*.json; the train.* keys fill batch, clipping, precision
    overrides: dict[str, Any] = field(default_factory=dict)  # merged over the JSON (e.g. zero_optimization.stage=2)
    dist_backend: Optional[str] = "auto"  # auto: gloo on CPU, the accelerator's (nccl) otherwise


@dataclass
class CheckpointConfig:
    """When checkpoints are written (``pretrain.checkpoint``)."""

    every_steps: Optional[int] = 1000  # optimizer steps between checkpoints; 0 or null: only at epoch ends / the end
    at_epoch_end: bool = True
    keep_last: Optional[int] = None  # keep only the newest N checkpoints; null keeps all


@dataclass
class WandbConfig:
    """Optional Weights & Biases logging of the same scalars as TensorBoard (rank 0; needs `pip install wandb`)."""

    enabled: bool = False  # off by default: TensorBoard is always written
    project: str = "past-pretrain"  # W&B project
    run_name: Optional[str] = None  # display name; null = the out_dir's name
    mode: str = "offline"  # offline (files under <out_dir>/wandb, `wandb sync` later) | online | disabled


@dataclass
class LogConfig:
    """TensorBoard scalars and the final metrics."""

    every_steps: int = 10
    window_steps: int = 20  # final metrics average the last N steps
    per_rank_limit: int = 16  # write per-rank throughput scalars up to this many ranks
    peak_tflops_per_device: Optional[float] = None  # for MFU (e.g. 312 for A100 bf16, 989 for H100 SXM)
    wandb: WandbConfig = field(default_factory=WandbConfig)  # optional W&B mirror of the scalars


@dataclass
class DebugConfig:
    log_samples: bool = False  # debug/samples_rank<r>.jsonl: the sample keys each rank trained on, per step
    dump_final_weights: bool = False  # debug/final_weights_rank<r>.pt: every rank's weights at the end


@dataclass
class PretrainConfig:
    """A pretraining run (``deepspeed launch/pretrain.py``)."""

    out_dir: str = "runs/pretrain"  # config.yaml, checkpoints/, tensorboard/, final_metrics.json
    seed: int = 0  # model initialisation (same on every rank) and per-rank random streams
    resume: Optional[str] = None  # null: start fresh; "latest": newest complete checkpoint if any; or a tag
    data: DataConfig = field(default_factory=DataConfig)
    # pretrain.models.DEFAULT_MODEL_CONFIG (checked there); cell.vocab_size / context_length null = from the manifest
    model: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
