"""launch/slurm/pretrain.sbatch run by bash with stand-in `srun`, `scontrol` and `deepspeed`
(shell scripts on PATH that record their arguments and environment): CPUs reach srun, no empty
argument reaches the config loader, current NCCL variables are set, and SIGUSR1 requeues the job.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "launch" / "slurm" / "pretrain.sbatch"

SRUN = """#!/bin/bash
# stand-in srun: record options and environment, then run the command as node 0 would
printf '%s\\n' "$@" > "$RECORD/srun.args"
echo "SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-}" > "$RECORD/srun.env"
while [[ "$1" == --* ]]; do shift; done
SLURM_NODEID=0 exec "$@"
"""
SCONTROL = """#!/bin/bash
echo "$*" >> "$RECORD/scontrol.calls"
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu-a\\ngpu-b\\n'; fi
"""
DEEPSPEED = """#!/bin/bash
# stand-in deepspeed launcher: one argument per NUL-terminated record
printf '%s\\0' "$@" > "$RECORD/deepspeed.args"
echo "TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-}" > "$RECORD/deepspeed.env"
sleep "${FAKE_TRAIN_S:-0}"
"""


def _stand_ins(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("deepspeed", DEEPSPEED)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "record"
    record.mkdir()
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "RECORD": str(record),
        "DEEPSPEED": str(bin_dir / "deepspeed"),
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_JOB_NODELIST": "gpu-[a-b]",
        "SLURM_JOB_ID": "4242",
        "SLURM_CPUS_PER_TASK": "96",
        "HOME": str(tmp_path),
    }
    return {"env": env, "record": record}


def _run(tmp_path: Path, *args: str) -> tuple[list[str], list[str], dict]:
    setup = _stand_ins(tmp_path)
    subprocess.run(["bash", str(SBATCH), *args], env=setup["env"], cwd=tmp_path, check=True, timeout=60)
    record = setup["record"]
    srun = (record / "srun.args").read_text().splitlines()
    deepspeed = (record / "deepspeed.args").read_bytes().split(b"\0")[:-1]
    env = dict(
        line.split("=", 1) for f in ("srun.env", "deepspeed.env") for line in (record / f).read_text().splitlines()
    )
    return srun, [a.decode() for a in deepspeed], env


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_sbatch_passes_cpus_to_srun_and_no_empty_argument_without_overrides(tmp_path):
    srun, deepspeed, env = _run(tmp_path, "configs/pretrain/vitl_throughput.yaml")
    assert "--cpus-per-task=96" in srun and env["SRUN_CPUS_PER_TASK"] == "96"
    assert "" not in deepspeed, deepspeed  # an empty '' argument is refused by the config loader
    assert deepspeed[-3:] == ["--config", "configs/pretrain/vitl_throughput.yaml", "resume=latest"]
    assert deepspeed[:2] == ["--node_rank", "0"] and "--no_ssh" in deepspeed
    assert deepspeed[deepspeed.index("--master_addr") + 1] == "gpu-a"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert (tmp_path / "runs" / "slurm" / "hostfile.4242").read_text() == "gpu-a slots=8\ngpu-b slots=8\n"


def test_sbatch_passes_overrides_as_separate_intact_arguments(tmp_path):
    overrides = ["data.manifest=/data/my shards/manifest.json", "out_dir=runs/x", "train.lr=3e-4"]
    _, deepspeed, _ = _run(tmp_path, "configs/pretrain/vitl_throughput.yaml", *overrides)
    assert deepspeed[-4:] == ["resume=latest", *overrides]


def test_sigusr1_requeues_the_job(tmp_path):
    setup = _stand_ins(tmp_path)
    env = {**setup["env"], "FAKE_TRAIN_S": "3"}
    proc = subprocess.Popen(["bash", str(SBATCH), "configs/pretrain/vitl_throughput.yaml"], env=env, cwd=tmp_path)
    deadline = time.monotonic() + 30
    while not (setup["record"] / "deepspeed.args").is_file():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends before the time limit / preemption
    assert proc.wait(timeout=30) == 0  # the script outlives the signal and waits for srun
    calls = (setup["record"] / "scontrol.calls").read_text().splitlines()
    assert "requeue 4242" in calls
    # Control: without the signal, no requeue.
    control = tmp_path / "control"
    control.mkdir()
    _, _, _ = _run(control, "configs/pretrain/vitl_throughput.yaml")
    assert not any("requeue" in c for c in (control / "record" / "scontrol.calls").read_text().splitlines())
