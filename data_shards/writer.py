"""webdataset shard writing with a slide-wide shuffle, within a memory budget.

Crops are produced in spatial order (so each slide tile is decoded once), but training wants
samples shuffled across the slide. Each sample is assigned up front to one of the slide's shards
(its "bucket") by a seeded permutation. Encoded samples are held in memory while the slide's
samples fit the writer's memory budget (written once); a larger slide's samples are spilled to one
temporary file per bucket as they arrive (written, read back, written again), so a slide never has
to fit in memory. Each bucket is then shuffled (one shard's worth) and written as a ``.tar`` under
a temporary name, renamed when complete. Both routes give byte-identical shards.

The unit of shuffling is a *group*: a single cell by default, or all cells of a spatial block of
``group_um`` µm, which stay together so that a small shuffle buffer in the loader puts
neighbouring cells into one batch as hard negatives (PAST paper).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from common.atomic import atomic_path

_TAR_BLOCK = 512


class TarSampleWriter:
    """Writes webdataset samples as plain POSIX ustar members.

    The standard library's ``tarfile`` (which ``webdataset.TarWriter`` uses) spends about 0.15 ms
    per member building headers, more than the JPEG encoding of the crop it stores; here each
    member costs one 512-byte header. Readers (``tar``, ``tarfile``, webdataset) see an ordinary
    archive: regular files ``<key>.<ext>``, mode 0444, mtime 0, two zero blocks at the end.
    """

    def __init__(self, stream: BinaryIO):
        self.stream = stream

    # The fixed fields of every member header: mode 0444, uid/gid 0, mtime 0, regular file, ustar.
    _MODE_UID_GID = b"0000444\0" + b"0000000\0" + b"0000000\0"  # bytes 100..124
    _MTIME = b"00000000000\0"  # bytes 136..148
    _AFTER_CHECKSUM = (b"0" + b"\0" * 100 + b"ustar\x0000").ljust(_TAR_BLOCK - 156, b"\0")  # bytes 156..512
    _FIXED_SUM = sum(_MODE_UID_GID) + sum(_MTIME) + sum(_AFTER_CHECKSUM) + 8 * ord(" ")

    @classmethod
    def header(cls, name: str, size: int) -> bytes:
        """The 512-byte ustar header of a regular file ``name`` of ``size`` bytes."""
        encoded = name.encode("utf-8")
        if len(encoded) > 100:
            raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
        size_field = b"%011o\0" % size
        # The checksum is the byte sum of the header with its own field read as spaces.
        checksum = cls._FIXED_SUM + sum(encoded) + sum(size_field)
        return b"".join(
            (
                encoded.ljust(100, b"\0"),
                cls._MODE_UID_GID,
                size_field,
                cls._MTIME,
                b"%06o\0 " % checksum,
                cls._AFTER_CHECKSUM,
            )
        )

    @classmethod
    def render(cls, sample: dict) -> bytes:
        """The tar members of one sample (headers, data, padding), ready to append."""
        key = sample["__key__"]
        parts = []
        for extension, data in sample.items():
            if extension.startswith("__"):
                continue
            parts.append(cls.header(f"{key}.{extension}", len(data)))
            parts.append(data)
            pad = -len(data) % _TAR_BLOCK
            if pad:
                parts.append(b"\0" * pad)
        return b"".join(parts)

    def write(self, sample: dict) -> None:
        self.stream.write(self.render(sample))

    def write_rendered(self, members: bytes) -> None:
        self.stream.write(members)

    def close(self) -> None:
        self.stream.write(b"\0" * (2 * _TAR_BLOCK))


@dataclass
class ShardPlan:
    """Which shard (bucket) and shuffle group each sample goes to."""

    bucket: np.ndarray  # (n,) int64 in [0, n_shards)
    group: np.ndarray  # (n,) int64 group label; samples of a group stay adjacent
    n_shards: int


def plan_shards(xy_um: np.ndarray, samples_per_shard: int, seed: int, group_um: float | None = None) -> ShardPlan:
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


_RECORD = struct.Struct("<qqQ")  # spill record header: group, sample index, byte length


class ShuffledShardWriter:
    """Collect encoded samples in any order; write shuffled, complete ``.tar`` shards at the end.

    Samples are rendered to their tar members on arrival, so the final pass only reorders bytes.
    While the rendered samples fit ``memory_budget_bytes`` they stay in memory and are written
    once; past the budget (or with a budget of 0) they are spilled to one temporary file per shard
    and read back at the end, so a slide of any size fits. Both routes write the same bytes: a
    shard's order depends only on the plan, the seed and which samples arrived, never on the route.
    """

    def __init__(
        self,
        out_dir: str | Path,
        prefix: str,
        plan: ShardPlan,
        seed: int,
        spill_bytes: int = 1 << 18,
        memory_budget_bytes: int = 0,
    ):
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.plan = plan
        self.seed = seed
        self.spill_dir = self.out_dir / f".{prefix}.spill"
        # (group, sample index, rendered tar members) per bucket, not yet spilled.
        self._held: dict[int, list[tuple[int, int, bytes]]] = {}
        self._buffered: dict[int, int] = {}
        self._spill_bytes = spill_bytes
        self._memory_budget_bytes = memory_budget_bytes
        self._held_bytes = 0
        self.in_memory = memory_budget_bytes > 0  # False once the budget is exceeded: spill route
        self.n_added = 0

    def _spill_path(self, bucket: int) -> Path:
        return self.spill_dir / f"{bucket:06d}.spill"

    def add(self, index: int, sample: dict) -> None:
        """Add sample number ``index`` (its row in the plan)."""
        bucket = int(self.plan.bucket[index])
        members = TarSampleWriter.render(sample)
        self._held.setdefault(bucket, []).append((int(self.plan.group[index]), int(index), members))
        self.n_added += 1
        if self.in_memory:
            self._held_bytes += len(members)
            if self._held_bytes > self._memory_budget_bytes:
                self.in_memory = False  # the slide does not fit: spill everything held so far
                for held in list(self._held):
                    self._flush(held)
            return
        self._buffered[bucket] = self._buffered.get(bucket, 0) + _RECORD.size + len(members)
        if self._buffered[bucket] >= self._spill_bytes:
            self._flush(bucket)

    def _flush(self, bucket: int) -> None:
        items = self._held.pop(bucket, [])
        self._buffered.pop(bucket, None)
        if items:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            with open(self._spill_path(bucket), "ab") as handle:
                handle.writelines(
                    part
                    for group, index, members in items
                    for part in (_RECORD.pack(group, index, len(members)), members)
                )

    def _read_bucket(self, bucket: int) -> list[tuple[int, int, memoryview]]:
        """(group, index, rendered tar members) of every sample spilled to ``bucket``."""
        path = self._spill_path(bucket)
        if not path.exists():
            return []
        data = memoryview(path.read_bytes())
        items, offset = [], 0
        while offset < len(data):
            group, index, size = _RECORD.unpack_from(data, offset)
            offset += _RECORD.size
            items.append((group, index, data[offset : offset + size]))
            offset += size
        return items

    def finish(self) -> list[dict]:
        """Write every non-empty shard; return [{"path": name, "n_samples": int}] in shard order."""
        if not self.in_memory:
            for bucket in list(self._held):
                self._flush(bucket)
        shards = []
        for bucket in range(self.plan.n_shards):
            items = self._held.pop(bucket, []) if self.in_memory else self._read_bucket(bucket)
            if not items:
                continue
            rng = np.random.default_rng((self.seed, bucket))
            # Shuffle groups, keep each group's samples together in their spatial order.
            groups: dict[int, list[tuple[int, bytes | memoryview]]] = {}
            for group, index, members in items:
                groups.setdefault(group, []).append((index, members))
            order = rng.permutation(sorted(groups))
            name = f"{self.prefix}-{bucket:06d}.tar"
            with atomic_path(self.out_dir / name) as tmp:
                with open(tmp, "wb") as stream:
                    sink = TarSampleWriter(stream)
                    for group in order:
                        members_of_group = groups[int(group)]
                        if len(members_of_group) > 1:
                            members_of_group.sort(key=lambda pair: pair[0])
                        stream.writelines(members for _, members in members_of_group)
                    sink.close()
            shards.append({"path": name, "n_samples": len(items)})
            del items, groups
            self._spill_path(bucket).unlink(missing_ok=True)
        self.discard()
        return shards

    def discard(self) -> None:
        """Remove the spill folder and drop the samples held in memory (also after a failure)."""
        self._held.clear()
        self._held_bytes = 0
        if not self.spill_dir.exists():
            return
        for path in self.spill_dir.glob("*.spill"):
            path.unlink(missing_ok=True)
        os.rmdir(self.spill_dir)
