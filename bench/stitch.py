"""Whole-slide inference overhead: overlapping tiles + sin² blending, with an identity model.

    python bench/stitch.py [--side-px 6144] [--tile-px 512] [--overlap-px 64] [--record]

The model is the identity, so the figures are what `finetune.stitch` itself costs (tile reads,
weighted accumulation, normalisation) in RAM and with memory-mapped accumulators, plus the
demo slide end to end to a pyramidal OME-TIFF when `make demo` has made it. A real head's
predictor adds its own time on top. ``--record`` appends the figures to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shards import cpu_name  # noqa: E402
from finetune.stitch import array_tile_reader, plan_tiles, predict_slide_to_ome_tiff, stitch_predict  # noqa: E402

DEMO_SLIDE = Path("runs/demo/bundle/he/post_xenium_he.ome.tif")


def identity(batch: np.ndarray) -> np.ndarray:
    """uint8 (B, tile, tile, 3) → float32 (B, tile, tile, 3)."""
    return batch.astype(np.float32)


def in_memory_rate(
    image: np.ndarray, tile_px: int, overlap_px: int, batch_size: int, memmap: bool
) -> tuple[float, float]:
    """(tiles/s, max abs error against the input) for one stitched pass over ``image``."""
    n_tiles = len(plan_tiles(image.shape[:2], tile_px, overlap_px))
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        out = stitch_predict(
            array_tile_reader(image),
            identity,
            image.shape[:2],
            3,
            tile_px,
            overlap_px,
            batch_size,
            progress=False,
            accumulator_dir=scratch,
            memmap_above_values=0 if memmap else 2**62,
        )
        seconds = time.perf_counter() - started
        error = float(np.abs(out - image).max())
        del out
    return n_tiles / seconds, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side-px", type=int, default=6144, help="side of the random in-memory image (px)")
    parser.add_argument("--tile-px", type=int, default=512)
    parser.add_argument("--overlap-px", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = parser.parse_args()

    image = np.random.default_rng(0).integers(0, 256, (args.side_px, args.side_px, 3), dtype=np.uint8)
    lines = []
    for memmap in (False, True):
        rate, error = in_memory_rate(image, args.tile_px, args.overlap_px, args.batch_size, memmap)
        where = "memory-mapped accumulators" if memmap else "accumulators in RAM"
        lines.append(
            f"{args.side_px}×{args.side_px} px random image, {args.tile_px} px tiles, {args.overlap_px} px "
            f"overlap, {where}: {rate:,.0f} tiles/s (identity model; max error {error:.1e})"
        )
    if DEMO_SLIDE.is_file():
        with tempfile.TemporaryDirectory() as scratch:
            summary = predict_slide_to_ome_tiff(
                DEMO_SLIDE,
                Path(scratch) / "out.ome.tif",
                identity,
                tile_px=args.tile_px,
                overlap_px=args.overlap_px,
                batch_size=args.batch_size,
                progress=False,
            )
        lines.append(
            f"demo slide {summary['shape_hw'][1]}×{summary['shape_hw'][0]} px → pyramidal OME-TIFF: "
            f"{summary['tiles_predicted']} tiles predicted, {summary['tiles_skipped']} skipped (no tissue), "
            f"{summary['seconds']:.1f} s end to end incl. tissue mask and JPEG pyramid"
        )
    else:
        lines.append(f"demo slide not found ({DEMO_SLIDE}; run make demo): end-to-end figure skipped")
    for line in lines:
        print(line)
    if args.record:
        stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        with open(Path(__file__).with_name("RESULTS.md"), "a", encoding="utf-8") as handle:
            handle.write(f"\n### bench/stitch.py — {stamp} — {os.cpu_count()} cores, {cpu_name()}\n\n")
            handle.write("\n".join(f"- {line}" for line in lines) + "\n")


if __name__ == "__main__":
    main()
