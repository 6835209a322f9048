"""Write a simulated Xenium bundle with its post-Xenium H&E (the demo data, or a scale test slide).

    python launch/make_bundle.py --config configs/data/demo.yaml [bundle.seed=1 ...]

Settings: the ``bundle`` section of a data config (``data_shards.schema.BundleConfig``).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import run_entry  # noqa: E402
from common.config import load_config  # noqa: E402
from data_shards.schema import DataConfig  # noqa: E402
from data_shards.stages import run_make_bundle  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args()
    return run_entry(lambda: run_make_bundle(load_config(args.config, args.overrides, schema=DataConfig)))


if __name__ == "__main__":
    sys.exit(main())
