"""Pretrain PAST with DeepSpeed (one process per device; the launcher starts them).

    deepspeed launch/pretrain.py --config configs/pretrain/tiny_cpu.yaml [key=value ...]         # this machine
    deepspeed --num_gpus 2 launch/pretrain.py --config configs/pretrain/tiny_cpu.yaml           # 2 CPU ranks (gloo)
    deepspeed --hostfile launch/hostfile.example launch/pretrain.py --config configs/pretrain/past_vitl_8xa100.yaml
    sbatch launch/slurm/pretrain.sbatch configs/pretrain/vitl_throughput.yaml [key=value ...]  # SLURM cluster

Overrides are OmegaConf dot-lists, e.g. ``resume=latest train.max_steps=100 out_dir=runs/x``; the
settings are ``pretrain.config.PretrainConfig`` (unknown keys are refused before anything starts).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import run_entry  # noqa: E402
from pretrain.train import main as train_main  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/pretrain/<name>.yaml")
    parser.add_argument(
        "--local_rank", type=int, default=None, help="set by the deepspeed launcher (LOCAL_RANK is used)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args()
    return run_entry(lambda: train_main(args.config, args.overrides))


if __name__ == "__main__":
    sys.exit(main())
