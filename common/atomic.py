"""Write-then-rename helpers: a crash never leaves a half-written file or folder in place.

Readers only ever see complete outputs because the final name appears in a single
``os.replace`` on the same filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# Read once at import: os.umask can only be read by setting it, which is not thread-safe.
_UMASK = _read_umask()


def _default_mode(is_dir: bool) -> int:
    # mkstemp/mkdtemp create private (0600/0700) entries; outputs should get the usual umask mode
    # so that other users of a shared cluster filesystem can read them.
    return (0o777 if is_dir else 0o666) & ~_UMASK


def _temporary_sibling(final: Path, is_dir: bool) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    # Leading dot and ".partial" so globbing readers (e.g. "*.tar") never pick it up.
    prefix = f".{final.name}."
    if is_dir:
        path = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".partial", dir=final.parent)
        os.close(fd)
        path = Path(name)
    os.chmod(path, _default_mode(is_dir))
    return path


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary file path next to ``final``; rename it to ``final`` on success."""
    final = Path(final)
    tmp = _temporary_sibling(final, is_dir=False)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to ``final``; swap it in as ``final`` on success."""
    final = Path(final)
    tmp = _temporary_sibling(final, is_dir=True)
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} exists and overwrite=False")
            old = final.with_name(f".{final.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (indented, UTF-8, NaN rejected so files stay standard JSON)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=False, default=_json_default) + "\n", encoding="utf-8")
    return path


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_png(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG atomically (tight layout) and close it, so long runs do not leak figures."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path
