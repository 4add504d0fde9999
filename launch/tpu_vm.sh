#!/usr/bin/env bash
# Cloud TPU VM or pod slice: runs the same command on every worker over `gcloud ... ssh
# --worker=all`; JAX finds the other workers itself (--distributed=on). WORKDIR must be storage
# every worker sees (a gs:// bucket, written directly, or a shared mount): Orbax writes each checkpoint collectively.
#
#   launch/tpu_vm.sh TPU_NAME ZONE PRESET WORKDIR [--topology TYPE] [--project P]
#       [--repo-dir DIR] [--setup] [--no-preflight] [--dry-run] [--config.x.y=... ...]
#
#   launch/tpu_vm.sh my-v5p-64 us-east5-a 650m gs://my-bucket/runs/650m --topology v5p-64 \
#       --config.data.path=/mnt/bucket/a424
#
# Preflight: before anything runs on the TPU, the step is compiled here for --topology (the
# slice's accelerator type; asked of gcloud when not given) and the launch stops, naming a batch
# that fits, when it would not fit (needs `pip install -e .[tpu]` here; --no-preflight skips it).
# --setup first creates .venv and runs `pip install -e .[tpu]` in --repo-dir on every worker
# (default ~/brainlm_jax; copy the repository there first, e.g. with `gcloud ... scp --worker=all`).

set -euo pipefail
here=$(dirname "$0"); . "$here/_common.sh"; min_args 4 "$0" "$@"
tpu=$1; zone=$2; preset=$3; workdir=$4; shift 4
project=(); repo_dir='~/brainlm_jax'; setup=0; overrides=(); topology=""; check=1
while [ $# -gt 0 ]; do
  case "$1" in
    --project) project=(--project "$2"); shift 2 ;;
    --repo-dir) repo_dir=$2; shift 2 ;;
    --setup) setup=1; shift ;;
    --topology) topology=$2; shift 2 ;;
    --no-preflight) check=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) overrides+=("$1"); shift ;;
  esac
done
pretrain_cmd "$preset" "$workdir" --distributed=on ${overrides[@]+"${overrides[@]}"}
if [ "$check" = 1 ]; then
  if [ -z "$topology" ]; then  # the slice's accelerator type, e.g. v5p-64
    describe=(gcloud compute tpus tpu-vm describe "$tpu" --zone "$zone"
              ${project[@]+"${project[@]}"} --format='value(acceleratorType)')
    if [ "${DRY_RUN:-0}" = 1 ]; then
      echo "+ $(quoted "${describe[@]}")"; topology='<its acceleratorType>'
    else
      topology=$("${describe[@]}")
    fi
  fi
  preflight "$preset" "$topology" 1 ${overrides[@]+"${overrides[@]}"}
fi
remote="cd ${repo_dir} && . .venv/bin/activate && "
if [ "$setup" = 1 ]; then
  run_or_print gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" ${project[@]+"${project[@]}"} \
    --worker=all --command "cd ${repo_dir} && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]'"
fi
run_or_print gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" ${project[@]+"${project[@]}"} \
  --worker=all --command "${remote}$(quoted "${PRETRAIN_CMD[@]}")"
