"""Downstream heads on exported PAST encoders.

    python launch/finetune.py embed    --config configs/finetune/embed_demo.yaml    [key=value ...]
    python launch/finetune.py genes    --config configs/finetune/genes_demo.yaml    [key=value ...]
    python launch/finetune.py survival --config configs/finetune/survival_demo.yaml [key=value ...]
    python launch/finetune.py ihc      --config configs/finetune/ihc_demo.yaml      [key=value ...]
    python launch/finetune.py mif      --config configs/finetune/mif_demo.yaml      [key=value ...]
    python launch/finetune.py qupath   --config configs/finetune/qupath_demo.yaml   [key=value ...]

Each task's settings are a typed schema (``finetune.tasks.TASKS``); unknown keys are refused.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import run_entry  # noqa: E402
from finetune.tasks import TASKS, run_task  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", help="one of " + ", ".join(TASKS))
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_intermixed_args()
    return run_entry(lambda: run_task(args.task, args.config, args.overrides))


if __name__ == "__main__":
    sys.exit(main())
