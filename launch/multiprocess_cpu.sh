#!/usr/bin/env bash
# N processes x M CPU devices on this machine, joined by jax.distributed on localhost: the
# multi-host code path (per-host data, collectives, collective Orbax checkpoints) without a
# cluster. Process i logs to WORKDIR/logs/process_i.log; process 0's log is also printed.
#
#   launch/multiprocess_cpu.sh NUM_PROCESSES DEVICES_PER_PROCESS PRESET WORKDIR
#       [--port PORT] [--dry-run] [--config.x.y=... ...]
#
#   launch/multiprocess_cpu.sh 2 4 tiny runs/tiny_2x4 --config.train.num_steps=50

set -euo pipefail
here=$(dirname "$0"); . "$here/_common.sh"; min_args 4 "$0" "$@"
nproc=$1; ndev=$2; preset=$3; workdir=$4; shift 4
port=${JAX_COORDINATOR_PORT:-12355}; overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) overrides+=("$1"); shift ;;
  esac
done
case "$nproc$ndev" in *[!0-9]*|'') echo "error: NUM_PROCESSES and DEVICES_PER_PROCESS must be positive integers" >&2; exit 2 ;; esac
cd "$here/.."
cpu_devices "$ndev"
pids=()
[ "${DRY_RUN:-0}" = 1 ] || mkdir -p "$workdir/logs"
for ((i = 0; i < nproc; i++)); do
  pretrain_cmd "$preset" "$workdir" --coordinator_address="localhost:${port}" \
    --num_processes="$nproc" --process_id="$i" ${overrides[@]+"${overrides[@]}"}
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "+ JAX_PLATFORMS=cpu XLA_FLAGS='${XLA_FLAGS}' $(quoted "${PRETRAIN_CMD[@]}") > $workdir/logs/process_$i.log 2>&1 &"
  else
    "${PRETRAIN_CMD[@]}" > "$workdir/logs/process_$i.log" 2>&1 &
    pids+=($!)
  fi
done
[ "${DRY_RUN:-0}" = 1 ] && exit 0
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
tail -n +1 -f "$workdir/logs/process_0.log" --pid "${pids[0]}" &
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then echo "process $i failed: see $workdir/logs/process_$i.log" >&2; status=1; fi
done
exit $status
