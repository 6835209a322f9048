"""Unreadable training data: counted, logged, bounded; never a reason for one rank to die alone.

The loader replaces an unreadable sample (bad JPEG, truncated .npy, missing member) by the next
one and lists it in the batch's ``bad`` entry, with the shard and key; a shard that cannot be read
to its end (truncated tar) is listed once with the samples lost (:mod:`pretrain.data`). Every
rank keeps its batch count, so ranks stay in step. Here each rank logs what its batches list and
counts it; at logging steps and at the end the counts are summed over ranks (one all-reduce, so
every rank sees the same totals) and written to TensorBoard (``data/bad_samples``,
``data/bad_fraction``). When more than ``allowed`` samples are bad AND their fraction of the samples
read passes ``max_fraction``, every rank raises the same error at the same step: the data, not
a peer's crash, ends the run.

A checkpoint records the totals so far and the keys found unreadable in the current epoch: a
resumed run passes over those keys when it skips the epoch's consumed batches without decoding
them (:meth:`pretrain.data.ShardStream.set_epoch`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
import torch.distributed as dist

from common.errors import InputError

log = logging.getLogger(__name__)

EXAMPLES_KEPT = 20  # unreadable samples named in the final metrics


class BadData:
    """One rank's account of unreadable samples (module docstring)."""

    def __init__(self, max_fraction: float, allowed: int, rank: int, device: torch.device):
        if not 0 <= max_fraction <= 1 or allowed < 0:
            raise InputError(
                None,
                "data.max_bad_fraction/bad_samples_allowed",
                "a fraction in [0, 1] and a count >= 0",
                (max_fraction, allowed),
            )
        self.max_fraction, self.allowed = float(max_fraction), int(allowed)
        self.rank, self.device = rank, device
        self.local_bad = self.local_read = 0  # this process, this rank
        self.carried_bad = self.carried_read = 0  # all ranks, before this process (from the checkpoint)
        self.epoch: int | None = None
        self.epoch_keys: set[str] = set()  # keys of the current epoch found unreadable on this rank
        self.examples: list[dict] = []

    def watch(self, batches: Iterator[dict], epoch: int) -> Iterator[dict]:
        """Pass batches through, recording their ``bad`` entries."""
        if epoch != self.epoch:
            self.epoch, self.epoch_keys = epoch, set()
        for batch in batches:
            self.record(batch)
            yield batch

    def record(self, batch: dict) -> None:
        self.local_read += len(batch["key"])
        for entry in batch.get("bad", ()):
            self.local_bad += int(entry["samples"])
            self.local_read += int(entry["samples"]) if entry["key"] is not None else 0
            log.warning(
                "rank %d: skipped unreadable data, shard %s, key %s (%d samples): %s",
                self.rank,
                entry["shard"],
                entry["key"] if entry["key"] is not None else "(rest of the shard)",
                entry["samples"],
                entry["error"],
            )
            if entry["key"] is not None:
                self.epoch_keys.add(entry["key"])
            if len(self.examples) < EXAMPLES_KEPT:
                self.examples.append({**entry, "rank": self.rank})

    def totals(self) -> tuple[int, int]:
        """(bad, read) samples over all ranks since the run began (collective: every rank calls it)."""
        counts = torch.tensor([self.local_bad, self.local_read], dtype=torch.int64, device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        bad, read = counts.tolist()
        return self.carried_bad + bad, self.carried_read + read

    def check(self, writer=None, step: int | None = None) -> dict:
        """Totals to TensorBoard; the same error on every rank past the bound (collective)."""
        bad, read = self.totals()
        fraction = bad / max(read, 1)
        if writer is not None:
            writer.write(step, {"data/bad_samples": bad, "data/bad_fraction": fraction})
        if bad > self.allowed and fraction > self.max_fraction:
            named = ", ".join(f"{e['shard']} [{e['key']}]" for e in self.examples[:3]) or "on other ranks"
            raise InputError(
                self.examples[0]["shard"] if self.examples else None,
                "data.max_bad_fraction",
                f"at most {self.max_fraction:g} of the samples unreadable (beyond data.bad_samples_allowed="
                f"{self.allowed})",
                f"{bad} of {read} samples ({fraction:.2%}) unreadable, e.g. {named}",
            )
        return {"bad_samples": bad, "read_samples": read, "bad_fraction": fraction}

    def state(self) -> dict:
        """What a checkpoint records (collective): totals and the current epoch's unreadable keys."""
        bad, read = self.totals()
        keys = sorted(self.epoch_keys)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, keys)
            keys = sorted({k for part in gathered for k in part})
        return {"bad_samples": bad, "read_samples": read, "bad_keys_in_epoch": keys}

    def restore(self, state: dict, epoch: int) -> None:
        """Continue the totals of a checkpoint (``state`` = its client state) in ``epoch``."""
        self.carried_bad = int(state.get("bad_samples", 0))
        self.carried_read = int(state.get("read_samples", 0))
        self.epoch, self.epoch_keys = epoch, set(state.get("bad_keys_in_epoch", ()))
