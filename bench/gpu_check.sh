#!/usr/bin/env bash
# One prepared check of the pretraining path on one GPU (H100/H200; under 8 minutes):
#   bash bench/gpu_check.sh            bf16 PAST ViT-L steps through DeepSpeed (world size 1, NCCL) for
#                                      vitl_throughput and past_vitl_8xa100 (samples/s, MFU, peak memory),
#                                      then checkpoint -> export -> plain timm load on the GPU;
#                                      figures appended to bench/RESULTS.md
#   bash bench/gpu_check.sh --smoke    the same path on the CPU with configs/pretrain/tiny_cpu.yaml
# Extra arguments go to bench/gpu_check.py (--steps, --micro-batch, --compile, --configs, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [[ " $* " == *" --smoke "* ]]; then
  export DS_ACCELERATOR=cpu GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
fi
exec "$PYTHON" bench/gpu_check.py "$@"
