"""The pretraining data pipeline on small synthetic shards written with data_shards.writer.

Covers: batch layout and contents, rank/worker splits (disjoint, covering, balanced by sample
ranges), equal steps on every rank with unequal shards, determinism in (seed, epoch, rank), resuming
mid-epoch without decoding the skipped samples, unreadable samples and shards skipped and counted,
the image/offset consistency of flips and 90° rotations (images transformed on the "device"),
resampling, and bad input.
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from common.atomic import write_json
from common.errors import InputError
from data_shards.manifest import SLIDE_MANIFEST_NAME, load_manifest, merge_manifests
from data_shards.reader import tar_samples
from data_shards.sample import decode_sample, encode_sample, load_npy
from data_shards.writer import ShardPlan, ShuffledShardWriter, plan_shards
from pretrain.augment import (
    AugmentConfig,
    DeviceImages,
    dihedral_image,
    dihedral_matrix,
    dihedral_offsets,
    draw_colour,
)
from pretrain.data import make_loader, plan_rank, rank_shards, steps_per_epoch_for, worker_batch_quota
from pretrain.models import IMAGENET_MEAN, IMAGENET_STD
from tests.support import serve_flaky

CROP_PX = 224
CONTEXT = 300
UM_PER_PX = 0.5
VOCABULARY = {"path": "vocab.tsv", "sha256": "0" * 64, "size": 10}  # as make_shards records it
MARKER_OFFSET_PX = (40, -20)  # asymmetric, so all 8 dihedral transforms give different vectors


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _texture(rng: np.random.Generator) -> np.ndarray:
    """A smooth random RGB crop (compresses like tissue, cheap to make)."""
    coarse = rng.integers(40, 230, size=(8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((CROP_PX, CROP_PX), Image.BILINEAR))


def _marker_crop(offset_px: tuple[int, int]) -> np.ndarray:
    """Black crop with an 8 × 8 white square centred at the crop centre (111.5, 111.5) + offset (x, y)."""
    image = np.zeros((CROP_PX, CROP_PX, 3), dtype=np.uint8)
    x0 = CROP_PX // 2 + offset_px[0] - 4
    y0 = CROP_PX // 2 + offset_px[1] - 4
    image[y0 : y0 + 8, x0 : x0 + 8] = 255
    return image


def write_dataset(root: Path, slides: dict[str, list[int]], seed: int = 0, marker: bool = False) -> dict:
    """Write shards of the given sizes per slide + manifest; return {key: what was written}."""
    rng = np.random.default_rng(seed)
    truth = {}
    for slide, sizes in slides.items():
        n = sum(sizes)
        if len(set(sizes)) == 1:
            plan = plan_shards(rng.uniform(0, 1000, size=(n, 2)), samples_per_shard=sizes[0], seed=seed)
        else:  # unequal sizes on purpose: assign samples to shards explicitly
            plan = ShardPlan(bucket=np.repeat(np.arange(len(sizes)), sizes), group=np.arange(n), n_shards=len(sizes))
        writer = ShuffledShardWriter(root / slide, "shard", plan, seed=seed)
        for i in range(n):
            key = f"{slide}_{i:05d}"
            m = i % 5  # 0..4 neighbours, 0 included
            tokens = rng.integers(30, 40, size=CONTEXT).astype(np.int32)
            nbr_tokens = rng.integers(30, 40, size=(m, CONTEXT)).astype(np.int32)
            if marker:
                offsets = np.array([MARKER_OFFSET_PX] * m, dtype=np.float32).reshape(m, 2) * UM_PER_PX
                image = _marker_crop(MARKER_OFFSET_PX)
            else:
                offsets = rng.normal(0, 20, size=(m, 2)).astype(np.float32)
                image = _texture(rng)
            meta = {"cell_id": str(i), "slide": slide, "x_um": float(i), "y_um": 0.0}
            writer.add(i, encode_sample(key, _jpeg(image), tokens, nbr_tokens, offsets, meta))
            truth[key] = {
                "tokens": tokens,
                "nbr_tokens": nbr_tokens,
                "offsets": offsets,
                "image": image,
                "shard": f"{slide}/shard-{int(plan.bucket[i]):06d}.tar",
            }
        shards = writer.finish()
        write_json(
            root / slide / SLIDE_MANIFEST_NAME,
            {"slide": slide, "vocabulary_sha256": VOCABULARY["sha256"], "shards": shards},
        )
    merge_manifests(root, VOCABULARY, config={"test": True})
    return truth


@pytest.fixture(scope="module")
def equal(tmp_path_factory):
    """4 shards of 24 samples over 2 slides (96 samples)."""
    root = tmp_path_factory.mktemp("equal")
    return root, write_dataset(root, {"slideA": [24, 24], "slideB": [24, 24]})


@pytest.fixture(scope="module")
def unequal(tmp_path_factory):
    """5 shards of unequal sizes (88 samples): no world size here divides the shard count evenly."""
    root = tmp_path_factory.mktemp("unequal")
    return root, write_dataset(root, {"slideA": [13, 29, 7], "slideB": [22, 17]}, seed=1)


def epoch_keys(loader) -> list[list[str]]:
    return [batch["key"] for batch in loader]


def model_images(batch: dict, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """What the trainer hands the model: (B, 3, H, W) float32, transformed and normalised."""
    return DeviceImages(mean, std)(batch["image"], batch["dihedral"], batch.get("colour"))


def test_batch_layout_and_contents(unequal):
    root, truth = unequal
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    loader, steps = make_loader(
        root,
        8,
        rank=0,
        world_size=1,
        num_workers=0,
        shuffle_buffer=16,
        resample=False,
        augment=False,
    )
    assert steps == 88 // 8 == len(loader)
    batches = list(loader)
    assert len(batches) == steps
    for batch in batches:
        assert batch["image"].shape == (8, CROP_PX, CROP_PX, 3) and batch["image"].dtype == torch.uint8
        assert batch["dihedral"].tolist() == [[0, 0]] * 8 and "colour" not in batch and batch["bad"] == []
        assert batch["tokens"].shape == (8, CONTEXT) and batch["tokens"].dtype == torch.int64
        counts = [len(truth[k]["nbr_tokens"]) for k in batch["key"]]
        n_nbr = sum(counts)
        assert batch["nbr_tokens"].shape == (n_nbr, CONTEXT) and batch["nbr_tokens"].dtype == torch.int64
        assert batch["nbr_offsets_um"].shape == (n_nbr, 2) and batch["nbr_offsets_um"].dtype == torch.float32
        assert batch["nbr_batch"].dtype == torch.int64
        assert torch.bincount(batch["nbr_batch"], minlength=8).tolist() == counts
        assert [m["slide"] for m in batch["meta"]] == [k.split("_")[0] for k in batch["key"]]
        for i, key in enumerate(batch["key"]):
            np.testing.assert_array_equal(batch["tokens"][i].numpy(), truth[key]["tokens"])
            mine = (batch["nbr_batch"] == i).numpy()
            np.testing.assert_array_equal(batch["nbr_tokens"][mine].numpy(), truth[key]["nbr_tokens"])
            np.testing.assert_array_equal(batch["nbr_offsets_um"][mine].numpy(), truth[key]["offsets"])
    # Normalisation: undo it and compare with the pixels written (JPEG at quality 95 is close).
    first = batches[0]
    pixels = model_images(first, mean, std)[0] * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    written = torch.from_numpy(truth[first["key"][0]]["image"].copy()).permute(2, 0, 1).float() / 255
    assert (pixels - written).abs().mean() < 0.02
    # Some cells of the epoch have no neighbours: they must still be in the batch.
    assert any(len(truth[k]["nbr_tokens"]) == 0 for b in batches for k in b["key"])


def test_two_ranks_read_disjoint_shards_and_cover_the_epoch(equal):
    root, truth = equal
    manifest = load_manifest(root)
    for epoch in (0, 1):
        shard_lists = [rank_shards(manifest, r, 2, epoch=epoch, seed=3) for r in (0, 1)]
        assert not set(shard_lists[0]) & set(shard_lists[1])
        assert sorted(shard_lists[0] + shard_lists[1]) == sorted(s["path"] for s in manifest["shards"])
        seen = []
        for rank in (0, 1):
            loader, steps = make_loader(
                root,
                4,
                rank=rank,
                world_size=2,
                epoch=epoch,
                seed=3,
                num_workers=0,
                shuffle_buffer=10,
                resample=False,
                augment=True,
                split="shards",
            )
            keys = list(itertools.chain.from_iterable(epoch_keys(loader)))
            assert steps == 96 // (4 * 2) and len(keys) == steps * 4
            assert {truth[k]["shard"] for k in keys} <= set(shard_lists[rank])
            seen += keys
        assert sorted(seen) == sorted(truth)  # every sample exactly once per epoch
    # The split changes with the epoch (a fixed seed and epoch always give the same split).
    splits = {tuple(sorted(rank_shards(manifest, 0, 2, epoch=e, seed=3))) for e in range(6)}
    assert len(splits) > 1
    assert rank_shards(manifest, 0, 2, epoch=4, seed=3) == rank_shards(manifest, 0, 2, epoch=4, seed=3)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("split", ["samples", "shards"])
def test_every_rank_runs_the_same_number_of_steps_with_unequal_shards(unequal, world_size, split):
    root, _ = unequal
    expected = steps_per_epoch_for(88, 4, world_size)
    for epoch in (0, 1):
        for rank in range(world_size):
            loader, steps = make_loader(
                root,
                4,
                rank=rank,
                world_size=world_size,
                epoch=epoch,
                num_workers=0,
                shuffle_buffer=8,
                resample=False,
                augment=False,
                split=split,
            )
            batches = epoch_keys(loader)
            assert steps == expected and len(batches) == expected
            assert all(len(b) == 4 for b in batches)
            keys = [k for b in batches for k in b]
            # A rank holding at least steps × batch cells never repeats one within the epoch
            # (split=samples: every rank holds 88 / world_size of them, more than it needs).
            held = (
                88 // world_size
                if split == "samples"
                else sum(
                    s["n_samples"]
                    for s in load_manifest(root)["shards"]
                    if s["path"] in rank_shards(root, rank, world_size, epoch=epoch)
                )
            )
            if held >= steps * 4:
                assert len(set(keys)) == len(keys)
    # drop_last=False rounds the steps up instead (full batches, a few repeats).
    loader, steps = make_loader(
        root, 4, rank=1, world_size=3, num_workers=0, shuffle_buffer=8, resample=False, augment=False, drop_last=False
    )
    assert steps == -(-88 // 12) and len(epoch_keys(loader)) == steps


def test_same_seed_epoch_rank_gives_same_stream_and_new_epoch_reshuffles(equal):
    root, _ = equal

    def run(epoch, seed=0, rank=0, via_set_epoch=False):
        loader, _ = make_loader(
            root,
            4,
            rank=rank,
            world_size=2,
            epoch=0 if via_set_epoch else epoch,
            seed=seed,
            num_workers=0,
            shuffle_buffer=12,
            resample=False,
            augment=True,
        )
        if via_set_epoch:
            loader.set_epoch(epoch)
        batches = list(loader)
        return [k for b in batches for k in b["key"]], torch.cat([model_images(b) for b in batches[:2]])

    keys, images = run(epoch=0)
    keys_again, images_again = run(epoch=0)
    assert keys == keys_again
    assert torch.equal(images, images_again)  # same augmentations too
    keys_epoch1, _ = run(epoch=1)
    assert keys_epoch1 != keys
    assert run(epoch=1, via_set_epoch=True)[0] == keys_epoch1
    assert run(epoch=0, seed=1)[0] != keys
    assert run(epoch=0, rank=1)[0] != keys


@pytest.mark.parametrize("flip,turns", list(itertools.product((0, 1), range(4))))
def test_dihedral_moves_pixels_like_offsets(flip, turns):
    """A pixel at centre + (dx, dy) lands at centre + M (dx, dy), centre = (S - 1) / 2."""
    size = 9
    image = np.arange(size * size * 3).reshape(size, size, 3)
    centre = (size - 1) / 2
    out = dihedral_image(image, flip, turns)
    for x, y in [(7, 1), (0, 5), (3, 8)]:
        offset = np.array([[x - centre, y - centre]])
        new_x, new_y = (dihedral_offsets(offset, flip, turns)[0] + centre).astype(int)
        np.testing.assert_array_equal(out[new_y, new_x], image[y, x])
    assert abs(np.linalg.det(dihedral_matrix(flip, turns))) == 1


def test_augmented_marker_follows_augmented_offset(tmp_path):
    """Each neighbour offset points at a white square; after flips/rotations it still does."""
    write_dataset(tmp_path, {"slideM": [32, 32]}, seed=2, marker=True)
    loader, _ = make_loader(
        tmp_path, 8, rank=0, world_size=1, seed=5, num_workers=0, shuffle_buffer=4, resample=False, augment=True
    )
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    transforms_seen = set()
    centre = (CROP_PX - 1) / 2
    for batch in loader:
        for i in range(len(batch["key"])):
            grey = (model_images(batch)[i] * std + mean).mean(dim=0)  # (H, W) in [0, 1]
            ys, xs = torch.nonzero(grey > 0.5, as_tuple=True)
            marker_px = np.array([xs.float().mean() - centre, ys.float().mean() - centre])
            # The image transform is drawn per cell, so read it from the marker even without neighbours.
            transforms_seen.add(tuple(np.round(marker_px).astype(int)))
            for offset in batch["nbr_offsets_um"][batch["nbr_batch"] == i].numpy():
                np.testing.assert_allclose(offset / UM_PER_PX, marker_px, atol=0.5)
    assert len(transforms_seen) == 8


@pytest.mark.parametrize("path", ["_numpy", "_torch"])
@pytest.mark.parametrize("saturation", [0.0, 0.3])
def test_device_colour_path_equals_the_affine_map_then_clamp_then_normalise(saturation, path):
    """DeviceImages (the trainer's on-device step; its CPU and GPU code paths) against ColourDraw.affine."""
    config = AugmentConfig(brightness=0.3, contrast=0.3, saturation=saturation, channel_gain=0.2)
    mean, std = np.array([0.6, 0.5, 0.4]), np.array([0.2, 0.3, 0.25])
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    images[:, :8] = 250  # bright rows, pushed past 1 by the jitter: exercises the clamp
    draws = [draw_colour(np.random.default_rng(7 + i), config) for i in range(3)]
    colour = torch.tensor([[*d.gain, d.brightness, d.saturation, d.contrast] for d in draws], dtype=torch.float32)
    transforms = [(1, 1), (0, 0), (1, 3)]
    out = getattr(DeviceImages(mean, std), path)(torch.from_numpy(images), torch.tensor(transforms), colour)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    for i, (draw, (flip, turns)) in enumerate(zip(draws, transforms)):
        matrix, offset = draw.affine(images[i, ::4, ::4].reshape(-1, 3).mean(axis=0) / 255.0)
        pixels = dihedral_image(images[i], flip, turns).reshape(-1, 3) / 255.0  # (H·W, 3)
        expected = np.clip(pixels @ matrix.T + offset, 0.0, 1.0)
        expected = ((expected - mean) / std).reshape(32, 32, 3).transpose(2, 0, 1)
        np.testing.assert_allclose(out[i].numpy(), expected, atol=1e-4)
        assert (expected == ((1 - mean) / std)[:, None, None]).any()  # the clamp was hit
    bf16 = DeviceImages(mean, std)(torch.from_numpy(images), torch.tensor(transforms), colour, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    # A wrong transform would be caught: the control differs.
    control = getattr(DeviceImages(mean, std), path)(
        torch.from_numpy(images), torch.tensor([(0, 1), (0, 0), (1, 3)]), colour
    )
    assert not torch.allclose(control[0], out[0], atol=1e-2)


def test_two_workers_split_shards_without_duplicates(equal):
    root, truth = equal
    loader, steps = make_loader(
        root, 4, rank=0, world_size=1, num_workers=2, shuffle_buffer=10, resample=False, augment=False
    )
    keys = [k for b in epoch_keys(loader) for k in b]
    assert len(keys) == steps * 4 == 96
    assert sorted(keys) == sorted(truth)
    # With 2 ranks × 2 workers each worker holds one shard; ranks stay disjoint.
    per_rank = []
    for rank in (0, 1):
        loader, steps = make_loader(
            root, 4, rank=rank, world_size=2, num_workers=2, shuffle_buffer=10, resample=False, augment=False
        )
        keys = [k for b in epoch_keys(loader) for k in b]
        assert len(keys) == steps * 4 and len(set(keys)) == len(keys)
        per_rank.append(set(keys))
    assert not per_rank[0] & per_rank[1]


def test_resampled_shards_give_fixed_steps_and_rank_dependent_streams(equal):
    root, truth = equal
    streams = []
    for rank in (0, 1):
        loader, steps = make_loader(
            root,
            4,
            rank=rank,
            world_size=2,
            num_workers=0,
            shuffle_buffer=10,
            resample=True,
            augment=False,
            steps_per_epoch=5,
        )
        keys = [k for b in epoch_keys(loader) for k in b]
        assert steps == 5 and len(keys) == 20 and set(keys) <= set(truth)
        streams.append(keys)
    assert streams[0] != streams[1]


def test_worker_quota_is_round_robin_and_the_sample_split_is_balanced():
    assert worker_batch_quota(15, 4) == [4, 4, 4, 3] and worker_batch_quota(2, 3) == [1, 1, 0]
    assert worker_batch_quota(7, 0) == [7]
    # Shards of 2,600 and 40 samples on 2 ranks x 2 workers: each worker holds a quarter (±1) of them.
    sizes = [2600, 40]
    for rank in (0, 1):
        plan = plan_rank(sizes, 8, rank=rank, world_size=2, num_workers=2, epoch=0, seed=0, steps=165, resample=False)
        assert plan.steps == 165 and plan.worker_batches == (83, 82)
        assert sum(plan.worker_samples) == 1320 and all(
            h >= q * 8 for h, q in zip(plan.worker_samples, plan.worker_batches)
        )
    pieces = [
        p
        for r in (0, 1)
        for w in plan_rank(
            sizes, 8, rank=r, world_size=2, num_workers=2, epoch=0, seed=0, steps=165, resample=False
        ).worker_pieces
        for p in w
    ]
    covered = sorted((s, i) for s, first, stop in pieces for i in range(first, stop))
    assert covered == sorted((s, i) for s in (0, 1) for i in range(sizes[s]))  # disjoint, covering


def test_bad_inputs_raise_input_error(equal, tmp_path):
    root, _ = equal
    with pytest.raises(InputError, match="world_size=8"):
        make_loader(root, 4, rank=0, world_size=8, num_workers=0, shuffle_buffer=1, resample=False)
    with pytest.raises(InputError, match="augment"):
        make_loader(
            root, 4, rank=0, world_size=1, num_workers=0, shuffle_buffer=1, resample=False, augment={"sharpen": 1.0}
        )
    with pytest.raises(InputError, match="manifest"):
        make_loader(tmp_path, 4, rank=0, world_size=1, num_workers=0, shuffle_buffer=1, resample=False)


def test_fast_tar_reader_matches_webdataset(unequal):
    root, _ = unequal
    urls = [{"url": str(root / s["path"])} for s in load_manifest(root)["shards"]]
    ours = list(tar_samples(iter(urls)))
    reference = list(wds.DataPipeline(lambda: iter(urls), wds.tarfile_to_samples()))
    assert len(ours) == len(reference) == 88
    for mine, theirs in zip(ours, reference):
        assert mine.keys() == theirs.keys()
        assert all(mine[k] == theirs[k] for k in mine)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(300, dtype=np.int32),
        np.zeros((0, 300), dtype=np.int32),
        np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32),
        np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4)),  # falls back to np.load
    ],
)
def test_load_npy_matches_np_load(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    loaded = load_npy(buffer.getvalue())
    assert loaded.dtype == array.dtype and loaded.shape == array.shape
    np.testing.assert_array_equal(loaded, array)


def test_a_broken_sample_names_its_shard_and_member():
    raw = encode_sample(
        "cell_1",
        _jpeg(np.zeros((8, 8, 3), dtype=np.uint8)),
        np.ones(5, np.int32),
        np.ones((2, 5), np.int32),
        np.zeros((2, 2), np.float32),
        {"cell_id": "1"},
    )
    raw["__url__"] = "slideX/shard-000003.tar"
    decode = lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # noqa: E731
    assert decode_sample(raw, decode).nbr_tokens.shape == (2, 5)
    with pytest.raises(InputError, match=r"shard-000003.tar \[cell_1.tokens.npy\]"):
        decode_sample({k: v for k, v in raw.items() if k != "tokens.npy"}, decode)
    bad = dict(
        raw,
        **{
            "nbr_offsets.npy": encode_sample("c", b"", np.ones(5), np.ones((3, 5)), np.zeros((3, 2)), {})[
                "nbr_offsets.npy"
            ]
        },
    )
    with pytest.raises(InputError, match=r"cell_1.nbr_offsets.npy.*\(2, 2\)"):
        decode_sample(bad, decode)


def test_training_reads_its_shards_over_http_and_survives_a_broken_stream(equal, tmp_path):
    """The manifest lists http:// URLs (a local server); the first stream of every shard is cut halfway."""
    root, _ = equal
    server, base = serve_flaky(root, failures=1)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        for shard in manifest["shards"]:
            shard["path"] = f"{base}/{shard['path']}"
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        kwargs = dict(rank=0, world_size=1, num_workers=0, shuffle_buffer=1, augment=False)
        remote, _ = make_loader(tmp_path / "manifest.json", 8, **kwargs)
        local, _ = make_loader(root / "manifest.json", 8, **kwargs)
        assert epoch_keys(remote) == epoch_keys(local)  # every sample once, in the same order
        assert all(count == 2 for count in server.seen.values()) and len(server.seen) == len(manifest["shards"])
    finally:
        server.shutdown()
