"""The fine-tuning tasks by name: what ``launch/finetune.py <task>`` runs and the schema its config is checked against.

Each task is a package of :mod:`finetune` exporting a run function (``run_<task>(cfg) -> results``)
and, where it has one, a typed config schema (a dataclass, see :mod:`common.config`).
:func:`run_task` loads the YAML file and the ``key=value`` overrides against that schema, so a
misspelled or mistyped setting is refused with one :class:`~common.errors.InputError` (naming
the key and the closest valid one) before anything is written; then it calls the run function,
which checks its config the same way (``apply_schema``) when called from a notebook or a test.

Only the chosen task's package is imported (each head pulls in its own heavy libraries).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import load_config
from common.errors import InputError


@dataclass(frozen=True)
class Task:
    """Where a task lives: ``package.<run>`` is its run function, ``package.<schema>`` its config schema."""

    package: str  # e.g. "finetune.genes"
    run: str  # name of the run function in the package
    schema: str | None  # name of the config dataclass in the package; None = the run function checks its config

    def load(self) -> tuple[Callable[[Any], Any], type | None]:
        module = importlib.import_module(self.package)
        schema = getattr(module, self.schema) if self.schema else None
        return getattr(module, self.run), schema


TASKS: dict[str, Task] = {
    "embed": Task("finetune.embed", "run_embed", "EmbedConfig"),
    "genes": Task("finetune.genes", "run_genes", "GenesConfig"),
    "survival": Task("finetune.survival", "run_survival", "SurvivalConfig"),
    "ihc": Task("finetune.ihc", "run_ihc", "IHCConfig"),
    "mif": Task("finetune.mif", "run_mif", "MIFConfig"),
    "qupath": Task("finetune.qupath", "run_qupath", "QuPathConfig"),
}


def get_task(name: str) -> tuple[Callable[[Any], Any], type | None]:
    """(run function, schema) of the task ``name``; an unknown name is an InputError naming the closest one."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1, cutoff=0.5)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise InputError(None, "task", f"one of {', '.join(TASKS)}{hint}", repr(name))
    return TASKS[name].load()


def run_task(name: str, config: str | Path, overrides: Sequence[str] = ()) -> Any:
    """Load ``config`` + ``overrides`` against the task's schema, then run the task; its results."""
    run, schema = get_task(name)
    cfg = load_config(config, list(overrides), schema=schema)
    return run(cfg)


__all__ = ["Task", "TASKS", "get_task", "run_task"]
