"""Shard writer: balanced shard plans, group adjacency, byte-exact tar members and .npy files."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import webdataset as wds

from data_shards.sample import encode_sample, npy_bytes
from data_shards.writer import ShuffledShardWriter, plan_shards


@pytest.mark.parametrize(
    "shape,dtype", [((300,), np.int32), ((0, 300), np.int32), ((5, 2), np.float32), ((3, 4, 2), np.int64)]
)
def test_npy_bytes_equal_numpy_save(shape, dtype):
    array = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    assert npy_bytes(array) == buffer.getvalue()


def test_plan_is_balanced_and_deterministic():
    xy = np.random.default_rng(0).uniform(0, 2000, (10_007, 2))
    plan = plan_shards(xy, samples_per_shard=1000, seed=5)
    sizes = np.bincount(plan.bucket, minlength=plan.n_shards)
    assert plan.n_shards == 11 and sizes.sum() == len(xy)
    assert sizes.max() - sizes.min() <= 1
    again = plan_shards(xy, samples_per_shard=1000, seed=5)
    np.testing.assert_array_equal(plan.bucket, again.bucket)
    assert not np.array_equal(plan.bucket, plan_shards(xy, 1000, seed=6).bucket)


def test_groups_never_split_across_shards():
    xy = np.random.default_rng(1).uniform(0, 1000, (3000, 2))
    plan = plan_shards(xy, samples_per_shard=500, seed=0, group_um=100.0)
    for group in np.unique(plan.group):
        assert len(np.unique(plan.bucket[plan.group == group])) == 1
    block = np.floor(xy / 100.0).astype(int)
    same_block = (block[:, None, :] == block[None, :, :]).all(-1)
    assert np.array_equal(same_block, plan.group[:, None] == plan.group[None, :])


def test_shards_hold_exact_bytes_and_shuffle_across_the_slide(tmp_path):
    n = 900
    xy = np.stack([np.arange(n) % 30, np.arange(n) // 30], axis=1).astype(float) * 10.0
    plan = plan_shards(xy, samples_per_shard=300, seed=2)
    writer = ShuffledShardWriter(tmp_path, "s", plan, seed=2, spill_bytes=4096)
    expected = {}
    for i in range(n):  # arrive in spatial order, as crops do
        jpg = np.random.default_rng(i).bytes(100 + i)
        tokens = np.full(7, i, dtype=np.int32)
        sample = encode_sample(f"s_{i:05d}", jpg, tokens, np.zeros((i % 3, 7)), np.ones((i % 3, 2)), {"i": i})
        expected[sample["__key__"]] = sample
        writer.add(i, sample)
    shards = writer.finish()
    assert sum(s["n_samples"] for s in shards) == n and not (tmp_path / ".s.spill").exists()
    seen = []
    for shard in shards:
        with tarfile.open(tmp_path / shard["path"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                assert tar.extractfile(member).read() == expected[key][ext]
        keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / shard["path"]), shardshuffle=False)]
        seen += keys
        indices = np.array([int(k.split("_")[1]) for k in keys])
        # shuffled: not in arrival order, and spread over the whole slide
        assert not np.all(np.diff(indices) > 0)
        assert indices.min() < n * 0.1 and indices.max() > n * 0.9
    assert sorted(seen) == sorted(expected)


def test_keys_with_dots_are_refused():
    with pytest.raises(ValueError, match="must not contain"):
        encode_sample("a.b", b"", np.zeros(1), np.zeros((0, 1)), np.zeros((0, 2)), {})


@pytest.mark.parametrize(
    "name,size", [("s_00000001.jpg", 0), ("slide-A_00123456.nbr_offsets.npy", 12345), ("x.json", 8**11 - 1)]
)
def test_member_header_is_byte_identical_to_tarfile_ustar(name, size):
    from data_shards.writer import TarSampleWriter

    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uname, info.gname = size, 0o444, 0, "", ""
    assert TarSampleWriter.header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT)


def _write_all(out_dir, plan, n, **writer_options) -> tuple[ShuffledShardWriter, dict[str, bytes]]:
    writer = ShuffledShardWriter(out_dir, "s", plan, seed=4, spill_bytes=4096, **writer_options)
    for i in range(n):  # spatial arrival order, as crops come
        jpg = np.random.default_rng(i).bytes(200 + 3 * i)
        sample = encode_sample(
            f"s_{i:05d}", jpg, np.full(5, i, np.int32), np.zeros((i % 4, 5)), np.ones((i % 4, 2)), {}
        )
        writer.add(i, sample)
    shards = writer.finish()
    assert not (out_dir / ".s.spill").exists()
    return writer, {s["path"]: (out_dir / s["path"]).read_bytes() for s in shards}


@pytest.mark.parametrize("group_um", [None, 40.0])
def test_in_memory_and_spill_routes_write_identical_shards(tmp_path, group_um):
    n = 600
    xy = np.random.default_rng(3).uniform(0, 400, (n, 2))
    plan = plan_shards(xy, samples_per_shard=150, seed=4, group_um=group_um)
    spilled, spill_tars = _write_all(tmp_path / "spill", plan, n)  # budget 0: the spill route
    held, memory_tars = _write_all(tmp_path / "memory", plan, n, memory_budget_bytes=1 << 30)
    # a budget that runs out mid-slide: what is held so far is spilled, the rest follows it
    switched, switched_tars = _write_all(tmp_path / "switched", plan, n, memory_budget_bytes=100_000)
    assert not spilled.in_memory and held.in_memory and not switched.in_memory
    assert len(spill_tars) == plan.n_shards
    assert list(memory_tars) == list(switched_tars) == list(spill_tars)
    for name, data in spill_tars.items():
        assert memory_tars[name] == data and switched_tars[name] == data, name
