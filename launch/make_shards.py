"""Build training shards from Xenium bundles.

    python launch/make_shards.py --config configs/data/demo.yaml [key=value ...]            # all slides + manifest
    python launch/make_shards.py register --config configs/data/demo.yaml                  # fit + report registrations
    python launch/make_shards.py prepare --config ...   # vocabulary + tech mean (before a SLURM array)
    python launch/make_shards.py --config ... only_slides=[S1] merge=false                  # one array task
    python launch/make_shards.py merge --config ...     # manifest.json from completed slides
    python launch/make_shards.py verify --config ...    # read every shard back with tar and webdataset
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_shards.config import load_config  # noqa: E402
from data_shards.logs import setup_logging  # noqa: E402
from data_shards.stages import run_make_shards  # noqa: E402


COMMANDS = ("build", "register", "prepare", "merge", "verify")


def main() -> None:
    argv = sys.argv[1:]
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "build"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    setup_logging()
    run_make_shards(command, load_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
