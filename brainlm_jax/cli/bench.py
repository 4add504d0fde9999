"""`brainlm-bench`: train-step speed, memory and MFU of a preset (optionally vs. the PyTorch peer),
or, with --topology, a plan for a Cloud TPU slice compiled on this machine (no TPU needed).

  brainlm-bench --config configs/pretrain.py:13m --config.train.batch_size=8 --vs-torch
  brainlm-bench --config configs/pretrain.py:111m --config.model.dtype=bfloat16 --json b.json
  brainlm-bench --config configs/pretrain.py:111m --topology v5e-16 [--slices 2] --json plan.json

--topology (MaxText's names: v4-8, v5e-16, v5p-64, v6e-256, or a shape such as v5e:2x2) compiles
the real train step for that slice with libtpu (`pip install -e '.[tpu]'`) and prints one row per
compile: memory per chip against HBM, model and compiled FLOPs, HBM bytes, collectives, the
roofline step-time bound and the MFU it allows, and the largest global batch found to fit by
compiling (tools/plan.py). Run it with JAX_PLATFORMS=cpu (set here when unset).

Prints compile time, step time (median of --steps after --warmup), samples/s, tokens/s, peak
memory (device peak on GPU/TPU; peak RSS and XLA's buffers on CPU), FLOPs per step from XLA's
cost analysis and MFU against the device's peak (data-sheet table; on CPU a measured matmul).
--vs-torch also runs Hugging Face ViTMAEForPreTraining at the same widths/depths and token count
in a subprocess and prints ours/peer ratios. The batch is --config.train.batch_size (global).
"""

import json
import os
import time

from absl import flags
from absl import logging
from ml_collections import config_flags

from brainlm_jax.cli import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/pretrain.py:PRESET",
                                          lock_config=False)
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_VS_TORCH = flags.DEFINE_bool("vs-torch", False, "Also run the PyTorch HF ViTMAE peer.")
_THREADS = flags.DEFINE_integer(
    "threads", None, "CPU only: pin both frameworks to this many CPUs (default: all allowed).")
