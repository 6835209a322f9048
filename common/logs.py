"""Logging set-up shared by the entry scripts: one format, rank-aware."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | int = "INFO") -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
