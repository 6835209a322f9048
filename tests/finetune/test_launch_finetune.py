"""`launch/finetune.py <task>`: settings are checked against the task's schema before anything runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.config import load_config
from common.errors import InputError
from finetune.tasks import TASKS, get_task, run_task

REPO = Path(__file__).resolve().parents[2]


def _launch(*args: str) -> subprocess.CompletedProcess:
    """``python launch/finetune.py ...`` from the repository root, as a user runs it."""
    return subprocess.run([sys.executable, "launch/finetune.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("task, misspelled, suggestion", [
    ("genes", "finetune.lr_bakbone=1e-4", "finetune.lr_backbone"),
    ("survival", "cohort.base_cells.manifst=x.json", "cohort.base_cells.manifest"),
    ("embed", "tiles.size_pix=256", "tiles.size_px"),
])
def test_a_misspelled_key_exits_2_with_one_line_before_writing_anything(tmp_path, task, misspelled, suggestion):
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    result = _launch(task, "--config", f"configs/finetune/{task}_demo.yaml", f"run_dir={run_dir}",
                     f"out_dir={out_dir}", misspelled)
    assert result.returncode == 2, result.stderr
    key = misspelled.split("=")[0]
    assert key in result.stderr and f"did you mean `{suggestion}`" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not out_dir.exists() and not run_dir.exists()


@pytest.mark.parametrize("task, misspelled, suggestion", [
    ("ihc", "gan.n_layer=2", "gan.n_layers"),
    ("mif", "train.warmup_step=10", "train.warmup_steps"),
])
def test_run_task_checks_the_other_heads_against_their_schemas(tmp_path, task, misspelled, suggestion):
    # The same route as the entry point, in process (each subprocess pays for importing its head).
    out_dir = tmp_path / "out"
    with pytest.raises(InputError, match=f"did you mean `{suggestion}`") as error:
        run_task(task, REPO / f"configs/finetune/{task}_demo.yaml", [f"run_dir={tmp_path / 'run'}",
                                                                      f"out_dir={out_dir}", misspelled])
    assert misspelled.split("=")[0] in str(error.value)
    assert not out_dir.exists() and not (tmp_path / "run").exists()


def test_an_unknown_task_exits_2_naming_the_closest_one(tmp_path):
    result = _launch("gens", "--config", "configs/finetune/genes_demo.yaml", f"out_dir={tmp_path / 'out'}")
    assert result.returncode == 2, result.stderr
    assert "gens" in result.stderr and "did you mean `genes`" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_the_demo_configs_match_their_schemas(task):
    _, schema = get_task(task)
    cfg = load_config(REPO / f"configs/finetune/{task}_demo.yaml", [f"run_dir=/tmp/somewhere/{task}"], schema=schema)
    assert cfg.out_dir.startswith(f"/tmp/somewhere/{task}/")  # interpolations resolved, every default filled in


def test_get_task_refuses_an_unknown_name():
    assert {"embed", "genes", "survival", "ihc", "mif"} <= set(TASKS)
    with pytest.raises(InputError, match="did you mean `survival`"):
        get_task("survial")
