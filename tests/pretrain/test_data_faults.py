"""The loader under faults and restarts: resume mid-epoch without decoding, unreadable samples and
shards skipped and counted (batch counts unchanged), very unequal shards, and what reaches the model.
"""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import pytest
import torch

from data_shards.manifest import load_manifest
from pretrain import collate
from pretrain.bad_data import BadData
from pretrain.data import make_loader
from pretrain.trainer import _to_device
from tests.pretrain.test_data import model_images, write_dataset


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """5 shards of unequal sizes (88 samples)."""
    root = tmp_path_factory.mktemp("faults")
    return root, write_dataset(root, {"slideA": [13, 29, 7], "slideB": [22, 17]}, seed=1)


def _stream(batches: list[dict]) -> list[tuple]:
    """Everything a batch carries that training depends on."""
    return [(b["key"], b["image"], b["dihedral"], b.get("colour"), b["nbr_offsets_um"]) for b in batches]


def _same(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(
        x[0] == y[0] and all(torch.equal(p, q) if p is not None else q is None for p, q in zip(x[1:], y[1:]))
        for x, y in zip(a, b)
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_yields_the_rest_of_the_stream_without_decoding_the_skipped_samples(
    shards, num_workers, monkeypatch
):
    root, _ = shards
    loader, steps = make_loader(
        root, 4, rank=1, world_size=2, epoch=1, seed=4, num_workers=num_workers, shuffle_buffer=8
    )
    full = _stream(list(loader))
    assert steps == 11 and len(full) == 11
    decoded = []
    real_decode = collate.decode_cell_arrays
    monkeypatch.setattr(collate, "decode_cell_arrays", lambda raw: decoded.append(raw["__key__"]) or real_decode(raw))
    for skip in (1, 4, 7, 11):
        decoded.clear()
        loader.set_epoch(1, skip=skip)
        rest = _stream(list(loader))
        assert len(loader) == steps - skip
        assert _same(rest, full[skip:]), f"skip={skip}: not the uninterrupted stream"
        if num_workers == 0:  # (workers are other processes: their decodes are not seen here)
            assert sorted(decoded) == sorted(k for b in rest for k in b[0])  # only what is yielded is decoded

    # Control: a skip that does not replay the skipped samples' augmentation draws changes the stream.
    def skip_without_draws(self, raws, n_batches, batch_size, bad_keys=frozenset()):
        for _ in range(n_batches * batch_size):
            next(raws)

    monkeypatch.setattr(collate.BatchAssembler, "skip", skip_without_draws)
    loader.set_epoch(1, skip=4)
    assert not _same(_stream(list(loader)), full[4:])


def _rewrite(path: Path, change) -> None:
    """Rewrite the tar at ``path`` with ``change(name, data) -> data`` applied to each member."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            data = change(member.name, data)
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _damage(root: Path, truth: dict) -> dict:
    """A bad JPEG and a truncated .npy in one shard, another shard cut mid-way; what was done."""
    manifest = load_manifest(root)
    sizes = {s["path"]: s["n_samples"] for s in manifest["shards"]}
    first, second = "slideA/shard-000001.tar", "slideB/shard-000000.tar"  # 29 and 22 samples
    keys = sorted(k for k, t in truth.items() if t["shard"] == first)
    bad_jpeg, bad_npy = keys[3], keys[10]

    def change(name: str, data: bytes) -> bytes:
        if name == f"{bad_jpeg}.jpg":
            return data[:200] + b"\x00" * 50
        if name == f"{bad_npy}.nbr_tokens.npy":
            return data[: len(data) // 2]
        return data

    _rewrite(root / first, change)
    raw = (root / second).read_bytes()
    (root / second).write_bytes(raw[: len(raw) // 2])  # a truncated tar: about half its samples lost
    return {"keys": {bad_jpeg, bad_npy}, "truncated": str(root / second), "n_truncated": sizes[second]}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_samples_and_shards_are_replaced_named_and_counted(tmp_path, num_workers, caplog):
    truth = write_dataset(tmp_path, {"slideA": [13, 29, 7], "slideB": [22, 17]}, seed=1)
    damage = _damage(tmp_path, truth)
    counts = BadData(max_fraction=0.5, allowed=0, rank=0, device=torch.device("cpu"))
    steps_seen = 0
    for rank in (0, 1):
        loader, steps = make_loader(tmp_path, 4, rank=rank, world_size=2, num_workers=num_workers, shuffle_buffer=8)
        batches = list(counts.watch(iter(loader), epoch=0))
        assert len(batches) == steps == 11 and all(len(b["key"]) == 4 for b in batches)  # batch counts unchanged
        assert not damage["keys"] & {k for b in batches for k in b["key"]}
        steps_seen += len(batches)
    named = {(e["shard"], e["key"]) for e in counts.examples}
    assert {k for _, k in named if k} == damage["keys"]  # each bad sample named once, with its shard
    assert all(s.endswith("slideA/shard-000001.tar") for s, k in named if k)
    shard_entries = [e for e in counts.examples if e["key"] is None]
    assert {e["shard"] for e in shard_entries} == {damage["truncated"]}
    assert all(0 < e["samples"] < damage["n_truncated"] for e in shard_entries)  # about half the shard lost
    totals = counts.check()
    assert len(counts.examples) < 20 and totals["bad_samples"] == sum(e["samples"] for e in counts.examples)
    assert "shard-000001.tar" in caplog.text and "unreadable" in caplog.text
    # Past the bound: one clear error naming the bound and a bad sample.
    strict = BadData(max_fraction=0.001, allowed=1, rank=0, device=torch.device("cpu"))
    strict.local_bad, strict.local_read, strict.examples = counts.local_bad, counts.local_read, counts.examples
    with pytest.raises(Exception, match=r"data.max_bad_fraction.*unreadable"):
        strict.check()
    lenient = BadData(max_fraction=0.001, allowed=totals["bad_samples"], rank=0, device=torch.device("cpu"))
    lenient.local_bad, lenient.local_read = counts.local_bad, counts.local_read
    lenient.check()  # within the samples always allowed


def test_resume_passes_over_unreadable_keys_it_met_before(tmp_path):
    truth = write_dataset(tmp_path, {"slideA": [13, 29, 7], "slideB": [22, 17]}, seed=1)
    _damage(tmp_path, truth)
    loader, steps = make_loader(tmp_path, 4, rank=0, world_size=1, num_workers=0, shuffle_buffer=8)
    counts = BadData(0.5, 0, 0, torch.device("cpu"))
    full = _stream(list(counts.watch(iter(loader), 0)))
    assert counts.epoch_keys  # at least one bad sample in the epoch
    loader.set_epoch(0, skip=steps - 2, bad_keys=counts.epoch_keys)
    assert _same(_stream(list(loader)), full[-2:])
    loader.set_epoch(0, skip=steps - 2)  # control: without the keys the stream is shifted
    assert not _same(_stream(list(loader)), full[-2:])


def test_very_unequal_shards_are_balanced_by_sample_ranges_or_warned_about(tmp_path, caplog):
    truth = write_dataset(tmp_path, {"big": [1300], "small": [20]}, seed=3)
    caplog.set_level(logging.WARNING, logger="pretrain.data")
    for split in ("samples", "shards"):
        caplog.clear()
        reads = []
        for rank in (0, 1):
            loader, steps = make_loader(
                tmp_path, 32, rank=rank, world_size=2, num_workers=0, shuffle_buffer=1, augment=False, split=split
            )
            keys = [k for b in loader for k in b["key"]]
            assert steps == 1320 // 64 and len(keys) == steps * 32
            reads.append(keys)
        if split == "samples":
            assert all(len(set(k)) == len(k) for k in reads) and not set(reads[0]) & set(reads[1])
            assert "twice" not in caplog.text
        else:
            small = min(reads, key=lambda k: len(set(k)))
            assert len(set(small)) == 20 and max(small.count(k) for k in small) >= 30  # 640 reads of 20 samples
            assert "reads 620 samples twice or more" in caplog.text and "holds 20" in caplog.text
    assert len(truth) == 1320


def test_only_the_image_is_cast_offsets_stay_float32_and_pixels_travel_as_uint8(shards):
    root, _ = shards
    loader, _ = make_loader(root, 4, rank=0, world_size=1, num_workers=0, shuffle_buffer=8)
    batch = next(iter(loader))
    assert batch["image"].dtype == torch.uint8 and batch["nbr_offsets_um"].dtype == torch.float32
    moved = _to_device(batch, torch.device("cpu"), torch.bfloat16)
    assert moved["image"].dtype == torch.bfloat16 and moved["image"].shape == (4, 3, 224, 224)
    assert moved["nbr_offsets_um"].dtype == torch.float32
    torch.testing.assert_close(moved["nbr_offsets_um"], batch["nbr_offsets_um"], rtol=0, atol=0)  # bit-exact µm
    assert moved["tokens"].dtype == torch.int64 and "dihedral" not in moved and "colour" not in moved
    torch.testing.assert_close(moved["image"].float(), model_images(batch), atol=0.05, rtol=0.01)
