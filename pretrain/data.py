"""The pretraining data pipeline: webdataset shards listed in a manifest -> batches of cells.

Per loader worker: shard list -> tar samples (raw bytes) -> sample shuffle buffer -> groups of
batch_size raw samples -> late decode (JPEG, npy, json), flip/rotation, colour jitter and
normalisation, written straight into the batch; neighbours concatenated for torch-geometric.
Batch layout: :mod:`pretrain.collate`.

Which process reads what
------------------------
Ranks are passed explicitly (``rank``, ``world_size``); nothing here needs torch.distributed, so
tests can play any rank. All seeds are ``f(seed, epoch, rank, worker, purpose)`` through numpy's
``SeedSequence``, so the whole stream is a deterministic function of those numbers.

Without resampling (``resample=False``, the default), each epoch:

1. every rank computes the same permutation of the manifest's shards from ``(seed, epoch)``;
2. shards are dealt, in that order, to ranks: each shard goes to the rank holding the fewest
   samples so far (ties: lowest rank). Ranks read disjoint shards and together read all of them;
   :func:`rank_shards` returns the list a given (rank, world_size, epoch, seed) reads;
3. a rank's shards are dealt to its ``num_workers`` loader workers the same way;
4. the rank's ``steps_per_epoch`` batches are shared out among its workers by repeatedly giving the
   next batch to the worker with the most samples left unread (:func:`worker_batch_quota`).

Equal steps on every rank: every worker yields exactly its quota of full batches, and the quotas
of a rank sum to ``steps_per_epoch``, the same number on every rank. When a worker's quota needs
more samples than its shards hold (shards of unequal size, a world_size that doesn't divide the
shard count, or ``drop_last=False``) it starts a new pass over its shards (re-shuffled), so no rank
runs dry and none waits for another at the end of an epoch; when it needs fewer, the rest of its
shards is skipped this epoch (different shards every epoch, as the order changes). With the default
``steps_per_epoch = floor(n_samples / (batch_size · world_size))`` and balanced shards the overlap
and the skipped remainder are both small; a sample is repeated within an epoch only when its rank
has fewer than ``steps_per_epoch · batch_size`` samples. The shuffle buffer is emptied at the end
of each pass, so the first pass yields every sample of the worker's shards before any repeat.

With resampling (``resample=True``), each worker draws shards with replacement, weighted by their
sample counts, from its own seeded stream: an endless stream, cut at the worker's share of
``steps_per_epoch`` batches. Any shard count works (even fewer shards than ranks), but ranks no
longer read disjoint shards.

Epochs: call ``loader.set_epoch(epoch)`` (or pass ``epoch=``) before iterating; workers are not
persistent, so each ``iter(loader)`` starts them with the current epoch.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from common.errors import InputError
from data_shards.manifest import load_manifest
from data_shards.reader import tar_samples

from .augment import AugmentConfig, parse_augment
from .collate import BatchAssembler
from .models.image_encoder import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

# What a seed is for; part of every seed so that streams never share a seed.
_SHARD_ORDER, _REPEAT_ORDER, _RESAMPLE, _SAMPLE_BUFFER, _DIHEDRAL, _COLOUR = range(6)


def stream_seed(seed: int, epoch: int, purpose: int, rank: int = 0, worker: int = 0, pass_: int = 0) -> int:
    """A 63-bit seed for one random stream; distinct for every argument tuple."""
    parts = [int(seed), int(epoch), int(purpose), int(rank), int(worker), int(pass_)]
    if min(parts) < 0:
        raise InputError(None, "seed", "non-negative seed, epoch, rank and worker", parts)
    return int(np.random.SeedSequence(parts).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def steps_per_epoch_for(n_samples: int, batch_size: int, world_size: int, drop_last: bool = True) -> int:
    """Batches per rank per epoch: floor (drop_last) or ceil of n_samples / (batch_size · world_size)."""
    global_batch = batch_size * world_size
    steps = n_samples // global_batch if drop_last else -(-n_samples // global_batch)
    return int(steps)


def _deal(order: Sequence[int], sizes: Sequence[int], parts: int) -> list[list[int]]:
    """Deal items in ``order`` to ``parts`` lists, each to the part with the fewest samples so far."""
    dealt: list[list[int]] = [[] for _ in range(parts)]
    held = np.zeros(parts, dtype=np.int64)
    for item in order:
        part = int(np.argmin(held))  # first minimum: ties go to the lowest index
        dealt[part].append(int(item))
        held[part] += sizes[item]
    return dealt


def epoch_shard_order(n_shards: int, epoch: int, seed: int) -> np.ndarray:
    """The permutation of all shards every rank uses in this epoch (rank-independent)."""
    return np.random.default_rng(stream_seed(seed, epoch, _SHARD_ORDER)).permutation(n_shards)


def split_shards(shard_sizes: Sequence[int], world_size: int, epoch: int, seed: int) -> list[list[int]]:
    """Shard indices read by each rank in this epoch (disjoint, covering all shards), in reading order."""
    return _deal(epoch_shard_order(len(shard_sizes), epoch, seed), shard_sizes, world_size)


def worker_batch_quota(worker_samples: Sequence[int], steps: int, batch_size: int) -> list[int]:
    """Share ``steps`` batches among workers holding ``worker_samples`` samples (sums to ``steps``).

    Each batch goes to the worker with the most samples not yet given out (ties: lowest index):
    no worker repeats a sample while another still has a full batch unread, and a worker with
    no shards gets nothing. Workers are interleaved by the DataLoader, so uneven quotas are fine.
    """
    remaining = np.asarray(worker_samples, dtype=np.int64).copy()
    quota = [0] * len(remaining)
    if steps and not (remaining > 0).any():
        raise InputError(None, "shards", "at least one sample for this rank", "none")
    for _ in range(steps):
        worker = int(np.argmax(np.where(np.asarray(worker_samples) > 0, remaining, np.iinfo(np.int64).min)))
        quota[worker] += 1
        remaining[worker] -= batch_size
    return quota


@dataclass(frozen=True)
class RankPlan:
    """What one rank reads in one epoch. Shard indices refer to ``manifest["shards"]``."""

    rank: int
    epoch: int
    resample: bool
    shards: tuple[int, ...]  # this rank's shards (all shards when resampling)
    worker_shards: tuple[tuple[int, ...], ...]  # (num_workers,) shard lists, reading order
    worker_batches: tuple[int, ...]  # (num_workers,) batches each worker yields; sum = steps

    @property
    def steps(self) -> int:
        return sum(self.worker_batches)


def plan_rank(
    shard_sizes: Sequence[int],
    batch_size: int,
    *,
    rank: int,
    world_size: int,
    num_workers: int,
    epoch: int,
    seed: int,
    steps: int,
    resample: bool,
) -> RankPlan:
    """The epoch plan of one rank (see the module docstring)."""
    workers = max(1, num_workers)
    if resample:
        everything = tuple(range(len(shard_sizes)))
        quota = tuple(steps // workers + (1 if w < steps % workers else 0) for w in range(workers))
        return RankPlan(rank, epoch, True, everything, (everything,) * workers, quota)
    mine = split_shards(shard_sizes, world_size, epoch, seed)[rank]
    by_worker = _deal(mine, shard_sizes, workers)
    samples = [sum(shard_sizes[s] for s in shards) for shards in by_worker]
    quota = worker_batch_quota(samples, steps, batch_size)
    return RankPlan(rank, epoch, False, tuple(mine), tuple(map(tuple, by_worker)), tuple(quota))


def rank_shards(manifest: dict | str | Path, rank: int, world_size: int, epoch: int = 0, seed: int = 0) -> list[str]:
    """Paths (relative to the manifest's folder) of the shards ``rank`` reads in ``epoch`` without
    resampling, in reading order. The ranks' lists are disjoint and together cover the manifest."""
    if not isinstance(manifest, dict):
        manifest = load_manifest(manifest)
    sizes = [int(s["n_samples"]) for s in manifest["shards"]]
    return [manifest["shards"][i]["path"] for i in split_shards(sizes, world_size, epoch, seed)[rank]]


def _full_batches(samples: Iterator[dict], batch_size: int) -> Iterator[list[dict]]:
    """Consecutive full lists of ``batch_size`` samples, reading no sample beyond the one being added
    (``wds.batched`` reads one ahead, which at an epoch's end would open the next pass)."""
    while True:
        batch = list(itertools.islice(samples, batch_size))
        if len(batch) < batch_size:
            return
        yield batch


class ShardStream(IterableDataset):
    """Batches for one rank; each loader worker reads its part of the rank's :class:`RankPlan`.

    Yields exactly ``len(self)`` batches per epoch whatever ``num_workers`` is (0 included).
    """

    def __init__(
        self,
        manifest: dict,
        batch_size: int,
        *,
        rank: int,
        world_size: int,
        steps_per_epoch: int,
        epoch: int = 0,
        seed: int = 0,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        resample: bool = False,
        augment: AugmentConfig | None = None,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        decoder: str = "imagecodecs",
    ):
        super().__init__()
        self.root = Path(manifest["root"])
        self.shard_paths = [str(self.root / s["path"]) for s in manifest["shards"]]
        self.shard_sizes = [int(s["n_samples"]) for s in manifest["shards"]]
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = steps_per_epoch
        self.epoch = epoch
        self.seed = seed
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.resample = resample
        self.augment = augment
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.decoder = decoder

    def set_epoch(self, epoch: int) -> None:
        """Change every seed and the shard split for the next ``iter``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def plan(self, num_workers: int | None = None) -> RankPlan:
        return plan_rank(
            self.shard_sizes,
            self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.num_workers if num_workers is None else num_workers,
            epoch=self.epoch,
            seed=self.seed,
            steps=self.steps_per_epoch,
            resample=self.resample,
        )

    def _seed(self, purpose: int, worker: int, pass_: int = 0) -> int:
        return stream_seed(self.seed, self.epoch, purpose, self.rank, worker, pass_)

    def _shuffled(self, urls: Iterator[dict], worker: int, pass_: int) -> wds.DataPipeline:
        stages = [lambda: urls, tar_samples]  # = wds.tarfile_to_samples(), several times faster (data_shards.reader)
        if self.shuffle_buffer > 1:
            rng = random.Random(self._seed(_SAMPLE_BUFFER, worker, pass_))  # wds.shuffle calls rng.randint
            stages.append(wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng))
        return wds.DataPipeline(*stages)

    def _passes(self, shards: tuple[int, ...], worker: int) -> Iterator[dict]:
        """Raw samples of the worker's shards, pass after pass; pass 0 in the planned order."""
        expected = sum(self.shard_sizes[s] for s in shards)
        for pass_ in itertools.count():
            order = list(shards)
            if pass_ > 0:
                np.random.default_rng(self._seed(_REPEAT_ORDER, worker, pass_)).shuffle(order)
            urls = iter([{"url": self.shard_paths[s]} for s in order])
            count = 0
            for sample in self._shuffled(urls, worker, pass_):
                count += 1
                yield sample
            if count == 0:
                raise InputError(self.shard_paths[order[0]], None, "samples in the worker's shards", "empty tar files")
            if count != expected:
                log.warning(
                    "rank %d worker %d read %d samples from shards the manifest says hold %d",
                    self.rank,
                    worker,
                    count,
                    expected,
                )

    def _resampled(self, worker: int) -> Iterator[dict]:
        rng = np.random.default_rng(self._seed(_RESAMPLE, worker))
        weights = np.asarray(self.shard_sizes, dtype=np.float64)
        weights /= weights.sum()
        urls = ({"url": self.shard_paths[int(rng.choice(len(weights), p=weights))]} for _ in itertools.count())
        return iter(self._shuffled(urls, worker, 0))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        plan = self.plan(workers)
        quota = plan.worker_batches[worker]
        log.debug(
            "rank %d epoch %d worker %d/%d: %d batches from shards %s",
            self.rank,
            self.epoch,
            worker,
            workers,
            quota,
            plan.worker_shards[worker],
        )
        if quota == 0:
            return iter(())
        samples = self._resampled(worker) if self.resample else self._passes(plan.worker_shards[worker], worker)
        assemble = BatchAssembler(
            self.augment,
            dihedral_rng=np.random.default_rng(self._seed(_DIHEDRAL, worker)),
            colour_rng=np.random.default_rng(self._seed(_COLOUR, worker)),
            image_mean=self.image_mean,
            image_std=self.image_std,
            decoder=self.decoder,
        )
        pipeline = wds.DataPipeline(
            lambda: samples,  # raw bytes, shuffled
            lambda raw: _full_batches(raw, self.batch_size),
            wds.map(assemble),  # decode late: only the samples that make the batch
        )
        return itertools.islice(iter(pipeline), quota)


def _as_is(batch: dict) -> dict:
    """The DataLoader's per-item hook; its default (``default_convert``) walks every meta dict for nothing."""
    return batch


class EpochLoader(DataLoader):
    """A DataLoader over a :class:`ShardStream` with ``set_epoch`` and ``len`` = steps per epoch."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def make_loader(
    manifest_path: str | Path,
    batch_size: int,
    *,
    rank: int,
    world_size: int,
    epoch: int = 0,
    seed: int = 0,
    num_workers: int = 4,
    shuffle_buffer: int = 1000,
    resample: bool = False,
    augment: bool | dict | AugmentConfig = True,
    steps_per_epoch: int | None = None,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    drop_last: bool = True,
    decoder: str = "imagecodecs",
    pin_memory: bool = False,
) -> tuple[EpochLoader, int]:
    """A loader yielding exactly ``steps_per_epoch`` batches of ``batch_size`` cells on this rank.

    ``steps_per_epoch`` defaults to floor (``drop_last``) or ceil (otherwise) of
    n_samples / (batch_size · world_size); batches are always full, so with ``drop_last=False``
    a few samples are read twice instead of a short last batch. ``shuffle_buffer`` is in samples
    (raw bytes are buffered, about 20 kB each; <= 1 disables it). ``augment``: True (defaults of
    :class:`pretrain.augment.AugmentConfig`), False, or a dict of its fields. ``decoder``:
    "imagecodecs" (fastest measured), "torchvision" or "pil". See the module docstring for how
    shards are split and why every rank yields the same number of batches.
    """
    manifest = load_manifest(manifest_path)
    if batch_size < 1:
        raise InputError(None, "batch_size", "a positive number of cells", batch_size)
    if not 0 <= rank < world_size:
        raise InputError(None, "rank", f"0 <= rank < world_size={world_size}", rank)
    n_shards = len(manifest["shards"])
    if not resample and n_shards < world_size:
        raise InputError(
            manifest_path,
            "shards",
            f"at least world_size={world_size} shards without resampling (or resample=True)",
            n_shards,
        )
    if steps_per_epoch is None:
        steps_per_epoch = steps_per_epoch_for(int(manifest["n_samples"]), batch_size, world_size, drop_last)
    if steps_per_epoch < 1:
        raise InputError(
            manifest_path,
            "n_samples",
            f"at least one global batch of {batch_size} x {world_size} cells",
            manifest["n_samples"],
        )
    dataset = ShardStream(
        manifest,
        batch_size,
        rank=rank,
        world_size=world_size,
        steps_per_epoch=steps_per_epoch,
        epoch=epoch,
        seed=seed,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        resample=resample,
        augment=parse_augment(augment),
        image_mean=image_mean,
        image_std=image_std,
        decoder=decoder,
    )
    plan = dataset.plan()
    if num_workers > 0 and 0 in plan.worker_batches:
        log.warning(
            "rank %d: %d of %d workers have no shards this epoch (fewer shards than workers)",
            rank,
            plan.worker_batches.count(0),
            num_workers,
        )
    loader = EpochLoader(
        dataset,
        batch_size=None,
        collate_fn=_as_is,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    return loader, steps_per_epoch
