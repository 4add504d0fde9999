# Shared by the launchers (sourced, not run): the one pretraining command they all end in, and
# dry-run printing. Every launcher accepts --dry-run (or DRY_RUN=1): print what would run, exit 0.

# pretrain_cmd PRESET WORKDIR [extra args...] -> sets the array PRETRAIN_CMD.
pretrain_cmd() {
  local preset=$1 workdir=$2; shift 2
  PRETRAIN_CMD=(brainlm-pretrain --config "configs/pretrain.py:${preset}" --workdir "$workdir" "$@")
}

# quoted ARGS... -> the arguments as one shell-quoted line (safe to paste or to pass as --command).
quoted() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

# run_or_print CMD... -> prints `+ CMD` when dry-running, else runs it.
run_or_print() {
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "+ $(quoted "$@")"; else "$@"; fi
}

usage_from_header() { sed -n '2,/^$/p' "$1" | sed -n 's/^# \{0,1\}//p'; }

# min_args N SCRIPT "$@": print SCRIPT's usage (its header) and exit 2 unless there are N arguments.
min_args() {
  local n=$1 script=$2; shift 2
  if [ $# -lt "$n" ]; then usage_from_header "$script"; exit 2; fi
}

# cpu_devices N: JAX on the CPU with N virtual devices (replaces any device count in XLA_FLAGS).
cpu_devices() {
  local flags
  flags=$(echo " ${XLA_FLAGS:-}" | sed 's/ --xla_force_host_platform_device_count=[0-9]*//g; s/^ *//')
  export JAX_PLATFORMS=cpu XLA_FLAGS="${flags:+$flags }--xla_force_host_platform_device_count=$1"
}

# preflight PRESET TOPOLOGY SLICES [--config.x=... ...]: compiles the pretraining step for the
# target TPU slice on this machine (libtpu from `pip install -e .[tpu]`; no TPU needed, a few
# minutes on a laptop) and stops the launcher, exit 1, when it does not fit HBM: brainlm-bench
# then names, in one line, a batch that does. Arguments other than --config.* are left out.
preflight() {
  local preset=$1 topology=$2 slices=$3 a cfg=(); shift 3
  for a in "$@"; do [[ $a == --config.* ]] && cfg+=("$a"); done
  local cmd=(env JAX_PLATFORMS=cpu brainlm-bench --config "configs/pretrain.py:${preset}"
             --topology "$topology" --slices "$slices" --preflight ${cfg[@]+"${cfg[@]}"})
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "+ $(quoted "${cmd[@]}")"; return 0; fi
  "${cmd[@]}" || exit 1
}
