"""What every entry script under ``launch/`` shares: logging, and bad input reported in one line.

A user who mistypes a setting or points at a wrong file should read one line naming the file,
the key and what was expected, not a 20-line traceback; the exit code is 2 (usage error) so
job schedulers and ``make`` stop.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from .errors import InputError
from .logs import setup_logging

USAGE_ERROR = 2


def run_entry(main: Callable[[], object]) -> int:
    """Call ``main()`` with logging set up; an InputError becomes one line on stderr and exit code 2."""
    setup_logging(os.environ.get("LOG_LEVEL", "INFO"))
    try:
        result = main()
    except InputError as exc:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}error: {exc}", file=sys.stderr)
        if os.environ.get("TRACEBACK"):
            raise
        return USAGE_ERROR
    return result if isinstance(result, int) else 0
