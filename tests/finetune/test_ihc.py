"""Virtual IHC head: FiLM U-Net, PatchGAN step, paired-folder reader, synthetic painter, run_ihc end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import rgb2hed

from common.errors import InputError
from finetune.ihc import PairDataset, fit_generator, load_generator, predict_ihc, run_ihc, train_step
from finetune.ihc import train as ihc_train
from finetune.ihc.data import load_pair, read_pairs, read_rgb
from finetune.ihc.model import FiLMUNet, PatchDiscriminator, build_generator, patchgan_receptive_field_px
from finetune.metrics import DEFAULT_DAB_THRESHOLDS, h_score
from finetune.synthetic import write_tiny_export
from finetune.synthetic.ihc import clean_nuclei, draw_intensity_classes, paint_ihc, planted_h_score, write_synthetic_ihc
from finetune.synthetic.stain_tiles import procedural_cell_tiles

torch.set_num_threads(1)
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}


# ---------------------------------------------------------------------------------------------
# Generator and FiLM


def test_film_is_identity_at_zero_and_exactly_affine_otherwise():
    torch.manual_seed(0)
    film = FiLMUNet([4, 8, 16], embedding_dim=5, norm="group").eval()
    torch.manual_seed(0)
    plain = FiLMUNet([4, 8, 16], embedding_dim=None, norm="group").eval()
    # Same seed, same U-Net weights with or without FiLM (a fair no-FiLM baseline) ...
    plain_state = plain.state_dict()
    for key, value in film.state_dict().items():
        if not key.startswith("film"):
            assert torch.equal(value, plain_state[key]), key
    # ... and the FiLM layers add nothing but their zero-initialised projections.
    assert set(film.state_dict()) - set(plain_state) == {
        k for k in film.state_dict() if k.startswith(("film_bottleneck.", "film_up."))
    }
    x = torch.randn(2, 3, 16, 20)
    for scale in (1.0, 100.0):
        assert torch.equal(film(x, scale * torch.randn(2, 5)), plain(x))

    # Non-zero γ/β: one stage's output is exactly x·(1 + γ) + β with (γ, β) = W·e + b.
    stage = film.film_up[0]
    with torch.no_grad():
        stage.proj.weight.normal_(0, 0.5)
        stage.proj.bias.normal_(0, 0.5)
    seen = {}
    handle = stage.register_forward_hook(lambda module, args, out: seen.update(x=args[0], out=out))
    embedding = torch.randn(2, 5)
    changed = film(x, embedding)
    handle.remove()
    w, b = stage.proj.weight.detach(), stage.proj.bias.detach()
    gamma_beta = embedding @ w.T + b  # (B, 2C)
    gamma, beta = gamma_beta[:, :4], gamma_beta[:, 4:]
    expected = seen["x"] * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
    torch.testing.assert_close(seen["out"], expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(changed, plain(x))


def test_generator_shapes_range_and_size_errors():
    torch.manual_seed(1)
    generator = FiLMUNet([4, 8, 16], embedding_dim=3).eval()
    assert generator.multiple_px == 4
    out = generator(torch.randn(2, 3, 12, 20) * 5, torch.randn(2, 3))  # odd multiples of 4
    assert out.shape == (2, 3, 12, 20)
    assert out.min() >= -1 and out.max() <= 1
    with pytest.raises(InputError, match="multiples of 4"):
        generator(torch.randn(1, 3, 14, 16), torch.randn(1, 3))
    with pytest.raises(InputError, match="embedding"):
        generator(torch.randn(1, 3, 16, 16))
    # predict_ihc pads any tile size and gives back the same size, uint8
    tiles = [np.random.default_rng(0).integers(0, 255, (13, 18, 3), dtype=np.uint8)]
    pred = predict_ihc(generator, tiles, np.zeros((1, 3), np.float32), torch.device("cpu"))
    assert pred[0].shape == (13, 18, 3) and pred[0].dtype == np.uint8
    with pytest.raises(InputError, match="channels"):
        FiLMUNet([4])


def _tiny_batch(seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    he = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    ihc = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    return he, ihc, torch.randn(2, 3, generator=g)


def test_gan_step_updates_both_nets():
    torch.manual_seed(0)
    generator = FiLMUNet([4, 8], embedding_dim=3)
    discriminator = PatchDiscriminator(channels=4, n_layers=2)
    before_g = [p.detach().clone() for p in generator.parameters()]
    before_d = [p.detach().clone() for p in discriminator.parameters()]
    opt_g = torch.optim.Adam(generator.parameters(), 1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), 1e-3, betas=(0.5, 0.999))
    he, ihc, emb = _tiny_batch()
    parts = train_step(generator, opt_g, he, ihc, emb, 100.0, discriminator, opt_d, "vanilla")
    assert {"l1", "g_gan", "loss_d", "loss_g"} <= set(parts)
    assert any(not torch.equal(a, b) for a, b in zip(before_g, generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_d, discriminator.parameters()))
    assert all(p.requires_grad for p in discriminator.parameters())  # unfrozen again after G's step
    assert patchgan_receptive_field_px(3) == 70  # pix2pix's 70×70 PatchGAN


def test_l1_only_training_never_builds_a_discriminator(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the discriminator must not be built when gan.enabled is false")

    monkeypatch.setattr(ihc_train, "build_discriminator", forbidden)
    monkeypatch.setattr(PatchDiscriminator, "__init__", forbidden)
    tiles = procedural_cell_tiles(2, 16, seed=3, nuclei_per_tile=2)

    class Pairs(PairDataset):  # in-memory stand-in for files
        def _images(self, index):
            return tiles[index].he_rgb, tiles[index].he_rgb[..., ::-1].copy()

    dataset = Pairs([None, None], np.zeros((2, 3), np.float32), crop_px=16)
    torch.manual_seed(0)
    generator = build_generator({"channels": [4, 8], "norm": "group"}, 3)
    train = {"epochs": 1, "batch_size": 2, "lr": 1e-3, "betas": [0.5, 0.999], "l1_weight": 100.0}
    _, discriminator, history = fit_generator(
        generator, dataset, train, {"enabled": False}, torch.device("cpu"), progress=False
    )
    assert discriminator is None and "loss_d" not in history[0]


# ---------------------------------------------------------------------------------------------
# Paired layout reader


def _png(path, shape=(8, 8), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": (3,), "L": ()}[mode]
    Image.fromarray(np.zeros((*shape, *channels), np.uint8), mode=mode).save(path)


def test_read_pairs_reports_unmatched_names_sizes_and_modes(tmp_path):
    root = tmp_path / "set"
    for name in ("a", "b"):
        _png(root / "HE" / "train" / f"{name}.png")
    for name in ("a", "c"):
        _png(root / "IHC" / "train" / f"{name}.png")
    with pytest.raises(InputError) as unmatched:
        read_pairs(root, "train")
    assert "['b']" in str(unmatched.value) and "['c']" in str(unmatched.value)

    (root / "IHC" / "train" / "c.png").rename(root / "IHC" / "train" / "b.png")
    _png(root / "IHC" / "train" / "b.png", shape=(8, 9))
    with pytest.raises(InputError, match=r"IHC/train/b\.png.*size"):
        read_pairs(root, "train")
    _png(root / "IHC" / "train" / "b.png", mode="L")
    with pytest.raises(InputError, match=r"b\.png.*RGB"):
        read_pairs(root, "train")
    _png(root / "IHC" / "train" / "b.png")
    assert [p.name for p in read_pairs(root, "train")] == ["a", "b"]


def test_flat_layout_split_is_seeded_disjoint_and_complete(tmp_path):
    names = [f"t{i:02d}" for i in range(10)]
    for name in names:
        _png(tmp_path / "HE" / f"{name}.png")
        _png(tmp_path / "IHC" / f"{name}.png")
    train = {p.name for p in read_pairs(tmp_path, "train", test_fraction=0.3, seed=4)}
    test = {p.name for p in read_pairs(tmp_path, "test", test_fraction=0.3, seed=4)}
    assert len(test) == 3 and not train & test and train | test == set(names)
    assert test == {p.name for p in read_pairs(tmp_path, "test", test_fraction=0.3, seed=4)}


# ---------------------------------------------------------------------------------------------
# Synthetic painter


def test_painted_ihc_recovers_the_planted_classes_and_h_score(tmp_path):
    rng = np.random.default_rng(0)
    tiles = procedural_cell_tiles(3, 48, seed=1, nuclei_per_tile=8)
    for tile in tiles:
        classes = rng.integers(0, 4, tile.n_nuclei)  # every class, whatever the type
        ihc = paint_ihc(tile.he_rgb, tile.nuclei, classes, rng)
        dab = rgb2hed(ihc)[..., 2]
        mean_dab = np.asarray(ndi.mean(dab, tile.nuclei, np.arange(1, tile.n_nuclei + 1)))
        np.testing.assert_array_equal(np.digitize(mean_dab, DEFAULT_DAB_THRESHOLDS), classes)
        assert h_score(ihc, tile.nuclei)["h_score"] == pytest.approx(planted_h_score(classes)["h_score"])
    # by type: only keratinocytes are ever positive
    types = np.array(["keratinocyte_basal"] * 200 + ["fibroblast"] * 200)
    drawn = draw_intensity_classes(types, rng)
    assert (drawn[200:] == 0).all() and (drawn[:200] > 0).mean() > 0.8

    # the written layout: truth.csv's planted H-score is what h_score measures on the files
    with pytest.raises(InputError, match="distinct names"):
        write_synthetic_ihc(tmp_path / "ihc", tiles + procedural_cell_tiles(3, 48, seed=2))
    more = [replace(t, name=f"more_{i}") for i, t in enumerate(procedural_cell_tiles(3, 48, seed=2))]
    truth = write_synthetic_ihc(tmp_path / "ihc", tiles + more, seed=0, test_fraction=0.34)
    assert set(truth["split"]) == {"train", "test"}
    for split in ("train", "test"):
        for pair in read_pairs(tmp_path / "ihc", split):
            he, ihc, nuclei = load_pair(pair)
            row = truth.set_index("name").loc[pair.name]
            assert row["split"] == split
            assert h_score(ihc, nuclei)["h_score"] == pytest.approx(row["h_score"])
    with pytest.raises(InputError, match="exists"):
        write_synthetic_ihc(tmp_path / "ihc", tiles)


def test_oversized_and_ink_nuclei_are_dropped_and_labels_stay_matched_to_types():
    tile = procedural_cell_tiles(1, 64, seed=4, nuclei_per_tile=5)[0]
    blob = tile.nuclei.copy()
    blob[(blob == 0) & (np.add.outer(np.arange(64), np.arange(64)) < 40)] = 2  # nucleus 2 grows past 120 µm²
    assert (blob == 2).sum() * tile.um_per_px**2 > 120
    he = tile.he_rgb.copy()
    he[tile.nuclei == 4] = (20, 160, 150)  # nucleus 4 is cyan marking ink
    cleaned = clean_nuclei(replace(tile, nuclei=blob, he_rgb=he), 120.0, 15.0)
    assert cleaned.n_nuclei == tile.n_nuclei - 2 == cleaned.nuclei.max()
    np.testing.assert_array_equal(cleaned.cell_types, np.delete(tile.cell_types, [1, 3]))
    np.testing.assert_array_equal(cleaned.nuclei == 2, tile.nuclei == 3)  # label 3 renumbered to 2
    np.testing.assert_array_equal(cleaned.nuclei == 3, tile.nuclei == 5)  # label 5 renumbered to 3
    assert clean_nuclei(tile, 120.0, 15.0) is tile  # real (drawn) nuclei all stay
    assert clean_nuclei(replace(tile, nuclei=blob, he_rgb=he), None, None).n_nuclei == tile.n_nuclei


# ---------------------------------------------------------------------------------------------
# End to end


def _tiny_slide(path, shape_hw=(72, 88)):
    from data_shards.ome_tiff import TILE_PX, write_pyramidal_ome_tiff
    from finetune.stitch import pyramid_tiles

    tile = procedural_cell_tiles(1, max(shape_hw), seed=9)[0].he_rgb[: shape_hw[0], : shape_hw[1]]
    write_pyramidal_ome_tiff(path, shape_hw, 0.5, pyramid_tiles(tile.astype(np.float32)), quality=95, tile_px=TILE_PX)
    return path


@torch.no_grad()
def _train_l1(generator, pairs, meta, encoder_cfg):
    """L1 on training tiles with the embedding recomputed from the export and the saved scaler."""
    from finetune.embed import embed_images
    from finetune.encoders import load_encoder

    encoder = load_encoder(encoder_cfg)
    he = [read_rgb(p.he_path) for p in pairs]
    emb = embed_images(encoder, he, len(he), 8, "projected", progress=False)
    emb = (emb - np.array(meta["embedding_mean"], np.float32)) / np.array(meta["embedding_std"], np.float32)
    preds = predict_ihc(generator, he, emb, torch.device("cpu"))
    return float(np.mean([np.abs(p / 255.0 - read_rgb(q.ihc_path) / 255.0).mean() for p, q in zip(preds, pairs)]))


def test_run_ihc_end_to_end_trains_scores_and_writes(tmp_path):
    data = tmp_path / "data"
    write_synthetic_ihc(data, procedural_cell_tiles(10, 32, seed=5, nuclei_per_tile=5), seed=0, test_fraction=0.3)
    export = write_tiny_export(tmp_path / "export", kwargs=TINY_VIT)
    encoder_cfg = {"source": "export", "path": str(export)}
    cfg = {
        "out_dir": str(tmp_path / "out"),
        "seed": 0,
        "progress": False,
        "device": "cpu",
        "data": {"root": str(data), "cache": True},
        "encoder": encoder_cfg,
        "baseline": "random",
        "model": {"channels": [4, 8, 16]},
        "train": {"epochs": 3, "batch_size": 4, "lr": 5e-3, "train_fit_tiles": 4},
        "eval": {"n_examples": 2},
        "wsi": {"slide": str(_tiny_slide(tmp_path / "slide.ome.tif")), "tile_px": 32, "overlap_px": 8},
    }
    result = run_ihc(cfg)
    out = tmp_path / "out"
    for name in (
        "metrics.json",
        "per_tile.csv",
        "examples.png",
        "hscore_scatter.png",
        "generator.safetensors",
        "generator.json",
        "config.yaml",
        "virtual_ihc.ome.tif",
        "virtual_ihc_preview.png",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["results"]) == {"pretrained_film", "random_film", "identity", "mean_colour"}
    assert "pretrained_film" in result["table"] and "random_film" in result["table"]

    # per-tile CSV: one row per test tile; the real H-score is h_score on the test IHC with its nuclei
    table = pd.read_csv(out / "per_tile.csv")
    test_pairs = read_pairs(data, "test")
    assert sorted(table["name"]) == [p.name for p in test_pairs]
    for pair in test_pairs:
        he, ihc, nuclei = load_pair(pair)
        row = table.set_index("name").loc[pair.name]
        assert row["h_score_real"] == pytest.approx(h_score(ihc, nuclei)["h_score"], abs=1e-4)
        assert row["h_score_real"] == pytest.approx(row["h_score_planted"], abs=1e-4)
    from finetune.metrics import psnr

    mean_psnr_identity = np.mean([psnr(load_pair(p)[0] / 255.0, load_pair(p)[1] / 255.0, 1.0) for p in test_pairs])
    assert metrics["results"]["identity"]["psnr_db"] == pytest.approx(mean_psnr_identity, abs=1e-6)

    # the saved generator beats the same generator untrained (same seed) on the training tiles
    generator, meta = load_generator(out)
    assert meta["embedding"] == "projected" and meta["film"]
    torch.manual_seed(0)
    untrained = build_generator({"channels": [4, 8, 16]}, generator.embedding_dim).eval()
    train_pairs = read_pairs(data, "train")
    trained_l1 = _train_l1(generator, train_pairs, meta, encoder_cfg)
    untrained_l1 = _train_l1(untrained, train_pairs, meta, encoder_cfg)
    assert trained_l1 < 0.8 * untrained_l1
    assert metrics["train_fit"]["l1_trained"] < metrics["train_fit"]["l1_untrained"]

    # whole slide: the level-0 shape and pixel size of the input
    from data_shards.slide import Slide

    with Slide(out / "virtual_ihc.ome.tif") as slide:
        assert tuple(slide.shape) == (72, 88) and slide.um_per_px == pytest.approx(0.5)
    assert metrics["wsi"]["tiles_predicted"] >= 1


def test_run_ihc_without_film_and_config_errors(tmp_path):
    data = tmp_path / "data"
    write_synthetic_ihc(data, procedural_cell_tiles(6, 32, seed=6, nuclei_per_tile=4), seed=0, test_fraction=0.34)
    export = write_tiny_export(tmp_path / "export", kwargs=TINY_VIT)
    cfg = {
        "out_dir": str(tmp_path / "out"),
        "progress": False,
        "device": "cpu",
        "data": {"root": str(data)},
        "encoder": {"source": "export", "path": str(export)},
        "model": {"channels": [4, 8], "film": False},
        "train": {"epochs": 1, "batch_size": 4, "train_fit_tiles": 0},
        "eval": {"n_examples": 1},
    }
    result = run_ihc(cfg)
    assert result["main"] == "no_film" and set(result["results"]) == {"no_film", "identity", "mean_colour"}
    generator, meta = load_generator(tmp_path / "out")
    assert not generator.has_film and not meta["film"]
    with pytest.raises(InputError, match="outside out_dir"):
        run_ihc({**cfg, "out_dir": str(tmp_path)})
    with pytest.raises(InputError, match="baseline"):
        run_ihc({**cfg, "baseline": "imagenet"})


def test_settings_are_checked_against_the_schema_before_anything_runs(tmp_path):
    """run_* checks what it is given like launch/finetune.py does (its subprocess test: test_launch_finetune.py)."""
    from common.config import apply_schema
    from finetune.ihc import IHCConfig

    # a dict from a notebook: misspelled keys at any depth are refused with the closest valid one
    with pytest.raises(InputError, match="did you mean `train.epochs`"):
        run_ihc({"out_dir": str(tmp_path / "out"), "data": {"root": str(tmp_path)}, "train": {"epoch": 3}})
    with pytest.raises(InputError, match="did you mean `data.synthetic.n_tiles`"):
        run_ihc({"out_dir": str(tmp_path / "out"), "data": {"root": str(tmp_path), "synthetic": {"n_tile": 3}}})
    assert not (tmp_path / "out").exists()
    cfg = apply_schema(IHCConfig, {"data": {"synthetic": {"bundle": "b"}}})
    assert cfg.data.synthetic.n_tiles == 200 and cfg.data.synthetic.seed is None and cfg.train.betas == [0.5, 0.999]
