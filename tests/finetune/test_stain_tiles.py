"""Typed-nuclei H&E tiles: procedural drawing, and matching segmented nuclei to a bundle's planted cells."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from skimage.color import rgb2hed

from common.errors import InputError
from data_shards.ome_tiff import tiles_from_array, write_pyramidal_ome_tiff
from finetune.synthetic.stain_tiles import (
    HE_NAME,
    PROCEDURAL_TYPES,
    TRUTH_NAME,
    UNASSIGNED,
    demo_cell_tiles,
    procedural_cell_tiles,
)


def test_procedural_tiles_label_every_nucleus_with_its_type_and_look():
    tiles = procedural_cell_tiles(6, tile_px=64, seed=3, nuclei_per_tile=8)
    areas = {kind: [] for kind in PROCEDURAL_TYPES}
    for tile in tiles:
        assert tile.he_rgb.shape == (64, 64, 3) and tile.he_rgb.dtype == np.uint8
        assert tile.nuclei.max() == tile.n_nuclei == len(tile.cell_types) > 0
        hematoxylin = rgb2hed(tile.he_rgb)[..., 0]
        assert hematoxylin[tile.nuclei > 0].mean() > hematoxylin[tile.nuclei == 0].mean() + 0.05
        for label, kind in enumerate(tile.cell_types, start=1):
            areas[kind].append(int((tile.nuclei == label).sum()))
    # immune nuclei are the small ones, suprabasal keratinocytes the big ones (as drawn)
    assert np.mean(areas["immune"]) < 0.6 * np.mean(areas["keratinocyte_suprabasal"])
    with pytest.raises(InputError, match="cell_types"):
        procedural_cell_tiles(1, cell_types=["neuron"])


def test_demo_tiles_match_segmented_nuclei_to_the_planted_cells(tmp_path):
    """A slide made of procedural tiles, with a truth table at the drawn nuclei: the types come back."""
    # drawn at 0.75 µm/px: the look table's immune nuclei (2.4 × 2.1 µm) span enough pixels for the segmenter
    drawn = procedural_cell_tiles(4, tile_px=128, seed=1, nuclei_per_tile=12, um_per_px=0.75)
    slide = np.full((256, 256, 3), 255, np.uint8)
    rows = []
    for index, tile in enumerate(drawn):
        y0, x0 = 128 * (index // 2), 128 * (index % 2)
        slide[y0 : y0 + 128, x0 : x0 + 128] = tile.he_rgb
        centres_rc = ndi.center_of_mass(np.ones_like(tile.nuclei), tile.nuclei, np.arange(1, tile.n_nuclei + 1))
        for (r, c), kind in zip(centres_rc, tile.cell_types):
            rows.append({"cell_id": f"c{len(rows)}", "cell_type": kind, "he_x_px": x0 + c, "he_y_px": y0 + r})
    (tmp_path / "he").mkdir()
    # 1 µm/px so that the small drawn nuclei pass the 8 µm² debris filter
    write_pyramidal_ome_tiff(
        tmp_path / HE_NAME,
        slide.shape[:2],
        1.0,
        lambda level, shape: tiles_from_array(slide, 128),
        quality=95,
        tile_px=128,
    )
    pd.DataFrame(rows).to_parquet(tmp_path / TRUTH_NAME)

    tiles = demo_cell_tiles(tmp_path, n_tiles=4, tile_px=128, seed=0, max_match_um=3.0)
    assert len(tiles) == 4 and {t.origin_px for t in tiles} == {(0, 0), (128, 0), (0, 128), (128, 128)}
    truth = {(round(r["he_x_px"]), round(r["he_y_px"])): r["cell_type"] for r in rows}
    agree = total = 0
    for tile in tiles:
        centres_rc = ndi.center_of_mass(np.ones_like(tile.nuclei), tile.nuclei, np.arange(1, tile.n_nuclei + 1))
        for (r, c), kind in zip(centres_rc, tile.cell_types):
            if kind == UNASSIGNED:
                continue
            x, y = tile.origin_px[0] + c, tile.origin_px[1] + r
            nearest = min(truth, key=lambda xy: (xy[0] - x) ** 2 + (xy[1] - y) ** 2)
            agree += truth[nearest] == kind
            total += 1
    assert total >= 0.7 * len(rows)  # most drawn nuclei are found and matched
    assert agree == total


def test_demo_tiles_need_the_ground_truth_table(tmp_path):
    with pytest.raises(InputError, match=TRUTH_NAME):
        demo_cell_tiles(tmp_path, 2)
    with pytest.raises(InputError, match="n_tiles"):
        demo_cell_tiles(tmp_path, 0)
