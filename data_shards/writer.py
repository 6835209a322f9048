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
    """

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
        return self.spill_dir / f"{bucket:06d}.spill"

    def add(self, index: int, sample: dict) -> None:
        """Add sample number ``index`` (its row in the plan)."""
        bucket = int(self.plan.bucket[index])
        members = TarSampleWriter.render(sample)
        record = _RECORD.pack(int(self.plan.group[index]), int(index), len(members)) + members
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
        for bucket in list(self._buffers):
            self._flush(bucket)
        shards = []
        for bucket in range(self.plan.n_shards):
            items = self._read_bucket(bucket)
            if not items:
                continue
            rng = np.random.default_rng((self.seed, bucket))
            # Shuffle groups, keep each group's samples together in their spatial order.
            groups: dict[int, list[tuple[int, memoryview]]] = {}
            for group, index, members in items:
                groups.setdefault(group, []).append((index, members))
            order = rng.permutation(sorted(groups))
            name = f"{self.prefix}-{bucket:06d}.tar"
            with atomic_path(self.out_dir / name) as tmp:
                with open(tmp, "wb") as stream:
                    sink = TarSampleWriter(stream)
                    for group in order:
                        for _, members in sorted(groups[int(group)], key=lambda pair: pair[0]):
                            sink.write_rendered(members)
                    sink.close()
            shards.append({"path": name, "n_samples": len(items)})
            self._spill_path(bucket).unlink(missing_ok=True)
        self.discard()
        return shards

    def discard(self) -> None:
        """Remove the spill folder (also after a failure)."""
        for path in self.spill_dir.glob("*.spill"):
            path.unlink(missing_ok=True)
        if self.spill_dir.exists():
            os.rmdir(self.spill_dir)
