"""The pretraining data pipeline: webdataset shards listed in a manifest -> batches of cells.

Per loader worker: sample ranges of shards -> tar samples (raw bytes) -> sample shuffle buffer ->
batch_size decodable samples -> late decode (JPEG, npy, json) into a uint8 batch, with each cell's
flip/rotation and colour-jitter factors drawn (applied to the pixels on the device by
:class:`pretrain.augment.DeviceImages`); neighbours concatenated for torch-geometric. Batch layout:
:mod:`pretrain.collate`.

Which process reads what
------------------------
Ranks are passed explicitly (``rank``, ``world_size``); nothing here needs torch.distributed, so
tests can play any rank. All seeds are ``f(seed, epoch, rank, worker, purpose)`` through numpy's
``SeedSequence``, so the whole stream is a deterministic function of those numbers.

Without resampling (``resample=False``, the default), each epoch:

1. every rank computes the same permutation of the manifest's shards from ``(seed, epoch)``;
2. ``split="samples"`` (the default): the shards, in that order, are laid end to end and cut into
   ``world_size`` contiguous sample ranges of equal length (±1); a rank's range is cut the same way
   among its ``num_workers`` loader workers (in proportion to their batch quotas). A worker reads
   pieces ``(shard, first, stop)`` (at most two of them partial shards), so ranks and workers hold
   the same number of samples whatever the shard sizes. ``split="shards"``: whole shards are dealt,
   in that order, each to the rank (then worker) holding the fewest samples so far; with unequal
   shards ranks then hold unequal counts (:func:`rank_shards` lists a rank's shards);
3. the rank's ``steps_per_epoch`` batches go to its workers in turn: batch i comes from worker
   i mod num_workers, which is the order the DataLoader takes them in (:func:`worker_batch_quota`).

Equal steps on every rank: every worker yields exactly its quota of full batches, and the quotas
of a rank sum to ``steps_per_epoch``, the same number on every rank. When a worker's quota needs
more samples than it holds (``drop_last=False``, or unequal shards with ``split="shards"``) it starts
a new pass over its pieces (re-shuffled), so no rank runs dry and none waits for another at the end
of an epoch; :func:`make_loader` logs a warning with the figures when that happens. When it needs
fewer, the rest is skipped this epoch (different samples every epoch, as the order changes). The
shuffle buffer is emptied at the end of each pass, so the first pass yields every sample of the
worker's pieces before any repeat.

With resampling (``resample=True``), each worker draws shards with replacement, weighted by their
sample counts, from its own seeded stream: an endless stream, cut at the worker's share of
``steps_per_epoch`` batches. Any shard count works (even fewer shards than ranks), but ranks no
longer read disjoint samples.

Unreadable data: a sample that does not decode (bad JPEG, truncated .npy, missing member) is
replaced by the next one and listed in the batch's ``bad`` entry (shard, key, error); a shard that
cannot be read to its end (truncated tar) is listed once with the number of samples lost, and the
worker reads on from the next piece. Batch counts do not change, so ranks stay in step; the trainer
counts, logs and bounds them (``data.max_bad_fraction``).

Resume: ``set_epoch(epoch, skip=k, bad_keys=...)`` makes the next ``iter`` yield only batches k, k+1,
... of the epoch. Each worker passes over the raw samples of its consumed batches without decoding
them (keys in ``bad_keys`` were unreadable when first met and are not counted), drawing their
augmentations so the rest of the stream is exactly that of an uninterrupted run; the DataLoader's
worker 0 plays the worker whose turn batch k is.

Epochs: call ``loader.set_epoch(epoch)`` (or pass ``epoch=``) before iterating; workers are not
persistent, so each ``iter(loader)`` starts them with the current epoch.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from common.errors import InputError
from data_shards.manifest import load_manifest
from data_shards.reader import shard_url, tar_samples

from .augment import AugmentConfig, parse_augment
from .collate import BatchAssembler, bad_record

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


def split_samples(order: Sequence[int], sizes: Sequence[int], parts: int) -> list[list[tuple[int, int, int]]]:
    """Cut the shards in ``order``, laid end to end, into ``parts`` contiguous ranges of equal length
    (±1 sample): per part, a list of pieces ``(shard, first, stop)`` (sample indices within the shard)."""
    total = int(sum(sizes[i] for i in order))
    bounds = [total * p // parts for p in range(parts + 1)]
    pieces: list[list[tuple[int, int, int]]] = [[] for _ in range(parts)]
    start = 0  # global index of the current shard's first sample
    for shard in order:
        size = int(sizes[shard])
        for part in range(parts):
            first, stop = max(bounds[part], start), min(bounds[part + 1], start + size)
            if first < stop:
                pieces[part].append((int(shard), first - start, stop - start))
        start += size
    return pieces


def worker_batch_quota(steps: int, num_workers: int) -> list[int]:
    """Batches each worker yields when batch i comes from worker i mod num_workers (sums to ``steps``).

    That is the order in which the DataLoader takes batches from its workers while none has run
    out, so the epoch's batch order is fixed and a resumed run can start at any batch.
    """
    workers = max(1, num_workers)
    return [steps // workers + (1 if w < steps % workers else 0) for w in range(workers)]


def batches_before(k: int, worker: int, num_workers: int) -> int:
    """How many of an epoch's first ``k`` batches came from ``worker`` (batch i from worker i mod n)."""
    workers = max(1, num_workers)
    return max(0, (k - worker + workers - 1) // workers)


SPLITS = ("samples", "shards")


@dataclass(frozen=True)
class RankPlan:
    """What one rank reads in one epoch. Shard indices refer to ``manifest["shards"]``."""

    rank: int
    epoch: int
    resample: bool
    shards: tuple[int, ...]  # shards this rank reads from (all shards when resampling)
    worker_pieces: tuple[tuple[tuple[int, int, int], ...], ...]  # (num_workers,) lists of (shard, first, stop)
    worker_batches: tuple[int, ...]  # (num_workers,) batches each worker yields; sum = steps

    @property
    def steps(self) -> int:
        return sum(self.worker_batches)

    @property
    def worker_samples(self) -> tuple[int, ...]:
        """Samples each worker holds this epoch (without resampling)."""
        return tuple(sum(stop - first for _, first, stop in pieces) for pieces in self.worker_pieces)

    @property
    def worker_shards(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(dict.fromkeys(s for s, _, _ in pieces)) for pieces in self.worker_pieces)


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
    split: str = "samples",
) -> RankPlan:
    """The epoch plan of one rank (see the module docstring)."""
    workers = max(1, num_workers)
    quota = tuple(worker_batch_quota(steps, workers))
    if resample:
        everything = tuple(range(len(shard_sizes)))
        pieces = tuple((s, 0, int(shard_sizes[s])) for s in everything)
        return RankPlan(rank, epoch, True, everything, (pieces,) * workers, quota)
    if split not in SPLITS:
        raise InputError(None, "data.split", f"one of {SPLITS}", split)
    order = epoch_shard_order(len(shard_sizes), epoch, seed)
    if split == "samples":
        mine = split_samples(order, shard_sizes, world_size)[rank]
        total = sum(stop - first for _, first, stop in mine)
        # The rank's range, cut again among its workers in proportion to their batch quotas.
        shares = np.concatenate([[0], np.cumsum(quota)]) if steps else np.arange(workers + 1)
        bounds = [int(total * int(c) // int(shares[-1])) for c in shares]
        by_worker: list[list[tuple[int, int, int]]] = [[] for _ in range(workers)]
        start = 0
        for shard, first, stop in mine:
            for w in range(workers):
                lo, hi = max(bounds[w], start), min(bounds[w + 1], start + stop - first)
                if lo < hi:
                    by_worker[w].append((shard, first + lo - start, first + hi - start))
            start += stop - first
        shards = tuple(dict.fromkeys(s for s, _, _ in mine))
    else:
        mine_shards = _deal(order, shard_sizes, world_size)[rank]
        by_worker = [
            [(s, 0, int(shard_sizes[s])) for s in shards] for shards in _deal(mine_shards, shard_sizes, workers)
        ]
        shards = tuple(mine_shards)
    return RankPlan(rank, epoch, False, shards, tuple(map(tuple, by_worker)), quota)


def rank_shards(manifest: dict | str | Path, rank: int, world_size: int, epoch: int = 0, seed: int = 0) -> list[str]:
    """Paths (relative to the manifest's folder) of the shards ``rank`` reads in ``epoch`` with
    ``split="shards"`` and without resampling, in reading order. The ranks' lists are disjoint and
    together cover the manifest."""
    if not isinstance(manifest, dict):
        manifest = load_manifest(manifest)
    sizes = [int(s["n_samples"]) for s in manifest["shards"]]
    return [manifest["shards"][i]["path"] for i in split_shards(sizes, world_size, epoch, seed)[rank]]


def repeat_report(plan: RankPlan, batch_size: int) -> dict | None:
    """Figures on the samples a rank reads twice this epoch (a worker's quota beyond what it holds), or None."""
    if plan.resample:
        return None
    held = plan.worker_samples
    needed = [q * batch_size for q in plan.worker_batches]
    repeats = [max(0, n - h) for n, h in zip(needed, held)]
    if not sum(repeats):
        return None
    return {
        "rank": plan.rank,
        "epoch": plan.epoch,
        "repeated_samples": sum(repeats),
        "needed": sum(needed),
        "held": sum(held),
        "worker_held": list(held),
        "worker_needed": needed,
        "max_reads_per_sample": max(-(-n // h) if h else 0 for n, h in zip(needed, held)),
    }


class ShardStream(IterableDataset):
    """Batches for one rank; each loader worker reads its part of the rank's :class:`RankPlan`.

    Yields exactly ``len(self)`` batches per epoch whatever ``num_workers`` is (0 included), or
    ``len(self) - skip`` after ``set_epoch(epoch, skip)``.
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
        decoder: str = "imagecodecs",
        split: str = "samples",
    ):
        super().__init__()
        self.root = Path(manifest["root"])
        # Local paths relative to the manifest, or URLs (http(s)://, s3://, gs://, pipe:) read as streams.
        self.shard_paths = [shard_url(self.root, s["path"]) for s in manifest["shards"]]
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
        self.decoder = decoder
        self.split = split
        self.skip = 0
        self.bad_keys: frozenset = frozenset()

    def set_epoch(self, epoch: int, skip: int = 0, bad_keys: Iterable[str] = ()) -> None:
        """Change every seed and the split for the next ``iter``; with ``skip``, start at that batch of
        the epoch (``bad_keys``: keys found unreadable in the batches skipped; module docstring)."""
        if not 0 <= int(skip) <= self.steps_per_epoch:
            raise InputError(None, "skip", f"0 <= batches to skip <= {self.steps_per_epoch}", skip)
        self.epoch, self.skip, self.bad_keys = int(epoch), int(skip), frozenset(bad_keys)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.skip

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
            split=self.split,
        )

    def _seed(self, purpose: int, worker: int, pass_: int = 0) -> int:
        return stream_seed(self.seed, self.epoch, purpose, self.rank, worker, pass_)

    def _read(self, pieces: Iterable[tuple[int, int, int]], bad: list[dict]) -> Iterator[dict]:
        """Raw samples of the pieces ``(shard, first, stop)``, in order. A shard that cannot be read
        to the end of its piece is recorded in ``bad`` (with the samples lost) and left."""
        for shard, first, stop in pieces:
            url, index = self.shard_paths[shard], 0
            try:
                for sample in tar_samples([{"url": url}]):
                    if index >= stop:
                        break
                    if index >= first:
                        yield sample
                    index += 1
                if index < stop:
                    raise InputError(url, None, f"{stop} samples, as the manifest says", f"{index}")
            except Exception as exc:  # truncated or unreadable shard: count what is lost, read on
                lost = stop - max(index, first)
                log.warning(
                    "rank %d: shard %s unreadable after sample %d (%d samples lost this pass): %s",
                    self.rank,
                    url,
                    index,
                    lost,
                    exc,
                )
                bad.append(bad_record(url, None, exc, lost))

    def _shuffled(self, raws: Iterator[dict], worker: int, pass_: int) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            return raws
        rng = random.Random(self._seed(_SAMPLE_BUFFER, worker, pass_))  # wds.shuffle calls rng.randint
        return iter(wds.DataPipeline(lambda: raws, wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)))

    def _passes(self, pieces: tuple[tuple[int, int, int], ...], worker: int, bad: list[dict]) -> Iterator[dict]:
        """Raw samples of the worker's pieces, pass after pass; pass 0 in the planned order."""
        for pass_ in itertools.count():
            order = list(pieces)
            if pass_ > 0:
                np.random.default_rng(self._seed(_REPEAT_ORDER, worker, pass_)).shuffle(order)
            count = 0
            for sample in self._shuffled(self._read(order, bad), worker, pass_):
                count += 1
                yield sample
            if count == 0:
                raise InputError(self.shard_paths[order[0][0]], None, "readable samples in the worker's shards", "none")

    def _resampled(self, worker: int, bad: list[dict]) -> Iterator[dict]:
        rng = np.random.default_rng(self._seed(_RESAMPLE, worker))
        weights = np.asarray(self.shard_sizes, dtype=np.float64)
        weights /= weights.sum()
        pieces = (
            (s, 0, self.shard_sizes[s]) for s in (int(rng.choice(len(weights), p=weights)) for _ in itertools.count())
        )
        return self._shuffled(self._read(pieces, bad), worker, 0)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        loader_worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        worker = (loader_worker + self.skip) % workers  # the worker whose turn the first batch is
        plan = self.plan(workers)
        done = batches_before(self.skip, worker, workers)
        quota = plan.worker_batches[worker] - done
        log.debug(
            "rank %d epoch %d worker %d/%d: %d batches (after %d skipped) from %s",
            self.rank,
            self.epoch,
            worker,
            workers,
            quota,
            done,
            plan.worker_pieces[worker],
        )
        if quota <= 0:
            return iter(())
        bad: list[dict] = []  # filled by the shard reader and the assembler, emptied into each batch
        raws = self._resampled(worker, bad) if self.resample else self._passes(plan.worker_pieces[worker], worker, bad)
        assemble = BatchAssembler(
            self.augment,
            dihedral_rng=np.random.default_rng(self._seed(_DIHEDRAL, worker)),
            colour_rng=np.random.default_rng(self._seed(_COLOUR, worker)),
            decoder=self.decoder,
        )
        return self._batches(raws, assemble, quota, done, bad)

    def _batches(self, raws: Iterator[dict], assemble: BatchAssembler, quota: int, skip: int, bad: list[dict]):
        if skip:
            assemble.skip(raws, skip, self.batch_size, self.bad_keys)
            bad.clear()  # unreadable data in the skipped batches was counted by the run that read them
        for _ in range(quota):
            batch = assemble.next_batch(raws, self.batch_size, bad)
            if batch is None:
                return
            yield batch


def _as_is(batch: dict) -> dict:
    """The DataLoader's per-item hook; its default (``default_convert``) walks every meta dict for nothing."""
    return batch


def warn_repeats(plan: RankPlan, batch_size: int, split: str) -> dict | None:
    """Log a warning with the figures when this rank must read samples twice this epoch; the figures."""
    report = repeat_report(plan, batch_size)
    if report is not None:
        log.warning(
            "rank %d epoch %d reads %d samples twice or more: its %d batches of %d need %d samples, it holds %d "
            "(per worker: needs %s, holds %s; up to %d reads of one sample)%s",
            plan.rank,
            report["epoch"],
            report["repeated_samples"],
            plan.steps,
            batch_size,
            report["needed"],
            report["held"],
            report["worker_needed"],
            report["worker_held"],
            report["max_reads_per_sample"],
            "; data.split=samples gives every rank and worker the same number" if split == "shards" else "",
        )
    return report


class EpochLoader(DataLoader):
    """A DataLoader over a :class:`ShardStream` with ``set_epoch`` and ``len`` = batches left in the epoch."""

    def set_epoch(self, epoch: int, skip: int = 0, bad_keys: Iterable[str] = ()) -> None:
        previous = self.dataset.epoch
        self.dataset.set_epoch(epoch, skip, bad_keys)
        len(self)  # the DataLoader remembers the last len() it reported, and checks batches against it
        if int(epoch) != previous:
            warn_repeats(self.dataset.plan(), self.dataset.batch_size, self.dataset.split)


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
    drop_last: bool = True,
    decoder: str = "imagecodecs",
    pin_memory: bool = False,
    split: str = "samples",
) -> tuple[EpochLoader, int]:
    """A loader yielding exactly ``steps_per_epoch`` batches of ``batch_size`` cells on this rank.

    ``steps_per_epoch`` defaults to floor (``drop_last``) or ceil (otherwise) of
    n_samples / (batch_size · world_size); batches are always full, so with ``drop_last=False``
    a few samples are read twice instead of a short last batch. ``shuffle_buffer`` is in samples
    (raw bytes are buffered, about 20 kB each; <= 1 disables it). ``augment``: True (defaults of
    :class:`pretrain.augment.AugmentConfig`), False, or a dict of its fields; the drawn transforms
    travel with the batch and :class:`pretrain.augment.DeviceImages` applies them (and the mean/std
    normalisation) on the device. ``decoder``: "imagecodecs" (fastest measured), "torchvision" or
    "pil". ``split``: "samples" (equal sample ranges per rank and worker) or "shards" (whole shards).
    See the module docstring for how shards are split and why every rank yields the same number of
    batches.
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
        decoder=decoder,
        split=split,
    )
    plan = dataset.plan()
    if num_workers > 0 and 0 in plan.worker_samples and not resample:
        log.warning(
            "rank %d: %d of %d workers have no samples this epoch (fewer samples than workers)",
            rank,
            plan.worker_samples.count(0),
            num_workers,
        )
    warn_repeats(plan, batch_size, split)
    loader = EpochLoader(
        dataset,
        batch_size=None,
        collate_fn=_as_is,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    return loader, steps_per_epoch
