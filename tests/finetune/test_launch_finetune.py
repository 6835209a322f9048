"""`launch/finetune.py <task>`: settings are checked against the task's schema before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_config
from common.errors import InputError
from finetune.tasks import TASKS, get_task, run_task
from tests.support import assert_refused, run_launch

REPO = Path(__file__).resolve().parents[2]


# A subprocess pays ~10 s importing torch/timm: in `make test`, not in `make test-fast`.
@pytest.mark.slow
@pytest.mark.parametrize(
    "task, misspelled, suggestion",
    [
        ("genes", "finetune.lr_bakbone=1e-4", "finetune.lr_backbone"),
        ("survival", "cohort.base_cells.manifst=x.json", "cohort.base_cells.manifest"),
        ("embed", "tiles.size_pix=256", "tiles.size_px"),
    ],
)
def test_a_misspelled_key_exits_2_with_one_line_before_writing_anything(tmp_path, task, misspelled, suggestion):
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    result = run_launch(
        "finetune.py",
        task,
        "--config",
        f"configs/finetune/{task}_demo.yaml",
        f"run_dir={run_dir}",
        f"out_dir={out_dir}",
        misspelled,
    )
    assert_refused(result, misspelled.split("=")[0], suggestion)
    assert not out_dir.exists() and not run_dir.exists()


@pytest.mark.parametrize(
    "task, misspelled, suggestion",
    [
        ("ihc", "gan.n_layer=2", "gan.n_layers"),
        ("mif", "train.warmup_step=10", "train.warmup_steps"),
    ],
)
def test_run_task_checks_the_other_heads_against_their_schemas(tmp_path, task, misspelled, suggestion):
    # The same route as the entry point, in process (each subprocess pays for importing its head).
    out_dir = tmp_path / "out"
    with pytest.raises(InputError, match=f"did you mean `{suggestion}`") as error:
        run_task(
            task,
            REPO / f"configs/finetune/{task}_demo.yaml",
            [f"run_dir={tmp_path / 'run'}", f"out_dir={out_dir}", misspelled],
        )
    assert misspelled.split("=")[0] in str(error.value)
    assert not out_dir.exists() and not (tmp_path / "run").exists()


def test_an_unknown_task_exits_2_naming_the_closest_one(tmp_path):
    result = run_launch(
        "finetune.py", "gens", "--config", "configs/finetune/genes_demo.yaml", f"out_dir={tmp_path / 'out'}"
    )
    assert_refused(result, "gens", "genes")
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
