"""Helpers several test folders share (import as ``from tests.support import ...``; fixtures live in conftest.py)."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
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


class FlakyServer(http.server.ThreadingHTTPServer):
    """Serves files of one folder; the first ``failures`` GETs of each path send half the file and hang up."""

    def __init__(self, folder: Path, failures: int):
        self.folder, self.failures, self.seen = folder, failures, {}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(handler):  # noqa: N805
                data = (self.folder / handler.path.lstrip("/")).read_bytes()
                count = self.seen[handler.path] = self.seen.get(handler.path, 0) + 1
                handler.send_response(200)
                handler.send_header("Content-Length", str(len(data)))
                handler.end_headers()
                handler.wfile.write(data[: len(data) // 2] if count <= self.failures else data)

            def log_message(handler, *args):  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def serve_flaky(folder: Path, failures: int) -> tuple[FlakyServer, str]:
    """A FlakyServer on 127.0.0.1 in a thread, and its base URL; call .shutdown() when done."""
    server = FlakyServer(folder, failures)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def end_process_group() -> None:
    """Destroy this process's torch.distributed group and DeepSpeed's cached copies of it.

    DeepSpeed caches the world/data-parallel groups it derives (``deepspeed.utils.groups``); after
    ``destroy_process_group`` those point at a dead group, and the next in-process engine fails with
    "Group ... is not registered". Tests that start and end groups in one process call this instead.
    """
    import torch.distributed as dist
    from deepspeed.utils import groups

    if dist.is_initialized():
        dist.destroy_process_group()
    for name in (
        "_WORLD_GROUP",
        "_ZERO_PARAM_INTRA_PARALLEL_GROUP",
        "_TENSOR_MODEL_PARALLEL_GROUP",
        "_MODEL_PARALLEL_GROUP",
        "_DATA_PARALLEL_GROUP",
    ):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in (
        "_EXPERT_PARALLEL_GROUP",
        "_EXPERT_PARALLEL_GROUP_RANKS",
        "_EXPERT_DATA_PARALLEL_GROUP",
        "_EXPERT_DATA_PARALLEL_GROUP_RANKS",
        "_ALL_TO_ALL_GROUP",
    ):
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()
