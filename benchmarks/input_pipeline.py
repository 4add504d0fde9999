r"""Is the input pipeline ever the bottleneck? Pipeline samples/s vs the train step's, one run.

  python benchmarks/input_pipeline.py                 # 13m preset, A424-sized synthetic scans
  python benchmarks/input_pipeline.py --preset tiny --data ../shared/data/hcp_rest_aal94
  taskset -c 0 python benchmarks/input_pipeline.py --batch 64 --steps 0   # one core, pipeline only

Times `input_pipeline.train_dataset` exactly as `brainlm-pretrain` builds it (random windows,
robust scaling done up front, masks drawn in tf.data, batching, prefetch) and the jit-ted train
step of the same preset at the same batch (`brainlm_jax.tools.bench.bench_train_step`), in this
process, and prints pipeline / step throughput. Goal: >= 10x.

Default data: `--recordings` synthetic scans of `--timepoints` x 424 parcels (UK Biobank-like:
490 volumes), since the pipeline's cost depends on the shape, not the values.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from brainlm_jax.cli import common  # noqa: E402

common.configure_xla_flags()

import numpy as np  # noqa: E402

from brainlm_jax.data import datasets, input_pipeline  # noqa: E402
from brainlm_jax.data.readers import Recording  # noqa: E402
from brainlm_jax.data.scaling import RobustScaler  # noqa: E402
from brainlm_jax.tools import bench  # noqa: E402
from configs import pretrain  # noqa: E402


def pipeline_rate(recs, config, *, batches: int, warmup: int = 5) -> dict:
  """Samples/s of the training stream (after `warmup` batches), and its set-up time."""
  t0 = time.perf_counter()
  scaler = RobustScaler().fit(recs)
  ds = input_pipeline.train_dataset(
      recs, scaler=scaler, batch_size=config.train.batch_size, window=config.data.window,
      seed=0, with_positions=True,
      masking={**config.masking.to_dict(), "patch_len": config.model.patch_len})
  it = ds.as_numpy_iterator()
  for _ in range(warmup):
    next(it)
  setup = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(batches):
    b = next(it)
  dt = time.perf_counter() - t0
  return {"setup_s": setup, "samples_per_s": batches * config.train.batch_size / dt,
          "batch_keys": sorted(b)}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="13m")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--data", default="", help="recordings (dir/glob); default: synthetic")
  p.add_argument("--recordings", type=int, default=200)
  p.add_argument("--timepoints", type=int, default=490)
  p.add_argument("--parcels", type=int, default=424)
  p.add_argument("--batches", type=int, default=200)
  p.add_argument("--steps", type=int, default=2, help="timed train steps (0: pipeline only)")
  args = p.parse_args()

  config = pretrain.get_config(args.preset)
  config.train.batch_size = args.batch
  config.mesh.num_devices = 1
  if args.data:
    recs, _ = datasets.load_recordings(args.data, window=config.data.window)
    source = f"{len(recs)} recordings from {args.data}"
    config.data.path = args.data
  else:
    rng = np.random.default_rng(0)
    recs = [Recording(path=f"synthetic_{i}", subject=f"s{i}", signal=rng.standard_normal(
        (args.timepoints, args.parcels), dtype=np.float32)) for i in range(args.recordings)]
    source = f"{args.recordings} synthetic recordings of {args.timepoints} x {args.parcels}"
    config.data.path = ""
  print(f"preset {args.preset}, batch {args.batch}, window {config.data.window}, patches of "
        f"{config.model.patch_len}, masking {config.masking.mode} {config.masking.ratio}; {source}")

  pipe = pipeline_rate(recs, config, batches=args.batches)
  print(f"pipeline:   {pipe['samples_per_s']:10.1f} samples/s  (set-up {pipe['setup_s']:.1f} s; "
        f"yields {', '.join(pipe['batch_keys'])})")
  if not args.steps:
    return
  if not args.data:
    config.data.coords = pretrain.A424_COORDS if args.parcels == 424 else ""
  step = bench.bench_train_step(config, steps=args.steps, warmup=1, num_parcels=args.parcels)
  print(f"train step: {step['samples_per_s']:10.1f} samples/s  ({step['step_s']:.2f} s/step, "
        f"compile {step['compile_s']:.1f} s)")
  print(f"pipeline / train step = {pipe['samples_per_s'] / step['samples_per_s']:.0f}x "
        "(goal >= 10x)")


if __name__ == "__main__":
  main()
