"""Training metrics: step timing and throughput meters, TensorBoard scalars on rank 0.

Throughput is measured per optimizer step on every rank (samples this rank processed / wall
time of the step, and the part of that time spent waiting for the data loader), gathered to all
ranks at each logging step so rank 0 can write the total, the per-rank values and their spread.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.errors import InputError

log = logging.getLogger(__name__)


class StepTimer:
    """Wall time of one optimizer step and the part of it spent waiting for batches (seconds)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.data_wait_s = 0.0

    def restart(self) -> None:
        self.start = time.perf_counter()
        self.data_wait_s = 0.0

    def add_data_wait(self, seconds: float) -> None:
        self.data_wait_s += seconds

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start


class WindowMean:
    """Mean of the last ``size`` values of each named metric (for end-of-run summaries)."""

    def __init__(self, size: int):
        self.values: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=size))

    def add(self, **values: float) -> None:
        for name, value in values.items():
            self.values[name].append(float(value))

    def mean(self, name: str) -> float | None:
        values = self.values.get(name)
        return sum(values) / len(values) if values else None

    def count(self, name: str) -> int:
        return len(self.values.get(name, ()))


def gather_floats(values: list[float], device: torch.device) -> torch.Tensor:
    """Every rank's ``values`` as a (world_size, len(values)) float64 tensor on the CPU."""
    local = torch.tensor(values, dtype=torch.float64, device=device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local[None].cpu()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.stack(parts).cpu()


def throughput_scalars(
    per_rank: torch.Tensor,
    global_batch: int,
    per_rank_limit: int = 16,
    flops_per_sample: float | None = None,
    peak_flops_per_device: float | None = None,
) -> dict[str, float]:
    """Scalars from the gathered (world_size, 3) [samples/s, data wait s, step time s] of a step.

    Total samples/s is the global batch over the slowest rank's step time (the ranks synchronise
    every step, so the job moves at the pace of the slowest one). Per-rank values are written for
    up to ``per_rank_limit`` ranks; their min/mean/max always.
    """
    samples_per_s, wait_s = per_rank[:, 0], per_rank[:, 1]
    step_time_s = float(per_rank[:, 2].max())
    total = global_batch / max(step_time_s, 1e-9)
    scalars = {
        "throughput/samples_per_s": total,
        "throughput/samples_per_s_per_rank_min": float(samples_per_s.min()),
        "throughput/samples_per_s_per_rank_mean": float(samples_per_s.mean()),
        "throughput/samples_per_s_per_rank_max": float(samples_per_s.max()),
        "time/step_s": step_time_s,
        "time/data_wait_s_mean": float(wait_s.mean()),
        "time/data_wait_s_max": float(wait_s.max()),
        "time/data_wait_fraction": float(wait_s.mean()) / max(step_time_s, 1e-9),
    }
    if per_rank.shape[0] <= per_rank_limit:
        for rank, value in enumerate(samples_per_s.tolist()):
            scalars[f"throughput_per_rank/samples_per_s_rank{rank:03d}"] = value
    if flops_per_sample:
        achieved = total * flops_per_sample  # training FLOP/s of the whole job
        scalars["throughput/tflops_per_device"] = achieved / per_rank.shape[0] / 1e12
        if peak_flops_per_device:
            scalars["throughput/mfu"] = achieved / (per_rank.shape[0] * peak_flops_per_device)
    return scalars


WANDB_MODES = ("offline", "online", "disabled")
WANDB_ID_FILE = "wandb_run_id"


def start_wandb(settings: Mapping[str, Any], out_dir: Path, config: Mapping[str, Any]) -> Any:
    """A W&B run for ``log.wandb`` settings, or None when disabled. The run id is kept in
    ``<out_dir>/wandb_run_id`` so that a resumed job (resume=latest) continues the same W&B run."""
    if not settings.get("enabled"):
        return None
    mode = str(settings.get("mode", "offline"))
    if mode not in WANDB_MODES:
        raise InputError(None, "log.wandb.mode", f"one of {WANDB_MODES}", mode)
    try:
        import wandb
    except ImportError as exc:
        raise InputError(
            None, "log.wandb.enabled", "the wandb package (pip install -e '.[wandb]')", "not installed"
        ) from exc
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    id_file = out_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    id_file.write_text(run_id + "\n")
    return wandb.init(
        project=str(settings.get("project", "past-pretrain")),
        name=settings.get("run_name") or out_dir.name,
        id=run_id,
        resume="allow",
        mode=mode,
        dir=str(out_dir),
        config=dict(config),
    )


class ScalarWriter:
    """TensorBoard SummaryWriter in ``<out>/tensorboard`` on rank 0 (and the same scalars to a W&B run
    when one is given); a no-op on other ranks."""

    def __init__(self, log_dir: str | Path, enabled: bool, purge_step: int | None = None, wandb_run: Any = None):
        self.writer = None
        self.wandb_run = wandb_run if enabled else None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)
        if self.wandb_run is not None:
            self.wandb_run.log(dict(scalars), step=step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
