"""Downstream heads on exported PAST encoders.

    python launch/finetune.py embed    --config configs/finetune/embed_demo.yaml    [key=value ...]
    python launch/finetune.py genes    --config configs/finetune/genes_demo.yaml    [key=value ...]
    python launch/finetune.py survival --config configs/finetune/survival_demo.yaml [key=value ...]
    python launch/finetune.py ihc      --config configs/finetune/ihc_demo.yaml      [key=value ...]
    python launch/finetune.py mif      --config configs/finetune/mif_demo.yaml      [key=value ...]
"""
import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_shards.config import load_config  # noqa: E402
from data_shards.logs import setup_logging  # noqa: E402

TASKS = {"embed": ("finetune.embed", "run_embed"), "genes": ("finetune.genes", "run_genes"),
         "survival": ("finetune.survival", "run_survival"), "ihc": ("finetune.ihc", "run_ihc"),
         "mif": ("finetune.mif", "run_mif")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_intermixed_args()
    setup_logging()
    module, function = TASKS[args.task]
    getattr(importlib.import_module(module), function)(load_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
