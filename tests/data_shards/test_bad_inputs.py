"""Stage 1 bad inputs: one InputError naming the file and what was expected, and nothing written.

Damaged bundle files (truncated Parquet / HDF5, a damaged page inside a Parquet file), an output
folder under a file, and a bad second slide, whose error must come before the build writes its
config copy, vocabulary or technology mean. The command-line tool prints such an error as one
line with exit code 2.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from common.errors import InputError
from data_shards import pipeline, stages
from data_shards.register import register_bundle
from data_shards.synthetic import make_bundle
from data_shards.xenium import read_xenium
from tests.support import run_launch


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad_inputs") / "slide"
    make_bundle(out, "procedural", n_cells=300, seed=5, deformation_um=0.0, n_keypoints=30)
    return out


def _copy(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest)
    return dest


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _damage_pages(path: Path) -> None:
    """Zero every byte between Parquet's leading magic and its footer: the footer opens, no page reads."""
    data = bytearray(path.read_bytes())
    footer_bytes = int.from_bytes(data[-8:-4], "little")  # layout: PAR1 pages footer len(footer) PAR1
    end = len(data) - 8 - footer_bytes
    data[4:end] = bytes(end - 4)
    path.write_bytes(bytes(data))


def _config(out_dir: Path, *slides: tuple[str, Path], **overrides) -> OmegaConf:
    cfg = {
        "out_dir": str(out_dir),
        "slides": [{"id": slide_id, "bundle": str(path)} for slide_id, path in slides],
        "register": {"n_regions": 1},
        "shards": {"samples_per_shard": 400},
        "progress": False,
    }
    return OmegaConf.merge(OmegaConf.create(cfg), OmegaConf.create(overrides))


