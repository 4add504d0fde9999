#!/usr/bin/env bash
# Pretraining on this machine: all local accelerators, or N simulated devices on a CPU.
#
#   launch/local.sh PRESET WORKDIR [--cpu-devices N] [--dry-run] [--config.x.y=... ...]
#
#   launch/local.sh tiny runs/tiny
#   launch/local.sh tiny runs/tiny8 --cpu-devices 8 --config.mesh.data=4 --config.mesh.fsdp=2
#
# Multi-host launchers (TPU VM pods, SLURM GPU clusters) come with the scale-out work; every
# launcher ends in the same `brainlm-pretrain` command.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; fi
preset=$1; workdir=$2; shift 2
dry_run=0; overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-devices) export JAX_PLATFORMS=cpu
                   export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    *) overrides+=("$1"); shift ;;
  esac
done
cd "$(dirname "$0")/.."
cmd=(brainlm-pretrain --config "configs/pretrain.py:${preset}" --workdir "$workdir" "${overrides[@]}")
if [ "$dry_run" = 1 ]; then
  echo "XLA_FLAGS=${XLA_FLAGS:-} JAX_PLATFORMS=${JAX_PLATFORMS:-}"; printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
