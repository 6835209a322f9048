#!/bin/bash
# prepare -> one array task per slide -> merge, chained with SLURM dependencies.
#   launch/slurm/submit_make_shards.sh configs/data/my_cohort.yaml [key=value ...]
set -euo pipefail
CONFIG=$1; shift
PY=${PY:-.venv/bin/python}
mkdir -p logs
N=$($PY -c "from omegaconf import OmegaConf; print(len(OmegaConf.load('$CONFIG').slides))")
$PY launch/make_shards.py prepare --config "$CONFIG" "$@"
ARRAY=$(CONFIG=$CONFIG sbatch --parsable --array=0-$((N - 1)) --export=ALL,CONFIG="$CONFIG" launch/slurm/make_shards.sbatch "$@")
sbatch --dependency=afterok:"$ARRAY" --job-name=merge_shards --output=logs/merge_shards_%j.out \
  --wrap "$PY launch/make_shards.py merge --config $CONFIG $*"
echo "submitted array $ARRAY ($N slides) and its merge"