_JSON = flags.DEFINE_string("json", None, "Write the rows and ratios here.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "Compile for this Cloud TPU slice instead of running here (v4-8, v5e-16, "
    "v5p-64, v6e-256, v5e:2x2, ...): a plan, no TPU needed (needs .[tpu]).")
_SLICES = flags.DEFINE_integer("slices", 1, "--topology: slices joined over the data-centre "
                               "network (the mesh's data axis spans them).")
_SEARCH = flags.DEFINE_bool("batch-search", True, "--topology: also find the largest global batch "
                            "that fits by compiling.")
_MAX_COMPILES = flags.DEFINE_integer("max-compiles", 3, "--topology: compiles at most, the "
                                     "batch search included.")
_STEP = flags.DEFINE_enum("step", "train", ["train", "eval"], "--topology: which step to compile.")
_PREFLIGHT = flags.DEFINE_bool(
    "preflight", False, "--topology: a launcher's check: one line; exit status 1 when the step "
    "does not fit, naming the largest batch that does (found by compiling).")
common.underscore_aliases(__name__, "vs-torch", "batch-search", "max-compiles",
                          required=("config",))


def _fmt(x, spec, scale=1.0):
  return "-" if x is None else format(x * scale, spec)


def format_table(rows: list[dict]) -> str:
  head = (f"{'framework':<32} {'device':<24} {'dtype':<8} {'batch':>5} {'tokens':>6} "
          f"{'compile s':>9} {'step s':>8} {'samples/s':>9} {'tokens/s':>9} {'peak MiB':>9} "
          f"{'GFLOP/step':>10} {'MFU':>6}")
  lines = [head, "-" * len(head)]
  for r in rows:
    peak = r.get("device_peak_mib") or r["peak_rss_mib"]
    device = f"{r['device']}" + (f" x{r['num_devices']}" if r.get("num_devices", 1) > 1 else "")
    lines.append(
        f"{r['name']:<32} {device[:24]:<24} {r['dtype']:<8} {r['batch']:>5} {r['tokens']:>6} "
        f"{_fmt(r['compile_s'], '>9.1f')} {r['step_s']:>8.3f} {r['samples_per_s']:>9.2f} "
        f"{r['tokens_per_s']:>9.0f} {peak:>9.0f} {_fmt(r.get('flops_per_step'), '>10.1f', 1e-9)} "
        f"{_fmt(r.get('mfu'), '>6.1%')}")
  return "\n".join(lines)


def format_plan(r: dict) -> str:
  """A compiled plan row (tools/plan.py) as a few readable lines."""
  coll = ", ".join(f"{k} x{v['count']:.0f} {v['bytes'] / 2**20:.0f} MiB"
                   + (f" ({v['dcn_bytes'] / 2**20:.0f} over DCN)" if v["dcn_bytes"] else "")
                   for k, v in sorted(r["collectives"].items())) or "none"
  fit = "fits" if r["fits"] else "DOES NOT FIT"
  lines = [
      f"{r['preset']} {r['step']} step on {r['slices']} x {r['topology']} ({r['topology_name']}, "
      f"{r['chips']} chips, {r['device_kind']}), mesh {r['mesh']}, global batch {r['batch']}, "
      f"{r['dtype']}, attention {r['attention']}, remat {r['remat']}: compiled in "
      f"{r['compile_s']:.0f} s",
      f"  memory per chip (compiler's analysis): {fit}: {r['total_gib']:.2f} GiB of {r['hbm_gib']:.2f} (arguments "
      f"{r['argument_gib']:.2f}, temporaries {r['temp_gib']:.2f}; state {r['state_gib']:.2f})",
      f"  FLOPs per step: model {r['model_flops'] / 1e12:.2f} T ({r['model_flops_source']}); "
      f"estimated from the compiled HLO: {r['compiled_flops_per_chip'] / 1e12:.3f} T and "
      f"{r['hbm_bytes_per_chip'] / 1e9:.2f} GB of HBM traffic per chip, "
      f"{_fmt(r['intensity'], '.0f')} FLOP/byte (ridge {r['ridge']:.0f}); the compiler's own "
      f"count (loop bodies once): {r['xla_cost_analysis']['flops'] / 1e12:.3f} T, "
      f"{r['xla_cost_analysis']['bytes_accessed'] / 1e9:.2f} GB",
      f"  collectives per chip (from the HLO, ring estimate of bytes sent): {coll}",
      f"  roofline estimate: compute {r['compute_s'] * 1e3:.1f} ms, HBM {r['hbm_s'] * 1e3:.1f} ms, "
      f"ICI {r['ici_s'] * 1e3:.1f} ms, DCN {r['dcn_s'] * 1e3:.1f} ms -> bound "
      f"{r['bound_s'] * 1e3:.1f} ms ({r['bound_by']}), MFU bound {_fmt(r['mfu_bound'], '.0%')}",
  ]
  if r.get("custom_calls"):
    lines.append(f"  Pallas kernels (FLOPs not in the compiled count): {r['custom_calls']}")
  if "max_batch" in r:
    tried = "; ".join(f"{t['batch']}: {'fits' if t['fits'] else 'no'}"
                      + (f" {t['total_gib']:.1f} GiB" if t.get("total_gib") else "")
                      for t in r["search"])
    lines.append(f"  largest global batch that fits: {r['max_batch'] or 'none tried'} "
                 f"(compiled: {tried})")
  return "\n".join(lines)


def plan_main(config):
  """--topology: compile for a TPU slice and print / write its row."""
  from brainlm_jax.tools import plan, tpu  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  log = lambda msg: logging.info("[plan %.0fs] %s", time.perf_counter() - t0, msg)  # noqa: E731
  where = f"{_SLICES.value} x {_TOPOLOGY.value}" if _SLICES.value > 1 else _TOPOLOGY.value
  what = f"{config.get('preset', '?')} at global batch {config.train.batch_size} on {where}"
  try:
    row = plan.plan(config, _TOPOLOGY.value, num_slices=_SLICES.value,
                    search_batch=_SEARCH.value and not _PREFLIGHT.value,
                    max_compiles=_MAX_COMPILES.value, step=_STEP.value, log=log)
    if _PREFLIGHT.value and not row["fits"]:
      raise plan.DoesNotFit(f"{row['total_gib']:.1f} GiB per chip", None)
  except tpu.TpuCompilerError as e:
    raise SystemExit(f"brainlm-bench: {e}") from None
  except plan.DoesNotFit as e:
    if not _PREFLIGHT.value:
      raise SystemExit(f"brainlm-bench: {what} does not fit: {e}") from None
    try:  # name a batch that fits, found by compiling
      fit = plan.plan(config, _TOPOLOGY.value, num_slices=_SLICES.value, search_batch=True,
                      max_compiles=_MAX_COMPILES.value, step=_STEP.value, log=log)["max_batch"]
    except plan.DoesNotFit:
      fit = 0
    hint = (f"--config.train.batch_size={fit} fits (compiled)" if fit else
            "no batch tried fits: use a larger slice, more slices or a smaller preset")
    raise SystemExit(f"preflight: {what} does not fit in HBM ({str(e)[:120]}); {hint}") from None
  if _PREFLIGHT.value:
    print(f"preflight: {what} fits: {row['total_gib']:.1f} GiB per chip of "
          f"{row['hbm_gib']:.0f}, mesh {row['mesh']}, roofline bound {row['bound_s'] * 1e3:.0f} ms "
          f"a step ({row['bound_by']}), compiled in {row['compile_s']:.0f} s")
    return row
  row["wall_s"] = time.perf_counter() - t0
  print()
  print(format_plan(row))
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump({"config": json.loads(config.to_json_best_effort()), "rows": [row]}, f, indent=1,
                default=str)
    print(f"wrote {_JSON.value}")
  return row


def main(argv):
  if _TOPOLOGY.value:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices beside the CPU
  common.start(argv)
  if _TOPOLOGY.value:
    plan_main(_CONFIG.value)
    return
  import jax  # pylint: disable=import-outside-toplevel
  # pylint: disable=import-outside-toplevel
  from brainlm_jax.tools import bench, measure, torch_peer
  t0 = time.perf_counter()
  cpus = measure.limit_cpus(_THREADS.value) if _THREADS.value else []
  log = lambda msg: logging.info("[jax %.1fs] %s", time.perf_counter() - t0, msg)  # noqa: E731
  config = _CONFIG.value
  ours = measure.finish_row(bench.bench_train_step(config, steps=_STEPS.value, warmup=_WARMUP.value,
                                                 log=log), t0, _THREADS.value, cpus)
  rows = [ours]
  result = {"config": json.loads(config.to_json_best_effort()), "rows": rows}
  if _VS_TORCH.value:
    shape = torch_peer.peer_shape(ours["model"], ours["batch"], config.masking.ratio, ours["dtype"])
    logging.info("Running the PyTorch peer at %s", shape)
    threads = _THREADS.value or len(os.sched_getaffinity(0))
    peer = torch_peer.peer_row(shape, steps=_STEPS.value, warmup=_WARMUP.value, threads=threads)
    # The peer's model FLOPs (torch's counter, meta device) and MFU against ours' device peak.
    peer["flops_per_step"] = torch_peer.peer_flops(shape)
    peak = ours["peak_flops_per_device"]
    peer["mfu"] = peer["flops_per_step"] / peer["step_s"] / peak if peak else None
    rows.append(peer)
    result["ratios"] = measure.ratios(ours, peer)
  if jax.process_index() != 0:
    return
  print()
  print(format_table(rows))
  r = ours
  if r.get("batch_note"):
    print(f"  NOTE: {r['batch_note']}")
  print(f"  ours: {r['params']:,} params on mesh {r['mesh']}; {r['data']}; attention "
        f"{r['attention']['requested']} -> encoder ({r['encoder_seq']} tokens) "
        f"{r['attention']['encoder']}, decoder ({r['decoder_seq']}) {r['attention']['decoder']}; "
        f"scan_layers={r['scan_layers']} remat={r['remat']}; XLA temp "
        f"{_fmt(r['xla_temp_mib'], '.0f')} MiB, arguments {_fmt(r['xla_argument_mib'], '.0f')} "
        f"MiB; peak RSS {r['peak_rss_mib']:.0f} MiB")
  print(f"  MFU against {_fmt(r['peak_flops_per_device'], '.1f', 1e-9)} GFLOP/s per device "
        f"({r['peak_source']}); FLOPs from XLA's cost analysis of the unrolled step"
        + ("; the peer's from torch's FlopCounterMode" if len(rows) > 1 else ""))
  if "ratios" in result:
    q = result["ratios"]
    print(f"  ours/peer: samples/s {q['samples_per_s']:.2f}x, tokens/s {q['tokens_per_s']:.2f}x, "
          f"peak RSS {q['peak_rss']:.2f}x (peer: {rows[1]['tokens']} tokens, "
          f"{rows[1]['params']:,} params)")
  busy = [x["framework"] for x in rows if (x.get("other_load") or 0.0) > 0.1]
  if busy:
    print(f"  WARNING: other processes used > 0.1 cores during the timed steps of {busy}: "
          "timings are contaminated")
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {_JSON.value}")


def run():
  common.run_entrypoint(main, "brainlm-bench", (_CONFIG, _STEPS, _WARMUP, _VS_TORCH, _THREADS, _JSON,
                                                _TOPOLOGY, _SLICES, _SEARCH, _MAX_COMPILES, _STEP,
                                                _PREFLIGHT))


if __name__ == "__main__":
  run()
