"""The shared report writer: JSON without NaN, aligned tables, atomic metrics and figures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from finetune.report import Column, finite, format_table, number, save_figure, write_metrics


def test_finite_replaces_undefined_values_recursively():
    obj = {
        "a": float("nan"),
        "b": [1.0, float("inf"), (2, -float("inf"))],
        "c": {"d": np.float64("nan"), "e": 3},
        "f": "nan",
    }
    assert finite(obj) == {"a": None, "b": [1.0, None, [2, None]], "c": {"d": None, "e": 3}, "f": "nan"}
    assert finite(0.5) == 0.5 and finite(float("nan")) is None


def test_number_and_missing_cells():
    assert number(1.23456, ".2f") == "1.23"
    assert number(float("nan"), ".2f") == "–" and number(None, ".2f", missing="n/a") == "n/a"


def test_format_table_aligns_columns():
    rows = [
        {"name": "ours", "r": 0.512, "mae": float("nan"), "won": 3, "of": 10},
        {"name": "baseline", "r": 0.1, "mae": 12.25, "won": 7, "of": 10},
    ]
    columns = [
        Column("model", 10, "name", align="<"),
        Column("r", 7, "r", ".3f"),
        Column("MAE", 7, "mae", ".1f"),
        Column("won", 7, lambda r: f"{r['won']:>3}/{r['of']:<3}"),
    ]
    text = format_table(rows, columns, header="title", footer="note", sep=" ")
    assert text.splitlines() == [
        "title",
        "model            r     MAE     won",
        "ours         0.512       –   3/10 ",
        "baseline     0.100    12.2   7/10 ",
        "note",
    ]
    plain = format_table(rows[:1], columns[:3], missing=None)
    assert plain.splitlines()[1] == f"{'ours':<10}{0.512:>7.3f}{float('nan'):>7.1f}"


def test_write_metrics_is_standard_json(tmp_path):
    path = write_metrics(tmp_path / "metrics.json", {"psnr": float("nan"), "n": np.int64(3), "x": [1.5]})
    assert json.loads(path.read_text()) == {"psnr": None, "n": 3, "x": [1.5]}
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.json"]  # no temporary left behind


def test_save_figure_writes_a_png_and_closes_it(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, math.pi])
    path = save_figure(fig, tmp_path / "curve.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
