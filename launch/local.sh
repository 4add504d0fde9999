#!/usr/bin/env bash
# Pretraining on this machine: all local accelerators, or N simulated devices on a CPU.
#
#   launch/local.sh PRESET WORKDIR [--cpu-devices N] [--dry-run] [--config.x.y=... ...]
#
#   launch/local.sh tiny runs/tiny
#   launch/local.sh tiny runs/tiny8 --cpu-devices 8 --config.mesh.data=4 --config.mesh.fsdp=2
#
# Several processes on one machine: launch/multiprocess_cpu.sh. Clusters: launch/tpu_vm.sh,
# launch/slurm_gpu.sbatch, launch/gke_xpk.sh (see launch/README.md). Every launcher ends in the
# same `brainlm-pretrain` command.

set -euo pipefail
here=$(dirname "$0"); . "$here/_common.sh"; min_args 2 "$0" "$@"
preset=$1; workdir=$2; shift 2
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-devices) cpu_devices "$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) overrides+=("$1"); shift ;;
  esac
done
cd "$here/.."
pretrain_cmd "$preset" "$workdir" ${overrides[@]+"${overrides[@]}"}
if [ "${DRY_RUN:-0}" = 1 ]; then echo "XLA_FLAGS=${XLA_FLAGS:-} JAX_PLATFORMS=${JAX_PLATFORMS:-}"; fi
run_or_print "${PRETRAIN_CMD[@]}"
