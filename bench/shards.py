"""Shard-writing speed: end-to-end cells/s per process on a procedural slide, and its time split.

    python bench/shards.py [--cells 100000] [--naive-cells 1500] [--out runs/bench/shards] [--record]

Builds (or reuses) a procedural bundle with ``--cells`` cells, registers it, shards it with one
process, and prints the time spent reading, registering, QC, tokenizing, finding neighbours,
reading + cropping the slide, JPEG encoding (with ``--encode-threads`` > 1: the time spent waiting
for the encoding threads), assembling samples, handing them to the shard writer
("spill": rendering tar members, and spilling them to disk when a slide exceeds
``shards.memory_budget_mb``) and writing shards, and the JPEG-encode ceiling (cells per second of
encoding alone).
Then times the naive crop route (one slide read per cell) on ``--naive-cells`` cells so the gain
of the block route is visible. ``--record`` appends the figures to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.logs import setup_logging  # noqa: E402
from data_shards import pipeline  # noqa: E402
from data_shards.crops import CropReader  # noqa: E402
from data_shards.register import Registration  # noqa: E402
from data_shards.sample import encode_jpeg  # noqa: E402
from data_shards.slide import Slide  # noqa: E402
from data_shards.stages import run_register  # noqa: E402
from data_shards.synthetic import make_bundle  # noqa: E402
from data_shards.xenium import read_xenium  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def ensure_bundle(path: Path, n_cells: int) -> float:
    truth = path / "ground_truth.json"
    if truth.is_file() and json.loads(truth.read_text())["n_cells"] == n_cells:
        return 0.0
    started = time.perf_counter()
    make_bundle(path, "procedural", n_cells=n_cells, seed=0, deformation_um=0.0)
    return time.perf_counter() - started


def encode_ceiling(bundle: Path, registration: Path, n: int) -> float:
    """Cells/s of JPEG encoding alone in one thread, on ``n`` real crops of the slide (read first, then timed)."""
    adata = read_xenium(bundle)
    centres = Registration.from_json(registration).map(adata.obsm["spatial"])
    pick = np.sort(np.random.default_rng(1).choice(len(centres), size=min(n, len(centres)), replace=False))
    with Slide(bundle / "he" / "post_xenium_he.ome.tif") as slide:
        crops = [np.array(crop) for _, crop in CropReader(slide).iter_crops(centres[pick])]
    started = time.perf_counter()
    for crop in crops:
        encode_jpeg(crop, 90)
    return len(crops) / (time.perf_counter() - started)


def naive_rate(bundle: Path, registration: Path, n: int) -> float:
    adata = read_xenium(bundle)
    centres = Registration.from_json(registration).map(adata.obsm["spatial"])
    pick = np.random.default_rng(0).choice(len(centres), size=min(n, len(centres)), replace=False)
    with Slide(bundle / "he" / "post_xenium_he.ome.tif") as slide:
        reader = CropReader(slide)
        started = time.perf_counter()
        for _, crop in reader.iter_crops(centres[pick], route="naive"):
            encode_jpeg(crop, 90)
        return len(pick) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--naive-cells", type=int, default=1500)
    parser.add_argument("--out", default="runs/bench/shards")
    parser.add_argument("--encode-threads", type=int, default=None, help="shards.encode_threads (default: cores)")
    parser.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = parser.parse_args()
    setup_logging("WARNING")
    out = Path(args.out)
    bundle = out / f"bundle_{args.cells}"
    bundle_s = ensure_bundle(bundle, args.cells)

    cfg = OmegaConf.create(
        {
            "out_dir": str(out / "shards"),
            "slides": [
                {"id": "bench", "bundle": str(bundle), "registration": str(out / "registration" / "registration.json")}
            ],
            "register": {"n_regions": 1},
            "shards": {"samples_per_shard": 5000, "encode_threads": args.encode_threads},
            "progress": False,
        }
    )
    run_register(cfg)
    for old in (out / "shards").glob("bench/slide_manifest.json"):
        old.unlink()  # force a fresh run
    started = time.perf_counter()
    manifest = pipeline.build_shards(cfg)
    wall = time.perf_counter() - started
    info = manifest["slides"]["bench"]
    timings = info["timings_s"]
    n = info["n_samples"]
    slide_s = sum(timings.values())
    threads = pipeline.encode_threads(cfg)
    ceiling = encode_ceiling(bundle, out / "registration" / "registration.json", 5000)  # one thread, same run
    naive = naive_rate(bundle, out / "registration" / "registration.json", args.naive_cells)

    lines = [
        f"cells sharded: {n:,} (procedural slide, {args.cells:,} cells; bundle made in {bundle_s:.0f} s)"
        if bundle_s
        else f"cells sharded: {n:,} (procedural slide, {args.cells:,} cells)",
        f"end to end, one process ({threads} JPEG thread(s)): {n / slide_s:,.0f} cells/s ({slide_s:.1f} s for the slide; {wall:.1f} s with vocabulary/tech-mean preparation)",
        f"JPEG-encode ceiling (one thread encoding 5,000 crops of this slide, same run): {ceiling:,.0f} cells/s; "
        f"end to end is {100 * n / slide_s / ceiling:.0f} % of it",
        f"naive route (one slide read per cell + JPEG encode): {naive:,.0f} cells/s",
        "time split (s): " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()),
        "per cell (ms): " + ", ".join(f"{k} {1000 * v / n:.3f}" for k, v in timings.items()),
    ]
    for line in lines:
        print(line)
    if args.record:
        stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        machine = f"{os.cpu_count()} cores, {cpu_name()}"
        with open(Path(__file__).with_name("RESULTS.md"), "a", encoding="utf-8") as handle:
            handle.write(f"\n### bench/shards.py — {stamp} — {machine}\n\n")
            handle.write("\n".join(f"- {line}" for line in lines) + "\n")


if __name__ == "__main__":
    main()
