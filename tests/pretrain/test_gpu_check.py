"""bench/gpu_check.sh --smoke: the GPU check's whole path (train through DeepSpeed, checkpoint, export, plain
timm load) on the CPU with the tiny config; its figures appended to the results file it is given."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_smoke_trains_exports_loads_and_reports(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n", encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--smoke", "--steps", "3", "--micro-batch", "8"]
        + ["--work", str(tmp_path / "work"), "--results", str(results)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = results.read_text(encoding="utf-8")
    assert text.startswith("# results\n")  # appended, not overwritten
    assert "bench/gpu_check.sh --smoke" in text and "| tiny_cpu | 8 |" in text
    assert "strict `load_state_dict` on cpu: max |Δ features| 0 " in text  # fp32 on the CPU: identical
    assert (tmp_path / "work" / "export_tiny_cpu" / "image_encoder" / "model.safetensors").is_file()
    assert (tmp_path / "work" / "tiny_cpu" / "checkpoints").is_dir()
