#!/usr/bin/env bash
# One process of a multi-host run (a TPU pod slice or several GPU hosts): run this same
# command on every host. JAX connects the processes (jax.distributed); on Cloud TPU the
# coordinator is found automatically, elsewhere set COORDINATOR (host:port of process 0),
# NUM_PROCESSES and PROCESS_ID.
# Usage: launch/multihost.sh GIN_FILE WORKDIR [extra gin flags...]
set -euo pipefail
GIN=${1:?usage: launch/multihost.sh GIN_FILE WORKDIR [gin flags]}; WORKDIR=${2:?}; shift 2
DIST=()
if [[ -n "${COORDINATOR:-}" ]]; then
  DIST=(--coordinator_address="$COORDINATOR" --num_processes="${NUM_PROCESSES:?}"
        --process_id="${PROCESS_ID:?}")
fi
exec python -m score_jax.main --distributed "${DIST[@]}" --gin_file="$GIN" \
  --gin.WORKDIR="'$WORKDIR'" "$@"
