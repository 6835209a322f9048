"""Build training shards from Xenium bundles.

    python launch/make_shards.py --config configs/data/demo.yaml [key=value ...]            # all slides + manifest
    python launch/make_shards.py register --config configs/data/demo.yaml                  # fit + report registrations
    python launch/make_shards.py prepare --config ...   # vocabulary + tech mean (before a SLURM array)
    python launch/make_shards.py --config ... only_slides=[S1] merge=false                  # one array task
    python launch/make_shards.py merge --config ...     # manifest.json from completed slides
    python launch/make_shards.py verify --config ...    # read every shard back with tar and webdataset
    python launch/make_shards.py spatialdata --config ...  # each slide as a SpatialData zarr (H&E, cells, counts)

Settings: a data config (``data_shards.schema.DataConfig``); unknown keys are refused.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import run_entry  # noqa: E402
from common.config import load_config  # noqa: E402
from data_shards.schema import DataConfig  # noqa: E402
from data_shards.stages import SHARD_COMMANDS, run_make_shards  # noqa: E402


def main() -> int:
    argv = sys.argv[1:]
    command = argv.pop(0) if argv and argv[0] in SHARD_COMMANDS else "build"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    return run_entry(lambda: run_make_shards(command, load_config(args.config, args.overrides, schema=DataConfig)))


if __name__ == "__main__":
    sys.exit(main())
