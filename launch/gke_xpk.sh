#!/usr/bin/env bash
# GKE with XPK (TPU slices or GPU node pools): creates a workload whose every pod runs the same
# command; JAX reads the JobSet/TPU environment (--distributed=on). The image must hold this
# repository installed (`pip install -e .[tpu]` or `.[gpu]`); WORKDIR is shared storage (e.g. a gcsfuse mount).
#
#   launch/gke_xpk.sh CLUSTER WORKLOAD PRESET WORKDIR --device-type TYPE --docker-image IMAGE
#       [--num-slices N] [--project P] [--zone Z] [--no-preflight] [--dry-run] [--config.x.y=...]
#
#   launch/gke_xpk.sh my-cluster brainlm-650m 650m gs://my-bucket/runs/650m \
#       --device-type v5p-128 --docker-image gcr.io/my-proj/brainlm:latest \
#       --config.data.path=/mnt/bucket/a424
#
# Preflight (TPU device types): the step is compiled here for --num-slices x --device-type
# before the workload is created, which is refused, naming a batch that fits, when it would not
# fit (needs `pip install -e .[tpu]` here; --no-preflight skips it).

set -euo pipefail
here=$(dirname "$0"); . "$here/_common.sh"; min_args 4 "$0" "$@"
cluster=$1; workload=$2; preset=$3; workdir=$4; shift 4
device=""; image=""; slices=1; extra=(); overrides=(); check=1
while [ $# -gt 0 ]; do
  case "$1" in
    --device-type) device=$2; shift 2 ;;
    --docker-image) image=$2; shift 2 ;;
    --num-slices) slices=$2; shift 2 ;;
    --project|--zone) extra+=("$1" "$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --no-preflight) check=0; shift ;;
    *) overrides+=("$1"); shift ;;
  esac
done
if [ -z "$device" ] || [ -z "$image" ]; then
  echo "error: --device-type (e.g. v5p-128, h100-80gb-8) and --docker-image are required" >&2; exit 2
fi
pretrain_cmd "$preset" "$workdir" --distributed=on ${overrides[@]+"${overrides[@]}"}
if [ "$check" = 1 ] && [[ $device =~ ^v[0-9] ]]; then
  preflight "$preset" "$device" "$slices" ${overrides[@]+"${overrides[@]}"}
fi
run_or_print xpk workload create --cluster "$cluster" --workload "$workload" \
  --device-type "$device" --num-slices "$slices" --docker-image "$image" \
  ${extra[@]+"${extra[@]}"} --command "cd /app && $(quoted "${PRETRAIN_CMD[@]}")"
