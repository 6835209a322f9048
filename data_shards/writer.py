"""webdataset shard writing with a slide-wide shuffle that never holds a slide in memory.

Crops are produced in spatial order (so each slide tile is decoded once), but training wants
samples shuffled across the slide. Each sample is assigned up front to one of the slide's shards
(its "bucket") by a seeded permutation; encoded samples are spilled to one temporary file per
bucket as they arrive, and each bucket is then shuffled in memory (one shard's worth) and written
as a ``.tar`` under a temporary name, renamed when complete.

The unit of shuffling is a *group*: a single cell by default, or all cells of a spatial block of
``group_um`` µm, which stay together so that a small shuffle buffer in the loader puts
neighbouring cells into one batch as hard negatives (PAST paper).
"""
from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from .atomic import atomic_path

SAMPLE_KEYS = ("jpg", "tokens.npy", "nbr_tokens.npy", "nbr_offsets.npy", "json")


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_sample(
    key: str,
    jpg: bytes,
    tokens: np.ndarray,
    nbr_tokens: np.ndarray,
    nbr_offsets_um: np.ndarray,
    meta: dict,
) -> dict:
    """One shard sample as bytes per extension (the layout in DESIGN.md).

    tokens (L,) int32; nbr_tokens (m, L) int32 and nbr_offsets_um (m, 2) float32 with m ≤ k real
    neighbours, offsets = neighbour minus centre in µm.
    """
    if "." in key:
        raise ValueError(f"sample key {key!r} must not contain '.' (webdataset splits keys at dots)")
    return {
        "__key__": key,
        "jpg": jpg,
        "tokens.npy": _npy_bytes(np.ascontiguousarray(tokens, dtype=np.int32)),
        "nbr_tokens.npy": _npy_bytes(np.ascontiguousarray(nbr_tokens, dtype=np.int32)),
        "nbr_offsets.npy": _npy_bytes(np.ascontiguousarray(nbr_offsets_um, dtype=np.float32)),
        "json": json.dumps(meta, separators=(",", ":"), allow_nan=False).encode("utf-8"),
    }


@dataclass
class ShardPlan:
    """Which shard (bucket) and shuffle group each sample goes to."""

    bucket: np.ndarray  # (n,) int64 in [0, n_shards)
    group: np.ndarray  # (n,) int64 group label; samples of a group stay adjacent
    n_shards: int


def plan_shards(
    xy_um: np.ndarray, samples_per_shard: int, seed: int, group_um: float | None = None
) -> ShardPlan:
    """Balanced random assignment of groups to shards.

    xy_um: (n, 2) cell centroids in µm. With ``group_um`` the slide is cut into squares of that
    side and each square is one group; otherwise each cell is its own group.
    """
    n = len(xy_um)
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    if group_um:
        cells = np.floor(np.asarray(xy_um, dtype=np.float64) / float(group_um)).astype(np.int64)
        _, group = np.unique(cells, axis=0, return_inverse=True)
        group = group.reshape(-1).astype(np.int64)
    else:
        group = np.arange(n, dtype=np.int64)
    n_shards = max(1, int(np.ceil(n / samples_per_shard)))
    rng = np.random.default_rng(seed)
    n_groups = int(group.max()) + 1 if n else 0
    group_order = rng.permutation(n_groups)
    group_size = np.bincount(group, minlength=n_groups)
    # Fill shards group by group in random order: sizes stay within one group of balanced.
    start_of_group = np.empty(n_groups, dtype=np.int64)
    start_of_group[group_order] = np.cumsum(group_size[group_order]) - group_size[group_order]
    per_shard = n / n_shards if n else 1.0
    bucket_of_group = np.minimum((start_of_group / per_shard).astype(np.int64), n_shards - 1)
    return ShardPlan(bucket=bucket_of_group[group], group=group, n_shards=n_shards)


class ShuffledShardWriter:
    """Collect encoded samples in any order; write shuffled, complete ``.tar`` shards at the end."""

    def __init__(self, out_dir: str | Path, prefix: str, plan: ShardPlan, seed: int, spill_bytes: int = 1 << 18):
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.plan = plan
        self.seed = seed
        self.spill_dir = self.out_dir / f".{prefix}.spill"
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._buffers: dict[int, list[bytes]] = {}
        self._buffered: dict[int, int] = {}
        self._spill_bytes = spill_bytes
        self.n_added = 0

    def _spill_path(self, bucket: int) -> Path:
        return self.spill_dir / f"{bucket:06d}.pkl"

    def add(self, index: int, sample: dict) -> None:
        """Add sample number ``index`` (its row in the plan)."""
        bucket = int(self.plan.bucket[index])
        record = pickle.dumps((int(self.plan.group[index]), int(index), sample), protocol=pickle.HIGHEST_PROTOCOL)
        self._buffers.setdefault(bucket, []).append(record)
        self._buffered[bucket] = self._buffered.get(bucket, 0) + len(record)
        self.n_added += 1
        if self._buffered[bucket] >= self._spill_bytes:
            self._flush(bucket)

    def _flush(self, bucket: int) -> None:
        records = self._buffers.pop(bucket, [])
        self._buffered.pop(bucket, None)
        if records:
            with open(self._spill_path(bucket), "ab") as handle:
                handle.write(b"".join(records))

    def _read_bucket(self, bucket: int) -> list[tuple[int, int, dict]]:
        path = self._spill_path(bucket)
        items = []
        if path.exists():
            with open(path, "rb") as handle:
                while True:
                    try:
                        items.append(pickle.load(handle))
                    except EOFError:
                        break
        return items

    def finish(self) -> list[dict]:
        """Write every non-empty shard; return [{"path": name, "n_samples": int}] in shard order."""
        for bucket in list(self._buffers):
            self._flush(bucket)
        shards = []
        for bucket in range(self.plan.n_shards):
            items = self._read_bucket(bucket)
            if not items:
                continue
            rng = np.random.default_rng((self.seed, bucket))
            # Shuffle groups, keep each group's samples together in their spatial order.
            groups: dict[int, list[tuple[int, dict]]] = {}
            for group, index, sample in items:
                groups.setdefault(group, []).append((index, sample))
            order = rng.permutation(sorted(groups))
            name = f"{self.prefix}-{bucket:06d}.tar"
            with atomic_path(self.out_dir / name) as tmp:
                with open(tmp, "wb") as stream:
                    sink = wds.TarWriter(stream, encoder=False)
                    for group in order:
                        for _, sample in sorted(groups[int(group)], key=lambda pair: pair[0]):
                            sink.write(sample)
                    sink.close()
            shards.append({"path": name, "n_samples": len(items)})
            self._spill_path(bucket).unlink(missing_ok=True)
        self.discard()
        return shards

    def discard(self) -> None:
        """Remove the spill folder (also after a failure)."""
        for path in self.spill_dir.glob("*.pkl"):
            path.unlink(missing_ok=True)
        if self.spill_dir.exists():
            os.rmdir(self.spill_dir)
