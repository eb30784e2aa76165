#!/usr/bin/env bash
# SCoRe Stage I then Stage II on one GPU host (all local GPUs in one mesh).
# Usage: launch/gpu_host.sh WORKDIR [extra gin flags...]
# Needs: pip install -e '.[test]' and a CUDA jaxlib (pip install 'jax[cuda12]').
set -euo pipefail
WORKDIR=${1:?usage: launch/gpu_host.sh WORKDIR [gin flags]}; shift
MODEL=${MODEL:-models/smollm2_135m.gin}
TASK=${TASK:-tasks/math.gin}
python -m score_jax.main --gin_file=stage1.gin --gin_file="$TASK" --gin_file="$MODEL" \
  --gin.WORKDIR="'$WORKDIR/stage1'" "$@"
python -m score_jax.main --gin_file=stage2.gin --gin_file="$TASK" --gin_file="$MODEL" \
  --gin.WORKDIR="'$WORKDIR/stage2'" --gin.STAGE1_WORKDIR="'$WORKDIR/stage1'" "$@"
python -m score_jax.main --gin_file=eval.gin --gin_file="$TASK" --gin_file="$MODEL" \
  --gin.WORKDIR="'$WORKDIR/eval'" --gin.MODEL_WORKDIR="'$WORKDIR/stage2'" "$@"
