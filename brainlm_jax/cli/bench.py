"""`brainlm-bench`: train-step speed, memory and MFU of a preset (optionally vs. the PyTorch peer).

  brainlm-bench --config configs/pretrain.py:13m --config.train.batch_size=8 --vs-torch
  brainlm-bench --config configs/pretrain.py:111m --config.model.dtype=bfloat16 --json b.json

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
common.underscore_aliases(__name__, "vs-torch", required=("config",))


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


def main(argv):
  common.start(argv)
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
  common.run_entrypoint(main, "brainlm-bench", (_CONFIG, _STEPS, _WARMUP, _VS_TORCH, _THREADS, _JSON))


if __name__ == "__main__":
  run()