DAMAGED = {
    "truncated cells.parquet": ("cells.parquet", _truncate, {}, "a readable Parquet file"),
    "damaged page in cells.parquet": ("cells.parquet", _damage_pages, {}, "a readable Parquet file"),
    "truncated transcripts.parquet": (
        "transcripts.parquet",
        _truncate,
        {"matrix": "transcripts"},
        "a readable Parquet file",
    ),
    "damaged page in transcripts.parquet": (
        "transcripts.parquet",
        _damage_pages,
        {"matrix": "transcripts"},
        "a readable Parquet file",
    ),
    "truncated cell_feature_matrix.h5": ("cell_feature_matrix.h5", _truncate, {}, "a readable 10x HDF5 v3 matrix"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_file_is_one_error_naming_it(bundle, tmp_path, case):
    name, damage, kwargs, expected = DAMAGED[case]
    copy = _copy(bundle, tmp_path / "bundle")
    damage(copy / name)
    with pytest.raises(InputError) as caught:
        read_xenium(copy, **kwargs)
    message = str(caught.value)
    assert message.startswith(f"{copy / name}: expected {expected}, found a damaged or truncated file"), message
    assert "\n" not in message

    # make_shards: the same error, and no output folder at all
    out = tmp_path / "out"
    with pytest.raises(InputError, match=f"{name}: expected {expected}"):
        pipeline.build_shards(_config(out, ("s1", copy), **kwargs))
    assert not out.exists()


def test_register_reads_a_truncated_cells_table_as_one_error(bundle, tmp_path):
    # Registration reads the centroids for its overlay; it used to open cells.parquet with
    # pyarrow directly and fail with "Parquet magic bytes not found" and no file name.
    copy = _copy(bundle, tmp_path / "bundle")
    _truncate(copy / "cells.parquet")
    with pytest.raises(InputError, match="cells.parquet: expected a readable Parquet file"):
        register_bundle(copy, tmp_path / "registration", {"n_regions": 1})
    assert not (tmp_path / "registration" / "registration.json").exists()


def _as_xoa_cells_csv(copy: Path) -> None:
    """Replace cells.parquet with cells.csv.gz as XOA writes it: same columns, no row-number column."""
    cells = pd.read_parquet(copy / "cells.parquet")
    cells.to_csv(copy / "cells.csv.gz", index=False)
    (copy / "cells.parquet").unlink()


def test_csv_only_bundle_registers_like_the_parquet_one(bundle, tmp_path):
    copy = _copy(bundle, tmp_path / "bundle")
    _as_xoa_cells_csv(copy)
    csv_report = register_bundle(copy, tmp_path / "csv", {"n_regions": 1})
    parquet_report = register_bundle(bundle, tmp_path / "parquet", {"n_regions": 1})
    assert csv_report["overall"] == parquet_report["overall"]
    assert (tmp_path / "csv" / "registration_overlay.png").is_file()


def test_out_dir_under_a_file_is_one_error(bundle, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "shards"):
        with pytest.raises(InputError, match=f"a folder.*found a file at {blocker}$"):
            pipeline.build_shards(_config(out, ("s1", bundle)))
        with pytest.raises(InputError, match="bundle.out_dir.*found a file at"):
            stages.run_make_bundle(OmegaConf.create({"bundle": {"out_dir": str(out), "mode": "procedural"}}))
        with pytest.raises(InputError, match="out_dir.*found a file at"):
            stages.run_register(_config(out, ("s1", bundle)))
    assert blocker.read_text() == "not a folder"


def _scramble_keypoints(copy: Path) -> None:
    """Pair each Xenium keypoint with another one's H&E point: the fit's residuals are refused."""
    path = copy / "he" / "keypoints.csv"
    frame = pd.read_csv(path)
    moving = [c for c in frame.columns if c.startswith("alignment")]
    frame[moving] = frame[moving].iloc[::-1].to_numpy()
    frame.to_csv(path, index=False)


SECOND_SLIDE = {
    "truncated cells.parquet": (lambda b: _truncate(b / "cells.parquet"), "cells.parquet"),
    "truncated cell_feature_matrix.h5": (lambda b: _truncate(b / "cell_feature_matrix.h5"), "cell_feature_matrix.h5"),
    "no H&E slide": (lambda b: (b / "he" / "post_xenium_he.ome.tif").unlink(), "post_xenium_he.ome.tif"),
    "keypoints that do not fit": (_scramble_keypoints, "keypoints"),
}


@pytest.mark.parametrize("case", list(SECOND_SLIDE))
def test_bad_second_slide_writes_nothing(bundle, tmp_path, case):
    # Before, the config copy, vocab.tsv and tech_mean.npy were written (and, for an H&E or
    # registration problem, the whole first slide sharded) before the second slide failed.
    break_it, expected = SECOND_SLIDE[case]
    bad = _copy(bundle, tmp_path / "bad")
    break_it(bad)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=expected):
        pipeline.build_shards(_config(out, ("good", bundle), ("bad", bad)))
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))

    # the SLURM path: prepare checks every slide's files too (registrations are fitted by the array tasks)
    if case != "keypoints that do not fit":
        with pytest.raises(InputError, match=expected):
            pipeline.prepare(_config(out, ("good", bundle), ("bad", bad)))
        assert not out.exists()


def test_make_shards_prints_a_damaged_file_as_one_line(bundle, tmp_path):
    copy = _copy(bundle, tmp_path / "bundle")
    _truncate(copy / "cells.parquet")
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump(OmegaConf.to_container(_config(tmp_path / "out", ("s1", copy)))))
    result = run_launch("make_shards.py", "--config", str(config))
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-4000:]
    assert f"{copy / 'cells.parquet'}: expected a readable Parquet file" in errors[0]
    assert not (tmp_path / "out").exists()


def test_truncated_cells_csv_gz_is_one_error(bundle, tmp_path):
    copy = _copy(bundle, tmp_path / "bundle")
    _as_xoa_cells_csv(copy)
    _truncate(copy / "cells.csv.gz")
    with pytest.raises(InputError) as caught:
        read_xenium(copy)
    assert str(caught.value).startswith(f"{copy / 'cells.csv.gz'}: expected a readable gzip-compressed CSV file")
