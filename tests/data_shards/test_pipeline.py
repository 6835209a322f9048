"""End-to-end make_shards on a small procedural bundle: shards, manifest, crops, resume, failures."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from omegaconf import OmegaConf

from common.errors import InputError
from data_shards import pipeline
from data_shards.manifest import load_manifest
from data_shards.register import Registration
from data_shards.slide import Slide
from data_shards.synthetic import make_bundle
from data_shards.tokenize import rank_tokens
from data_shards.vocabulary import Vocabulary
from data_shards.xenium import read_xenium


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "slide"
    make_bundle(out, "procedural", n_cells=1200, seed=3, deformation_um=0.0, n_keypoints=30)
    return out


def _config(bundle: Path, out_dir: Path, **overrides) -> OmegaConf:
    cfg = {
        "out_dir": str(out_dir),
        "slides": [{"id": "s1", "bundle": str(bundle), "meta": {"patient": "P7"}}],
        "register": {"n_regions": 1},
        "shards": {"samples_per_shard": 400, "jpeg_quality": 95, "seed": 0},
        "progress": False,
    }
    return OmegaConf.merge(OmegaConf.create(cfg), OmegaConf.create(overrides))


@pytest.fixture(scope="module")
def built(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    manifest = pipeline.build_shards(_config(bundle, out))
    return out, manifest


def _samples(shard_dir: Path, manifest: dict) -> list[dict]:
    urls = [str(shard_dir / s["path"]) for s in manifest["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))


def test_manifest_lists_every_sample_and_reads_back(built):
    shard_dir, manifest = built
    loaded = load_manifest(shard_dir)
    assert loaded["n_samples"] == sum(s["n_samples"] for s in loaded["shards"]) == manifest["n_samples"]
    assert (
        manifest["n_samples"]
        == manifest["slides"]["s1"]["qc"]["n_kept"] - manifest["slides"]["s1"]["crops"]["n_skipped"]
    )
    assert manifest["vocabulary"]["sha256"] == Vocabulary.from_file(shard_dir / "vocab.tsv").sha256()
    samples = _samples(shard_dir, manifest)
    assert len(samples) == manifest["n_samples"]
    assert len({s["__key__"] for s in samples}) == len(samples)
    # plain tar sees the same members, five per sample
    names = []
    for shard in manifest["shards"]:
        with tarfile.open(shard_dir / shard["path"]) as tar:
            names += tar.getnames()
    assert len(names) == 5 * len(samples)
    # wids_index.json: the same shards for webdataset's indexed reader, counts checked with plain tar.
    wids = json.loads((shard_dir / "wids_index.json").read_text())
    assert wids["__kind__"] == "wids-shard-index-v1" and wids["wids_version"] == 1
    for entry in wids["shardlist"]:
        with tarfile.open(shard_dir / entry["url"]) as tar:
            assert len(tar.getnames()) == 5 * entry["nsamples"]
        assert entry["filesize"] == (shard_dir / entry["url"]).stat().st_size
    sample = samples[0]
    assert sample["jpg"].shape == (224, 224, 3)
    assert sample["tokens.npy"].dtype == np.int32 and sample["tokens.npy"].shape == (300,)
    assert sample["nbr_tokens.npy"].shape[1:] == (300,)
    assert sample["nbr_offsets.npy"].shape == (sample["nbr_tokens.npy"].shape[0], 2)
    assert sample["json"]["slide"] == "s1" and sample["json"]["patient"] == "P7"


def test_tokens_and_neighbours_match_the_reference(built, bundle):
    shard_dir, manifest = built
    adata = read_xenium(bundle)
    vocab = Vocabulary.from_file(shard_dir / "vocab.tsv")
    reference = rank_tokens(adata, vocab, tech_mean=shard_dir / "tech_mean.npy")
    row_of = {cell: i for i, cell in enumerate(adata.obs_names)}
    registration = Registration.from_json(shard_dir / "s1" / "registration" / "registration.json")
    he_um = registration.map(adata.obsm["spatial"]) * registration.he_um_per_px  # (n, 2) µm along H&E axes
    samples = _samples(shard_dir, manifest)
    token_of = {s["json"]["cell_id"]: s["tokens.npy"] for s in samples}
    for sample in samples[:200]:
        i = row_of[sample["json"]["cell_id"]]
        np.testing.assert_array_equal(sample["tokens.npy"], reference[i])
        offsets = sample["nbr_offsets.npy"]
        assert len(offsets) <= 8
        assert np.all(np.hypot(offsets[:, 0], offsets[:, 1]) <= 50.0 + 1e-3)
        # each neighbour row is the token row of a real cell at that offset; offsets are in µm
        # along the H&E axes, so map the cells to the H&E first (registered positions)
        for row, offset in zip(sample["nbr_tokens.npy"], offsets):
            j = int(np.argmin(np.hypot(*(he_um - (he_um[i] + offset)).T)))
            np.testing.assert_array_equal(row, reference[j])
    assert len(token_of) == len(samples)


def test_crops_are_centred_on_the_planted_cells(built, bundle):
    shard_dir, manifest = built
    truth = pd.read_parquet(bundle / "ground_truth_cells.parquet").set_index("cell_id")
    samples = _samples(shard_dir, manifest)
    errors = []
    with Slide(bundle / "he" / "post_xenium_he.ome.tif") as slide:
        for sample in samples[:60]:
            meta = sample["json"]
            true_x, true_y = truth.loc[meta["cell_id"], ["he_x_px", "he_y_px"]]
            errors.append(np.hypot(meta["he_x_px"] - true_x, meta["he_y_px"] - true_y))
            # the crop's pixels are the slide's around the true centre: find the best shift
            crop = sample["jpg"].astype(float)  # decoded JPEG, (224, 224, 3)
            cx, cy = int(round(true_x)), int(round(true_y))
            window = slide.read_region(cx - 112 - 3, cy - 112 - 3, 224 + 6, 224 + 6).astype(float)
            scores = {
                (dx, dy): np.abs(window[3 + dy : 3 + dy + 224, 3 + dx : 3 + dx + 224] - crop).mean()
                for dx in range(-3, 4)
                for dy in range(-3, 4)
            }
            dx, dy = min(scores, key=scores.get)
            assert max(abs(dx), abs(dy)) <= 2, (meta["cell_id"], dx, dy)
    assert np.max(errors) < 2.0, f"registered centres off by up to {np.max(errors):.2f} px"


def test_rerun_skips_completed_slides(built, bundle):
    shard_dir, manifest = built
    first = {p: p.stat().st_mtime_ns for p in shard_dir.glob("s1/*.tar")}
    again = pipeline.build_shards(_config(bundle, shard_dir))
    assert {p: p.stat().st_mtime_ns for p in shard_dir.glob("s1/*.tar")} == first
    assert again["n_samples"] == manifest["n_samples"]


def test_spatial_groups_stay_together(bundle, tmp_path):
    manifest = pipeline.build_shards(_config(bundle, tmp_path, shards={"group_um": 100.0, "samples_per_shard": 400}))
    samples = _samples(tmp_path, manifest)
    blocks = [(int(s["json"]["x_um"] // 100), int(s["json"]["y_um"] // 100), s["__url__"]) for s in samples]
    # every 100 µm block appears as one contiguous run within one shard
    runs = [blocks[0]]
    for block in blocks[1:]:
        if block != runs[-1]:
            runs.append(block)
    assert len(runs) == len(set(runs))


def test_crash_mid_slide_leaves_nothing_readable(bundle, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_encode = pipeline.encode_jpeg

    def flaky(crop, quality):
        calls["n"] += 1
        if calls["n"] > 500:
            raise RuntimeError("simulated crash")
        return real_encode(crop, quality)

    monkeypatch.setattr(pipeline, "encode_jpeg", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.build_shards(_config(bundle, tmp_path))
    assert not list(tmp_path.rglob("*.tar"))
    assert not (tmp_path / "s1").exists()
    assert not (tmp_path / "manifest.json").exists()
    monkeypatch.setattr(pipeline, "encode_jpeg", real_encode)
    manifest = pipeline.build_shards(_config(bundle, tmp_path))
    assert manifest["n_samples"] > 1000


def test_corrupt_tile_is_a_counted_skip(bundle, tmp_path):
    import shutil

    import tifffile

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    path = copy / "he" / "post_xenium_he.ome.tif"
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[0], page.databytecounts[0]
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\x00" * count)
    manifest = pipeline.build_shards(_config(copy, tmp_path / "out", qc={"on_tissue": False}))
    crops = manifest["slides"]["s1"]["crops"]
    assert crops["n_skipped_unreadable"] > 0
    assert manifest["n_samples"] == manifest["slides"]["s1"]["qc"]["n_kept"] - crops["n_skipped_unreadable"]


def test_every_gene_outside_the_vocabulary_is_an_error(bundle, tmp_path):
    vocab = tmp_path / "other.txt"
    vocab.write_text("NOT_A_GENE_1\nNOT_A_GENE_2\n")
    with pytest.raises(InputError, match="other.txt"):
        pipeline.build_shards(_config(bundle, tmp_path / "out", vocab=str(vocab), tech_mean=None))
    assert not list((tmp_path / "out").rglob("*.tar"))


def test_failed_registration_is_refused_before_writing(bundle, tmp_path):
    with pytest.raises(InputError, match="keypoints"):
        pipeline.build_shards(_config(bundle, tmp_path, register={"max_rms_um": 1e-6}))
    assert not (tmp_path / "s1").exists() and not list(tmp_path.rglob("*.tar"))


def test_no_cell_passing_qc_is_an_error(bundle, tmp_path):
    with pytest.raises(InputError, match="passing QC"):
        pipeline.build_shards(_config(bundle, tmp_path, qc={"min_transcripts": 10**9}))
    assert not list(tmp_path.rglob("*.tar"))


def test_missing_bundle_and_bad_slide_ids(tmp_path):
    with pytest.raises(InputError, match="nowhere"):
        pipeline.build_shards(_config(tmp_path / "nowhere", tmp_path / "out"))
    with pytest.raises(InputError, match="slides\\[0\\].id"):
        pipeline.build_shards(OmegaConf.create({"out_dir": str(tmp_path), "slides": [{"id": "a.b", "bundle": "x"}]}))


def test_parallel_slides_and_array_job_flow_give_the_same_manifest(bundle, tmp_path):
    slides = [{"id": "a", "bundle": str(bundle)}, {"id": "b", "bundle": str(bundle)}]
    parallel = pipeline.build_shards(_config(bundle, tmp_path / "parallel", slides=slides, workers=2))
    assert set(parallel["slides"]) == {"a", "b"}

    array_cfg = _config(bundle, tmp_path / "array", slides=slides)
    pipeline.prepare(array_cfg)  # the SLURM template's first step
    for slide_id in ("b", "a"):  # array tasks, in any order
        assert pipeline.build_shards(OmegaConf.merge(array_cfg, {"only_slides": [slide_id], "merge": False})) is None
    merged = pipeline.merge(array_cfg)
    assert merged["n_samples"] == parallel["n_samples"]
    assert [s["path"] for s in merged["shards"]] == [s["path"] for s in parallel["shards"]]
    for a, b in zip(merged["shards"], parallel["shards"]):
        assert (tmp_path / "array" / a["path"]).read_bytes() == (tmp_path / "parallel" / b["path"]).read_bytes()


def test_array_task_without_prepare_is_an_error(bundle, tmp_path):
    with pytest.raises(InputError, match="prepare"):
        pipeline.build_shards(_config(bundle, tmp_path, only_slides=["s1"], merge=False))


def test_verify_reads_every_shard_and_catches_a_truncated_one(built, tmp_path):
    import shutil

    from data_shards.manifest import verify_shards

    shard_dir, manifest = built
    assert verify_shards(shard_dir) == {"n_shards": manifest["n_shards"], "n_samples": manifest["n_samples"]}
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    victim = copy / manifest["shards"][0]["path"]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(InputError, match=victim.name):
        verify_shards(copy)


def test_rewritten_inputs_are_sharded_again(bundle, tmp_path):
    import os
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    cfg = _config(copy, tmp_path / "out")
    pipeline.build_shards(cfg)
    tar = next((tmp_path / "out" / "s1").glob("*.tar"))
    before = tar.stat().st_mtime_ns
    cells = copy / "cells.parquet"
    os.utime(cells, ns=(cells.stat().st_atime_ns, cells.stat().st_mtime_ns + 10**9))
    pipeline.build_shards(cfg)
    assert next((tmp_path / "out" / "s1").glob("*.tar")).stat().st_mtime_ns != before


def test_malformed_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="manifest.json.*valid JSON"):
        load_manifest(tmp_path)


def test_bundle_with_cells_csv_gz_only_gives_the_same_samples(built, bundle, tmp_path):
    # XOA writes cells.csv.gz beside cells.parquet (same columns, no row-number column);
    # read_xenium accepts it alone, so registration (centroids for the overlay and the on-tissue
    # check) and sharding must too. The registration is fitted anew from the copy's keypoints.
    import shutil

    shard_dir, manifest = built
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    cells = pd.read_parquet(copy / "cells.parquet")
    cells.to_csv(copy / "cells.csv.gz", index=False)
    (copy / "cells.parquet").unlink()
    csv_manifest = pipeline.build_shards(_config(copy, tmp_path / "out"))
    assert csv_manifest["n_samples"] == manifest["n_samples"]
    assert [s["n_samples"] for s in csv_manifest["shards"]] == [s["n_samples"] for s in manifest["shards"]]
    for ours, theirs in zip(csv_manifest["shards"], manifest["shards"]):
        with tarfile.open(tmp_path / "out" / ours["path"]) as a, tarfile.open(shard_dir / theirs["path"]) as b:
            assert a.getnames() == b.getnames()
            for name in a.getnames():
                assert a.extractfile(name).read() == b.extractfile(name).read(), name


def test_slide_um_per_px_override_reaches_registration_and_crops(bundle, tmp_path):
    # A slide whose metadata misstates its pixel size: the slide entry's override is what registration and
    # the crops use (the metadata here says 0.5; the override a hair off it, so the µm/px check still passes).
    override = 0.5004
    cfg = _config(bundle, tmp_path / "shards", shards={"samples_per_shard": 2000})
    cfg.slides[0].he_um_per_px = override
    manifest = pipeline.build_shards(cfg)
    slide = manifest["slides"]["s1"]
    assert slide["he_um_per_px"] == pytest.approx(override)
    report = pd.read_json(tmp_path / "shards" / "s1" / "registration" / "registration_report.json", typ="series")
    assert report["he_um_per_px_slide"] == pytest.approx(override)


def test_in_memory_shuffle_and_threaded_encoding_write_the_same_shard_bytes(bundle, tmp_path, monkeypatch):
    flushes = []
    original_flush = pipeline.ShuffledShardWriter._flush
    monkeypatch.setattr(
        pipeline.ShuffledShardWriter,
        "_flush",
        lambda self, bucket: flushes.append(bucket) or original_flush(self, bucket),
    )
    # Default budget: the slide fits in memory; one encoding thread.
    held = pipeline.build_shards(_config(bundle, tmp_path / "memory", shards={"encode_threads": 1}))
    assert not flushes, "a slide within shards.memory_budget_mb must not be spilled"
    # Spilled, and the crops JPEG-encoded by 3 threads: still the same samples in the same order.
    spilled = pipeline.build_shards(
        _config(bundle, tmp_path / "spill", shards={"memory_budget_mb": 0, "encode_threads": 3})
    )
    assert flushes, "memory_budget_mb 0 must take the spill route"
    assert [s["path"] for s in spilled["shards"]] == [s["path"] for s in held["shards"]]
    assert len(held["shards"]) >= 2
    for shard in held["shards"]:
        memory_tar = (tmp_path / "memory" / shard["path"]).read_bytes()
        assert (tmp_path / "spill" / shard["path"]).read_bytes() == memory_tar, shard["path"]
