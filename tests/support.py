"""Helpers several test folders share (import as ``from tests.support import ...``; fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_launch(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python launch/<script> ...`` from the repository root, as a user runs it (CPU accelerator)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    env.pop("TRACEBACK", None)
    return subprocess.run(
        [sys.executable, f"launch/{script}", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def assert_refused(result: subprocess.CompletedProcess, key: str, suggestion: str) -> None:
    """Exit code 2, the bad key and ``did you mean `suggestion` `` on stderr, and no traceback."""
    assert result.returncode == 2, result.stderr[-4000:]
    assert key in result.stderr and f"did you mean `{suggestion}`" in result.stderr, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]


def assert_subset(expected, loaded) -> None:
    """Every value ``expected`` (a plain YAML container) sets is in ``loaded``, unchanged."""
    if isinstance(expected, dict):
        for key, value in expected.items():
            assert_subset(value, loaded[key])
    elif isinstance(expected, list):
        assert len(expected) == len(loaded)
        for a, b in zip(expected, loaded):
            assert_subset(a, b)
    else:
        assert expected == loaded or (expected == "???" and loaded is None), (expected, loaded)
