r"""Train-step throughput and peak memory: brainlm_jax vs. Hugging Face ViT-MAE (PyTorch).

One full pretraining step (forward + backward + gradient clipping + AdamW update) of

  ours  brainlm_jax.BrainLM, preset 13m (the released BrainLM shape: encoder 256 x 4 layers x
        4 heads, MLP 1024; decoder 256 x 2 x 4, MLP 1024), 424 parcels x 200 timepoints in
        patches of 20 -> 4,240 tokens; the jit-ted `train.make_train_step` of the trainer.
  peer  transformers.ViTMAEForPreTraining at the same widths/depths, 1 x 1024 x 1024 images in
        16 x 16 patches -> 64 x 64 = 4,096 tokens (HF's 2-D sin-cos table needs a square grid, so
        4,240 is impossible; ours does 3.5% more tokens), SDPA attention, torch.optim.AdamW
        (+ clip_grad_norm_(1.0), as the HF Trainer and our step do).

Both at mask ratio 0.75, batch 8, the same number of threads, float32. Each framework runs in
its own subprocess (this script re-invokes itself with `--_worker jax|torch`), so peak memory is
per framework. A worker builds model + optimizer + one batch, records its RSS ("setup"), runs
`--warmup` untimed steps (the JAX compile happens before these and is timed on its own), resets
the kernel's peak-RSS counter, runs `--steps` timed steps and prints one JSON line. The parent
prints a table and the ratios ours/peer.

Visible (encoder) tokens differ by masking mode, and the table shows them:
  --masking parcel   (this script's default) keeps int(10 * 0.25) = 2 of the 10 patches of every
                     parcel: 424 * 2 = 848 visible tokens (an effective mask ratio of 0.8);
  --masking uniform  (ViT-MAE style) keeps int(4240 * 0.25) = 1,060 visible tokens;
  peer               keeps int(4096 * 0.25) = 1,024.
So 'uniform' is the like-for-like comparison (ours: 3.5% more tokens in both encoder and decoder);
'parcel' gives our encoder ~17% fewer tokens than the peer's. The decoders see every token
(ours 1 + 4,240, peer 1 + 4,096).

Memory columns (MiB): `import` = RSS after the framework imports (ours: jax + brainlm_jax.training;
TensorFlow is imported only by the input pipeline, and the table says if it was loaded);
`setup` = RSS after building model, optimizer state and batch; `peak` = the kernel's VmHWM over
the worker's whole life (imports, setup, JAX compile, all steps; read before and after the reset
below; not ru_maxrss, which survives exec and would include this parent's RSS); `peak-setup` =
peak minus the RSS after setup; `steady` = peak RSS during the timed steps only (VmHWM after
writing 5 to /proc/self/clear_refs; '-' where the kernel does not allow it). The memory goal
uses `peak`.

Threads: the worker is pinned (sched_setaffinity) to `--threads` CPUs when the machine has more,
torch gets set_num_threads(N) / set_num_interop_threads(1), OMP/MKL get N. Pinning is the only
limit that works for XLA on CPU in jax 0.10.2: measured on a jit-ted 2048^2 matmul on 2 cores,
`XLA_FLAGS="--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=1"` (accepted and
ignored) and `--xla_cpu_multi_thread_eigen=false` both still used ~1.97 cores; affinity to one
CPU gave 1.0. `cpu_util` = worker CPU time / wall time during the timed steps (~N when it had its
cores); `other` = cores' worth of CPU that *other* processes used meanwhile (from /proc/stat;
~0 on an idle machine; above 0.1 the script warns that the timings are contaminated).

Run from the repo root (defaults take ~3 min on 2 idle CPU cores; other load ruins the timings):

  python benchmarks/train_step.py
  python benchmarks/train_step.py --masking uniform --json /tmp/train_step.json
  python benchmarks/train_step.py --only jax --attention blockwise --steps 5
  (--attention xla materialises the decoder's 8 x 4 x 4241^2 logits: > 20 GB, OOM-killed here)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
from brainlm_jax.tools import bench, measure, torch_peer  # noqa: E402  pylint: disable=wrong-import-position
GOAL_SPEEDUP = 1.5  # ours / peer samples per second
GOAL_MEMORY = 1.0  # ours / peer peak RSS


def _parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=3, help="timed steps per framework")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing (>= 1)")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--mask-ratio", type=float, default=0.75)
  p.add_argument("--masking", choices=("parcel", "uniform"), default="parcel",
                 help="our masking mode (the peer always masks uniformly)")
  p.add_argument("--attention", choices=("auto", "xla", "blockwise"), default="auto",
                 help="our attention implementation")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype (params stay float32; torch uses CPU autocast for bfloat16)")
  p.add_argument("--only", choices=("jax", "torch"), default=None, help="run one framework only")
  p.add_argument("--parcels", type=int, default=424)
  p.add_argument("--window", type=int, default=200, help="timepoints per sample (ours)")
  p.add_argument("--preset", default="13m", help="configs/pretrain.py preset for ours")
  p.add_argument("--peer-image-size", type=int, default=1024)
  p.add_argument("--peer-patch-size", type=int, default=16)
  p.add_argument("--json", default=None, help="write config, per-framework rows and ratios here")
  p.add_argument("--_worker", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.warmup < 1 or args.steps < 1:
    p.error("--warmup and --steps must be >= 1")
  return args


# ----------------------------------------------------------------------------------------------
# Workers (the measurement code lives in brainlm_jax/bench.py, shared with `brainlm-bench`).


def _config(args: argparse.Namespace):
  from configs import pretrain  # pylint: disable=import-outside-toplevel
  c = pretrain.get_config(args.preset)
  c.data.path = ""  # N(0, 1) signal of --parcels x --window
  c.data.window = args.window  # model.window is a reference to it
  c.data.coords = pretrain.A424_COORDS if args.parcels == 424 else ""
  c.data.num_parcels = args.parcels
  c.train.batch_size = args.batch
  c.masking.ratio = args.mask_ratio
  c.masking.mode = args.masking
  c.model.attention = args.attention
  c.model.dtype = args.dtype
  c.mesh.num_devices = 1
  return c


def _worker_jax(args: argparse.Namespace, log) -> dict:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from brainlm_jax.cli import common  # pylint: disable=import-outside-toplevel
  common.configure_xla_flags()  # the same XLA flags as brainlm-pretrain
  return bench.bench_train_step(_config(args), steps=args.steps, warmup=args.warmup,
                                num_parcels=args.parcels, log=log)


def _peer_shape(args: argparse.Namespace) -> dict:
  from brainlm_jax.models.brainlm import ModelConfig  # pylint: disable=import-outside-toplevel
  c = _config(args)
  model = dict(c.model.to_dict(), num_parcels=args.parcels)
  model = {k: v for k, v in model.items() if k in ModelConfig.__dataclass_fields__}
  shape = torch_peer.peer_shape(model, args.batch, args.mask_ratio, args.dtype)
  shape.update(image_size=args.peer_image_size, patch_size=args.peer_patch_size)
  return shape


def _worker_torch(args: argparse.Namespace, log) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(args.threads)
  return torch_peer.peer_worker(_peer_shape(args), steps=args.steps, warmup=args.warmup, log=log)


def _run_worker(args: argparse.Namespace) -> None:
  cpus = measure.limit_cpus(args.threads)
  t0 = time.perf_counter()

  def log(msg):
    print(f"[{args._worker} {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

  row = (_worker_jax if args._worker == "jax" else _worker_torch)(args, log)
  print(json.dumps(measure.finish_row(row, t0, args.threads, cpus)), flush=True)


# ----------------------------------------------------------------------------------------------
# Parent.


def _spawn(framework: str, argv: list[str]) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_worker", framework]
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    why = " (killed by SIGKILL: most likely out of memory)" if proc.returncode == -9 else ""
    raise SystemExit(f"{framework} worker failed (exit {proc.returncode}){why}:\n"
                     f"{proc.stdout[-4000:]}")
  return json.loads(lines[-1])


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


def _report(args: argparse.Namespace, rows: list[dict]) -> dict:
  print()
  print(f"Train step (fwd + bwd + clip + AdamW), batch {args.batch}, {args.threads} threads, "
        f"{args.dtype}, mask ratio {args.mask_ratio}, {args.steps} timed steps (median) after "
        f"{args.warmup} warmup")
  head = (f"{'framework':<36} {'tokens':>6} {'visible':>7} {'samples/s':>9} {'step s':>7} "
          f"{'compile s':>9} {'1st step s':>10} {'import MiB':>10} {'setup MiB':>9} {'peak MiB':>8} {'peak-setup':>10} "
          f"{'steady MiB':>10} {'cpu_util':>8} {'other':>5}")
  print(head)
  print("-" * len(head))
  for r in rows:
    print(f"{r['name']:<36} {r['tokens']:>6} {r['visible_tokens']:>7} {r['samples_per_s']:>9.3f} "
          f"{r['step_s']:>7.2f} {_fmt(r['compile_s'], '>9.1f')} {r['first_step_s']:>10.2f} "
          f"{r['import_rss_mib']:>10.0f} {r['setup_rss_mib']:>9.0f} "
          f"{r['peak_rss_mib']:>8.0f} {r['peak_after_setup_mib']:>10.0f} "
          f"{_fmt(r['steady_peak_rss_mib'], '>10.0f')} {r['cpu_util']:>8.2f} "
          f"{_fmt(r['other_load'], '>5.2f')}")
  for r in rows:
    att = r["attention"]
    if r["framework"] == "jax":
      print(f"  ours: {r['params']:,} params; attention {att['requested']} -> encoder "
            f"({r['encoder_seq']} tokens) {att['encoder']}, decoder ({r['decoder_seq']}) "
            f"{att['decoder']}; XLA temp buffers {_fmt(r['xla_temp_mib'], '.0f')} MiB; "
            f"{r['data']}; jax {r['versions']['jax']}"
            + ("; TensorFlow imported (by brainlm_jax.data.input_pipeline)"
               if r.get("tensorflow_loaded") else ""))
    else:
      print(f"  peer: {r['params']:,} trainable params ({r['params_total']:,} with the fixed "
            f"position tables); attn_implementation={att['config']}, "
            f"{att['sdpa_calls_per_forward']} SDPA calls per forward, kernels "
            f"{', '.join(att['sdpa_kernels']) or 'NONE'}; torch {r['versions']['torch']}, "
            f"transformers {r['versions']['transformers']}")
  if args.masking == "parcel" and len(rows) == 2:
    print("  note: 'parcel' masking keeps int(T*(1-ratio)) patches per parcel "
          f"({rows[0]['visible_tokens']} visible tokens) vs the peer's {rows[1]['visible_tokens']};"
          " --masking uniform is the like-for-like token count.")
  result = {"config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "rows": rows}
  if len(rows) == 2:
    ours, peer = rows
    q = result["ratios"] = measure.ratios(ours, peer)
    speed, per_token, mem = q["samples_per_s"], q["tokens_per_s"], q["peak_rss"]
    mem_setup, steady = q["peak_after_setup"], q["steady_peak_rss"]
    result["goals"] = {"speedup": GOAL_SPEEDUP, "speedup_met": speed >= GOAL_SPEEDUP,
                       "memory": GOAL_MEMORY, "memory_met": mem <= GOAL_MEMORY}
    print()
    print(f"ours/peer samples/s   {speed:.2f}x   (goal >= {GOAL_SPEEDUP}x: "
          f"{'MET' if speed >= GOAL_SPEEDUP else 'NOT MET'}); tokens/s {per_token:.2f}x")
    print(f"ours/peer peak RSS    {mem:.2f}x   (goal <= {GOAL_MEMORY}x: "
          f"{'MET' if mem <= GOAL_MEMORY else 'NOT MET'}); peak-after-setup {mem_setup:.2f}x; "
          f"steady {_fmt(steady, '.2f')}x")
    result["roofline"] = _roofline(args, ours, peer, speed)
  busy = [r["framework"] for r in rows if (r["other_load"] or 0.0) > 0.1]
  if busy:
    print(f"WARNING: other processes used > 0.1 cores during the timed steps of {busy} "
          "(column 'other'): timings are contaminated; rerun on an idle machine")
  return result


def _roofline(args: argparse.Namespace, ours: dict, peer: dict, speed: float) -> dict | None:
  """How fast each step could be at the CPUs' measured matmul peak: the speed goal's ceiling.

  FLOPs: ours from XLA's cost analysis, the peer's from torch's FlopCounterMode on the meta
  device (`torch_peer.peer_flops`); both are model FLOPs (attention's backward without a flash
  kernel's recomputation). Peaks: a float32 2048^2 matmul timed in each worker after its steps,
  on the same pinned cores.
  """
  pj, pt = ours.get("peak_flops_per_device"), peer.get("matmul_peak_flops")
  if not ours.get("flops_per_step") or not (pj or pt) or args.dtype != "float32":
    return None
  peer_f = torch_peer.peer_flops(_peer_shape(args))
  f_ours, g = ours["flops_per_step"], 1e9
  best = max(p for p in (pj, pt) if p)
  # The most ours/peer samples/s a peak allows: ours at 100% of it vs the peer as measured.
  ceiling = {name: peer["step_s"] * p / f_ours for name, p in (("jax", pj), ("best", best)) if p}
  out = {"flops_ours": f_ours, "flops_peer": peer_f, "matmul_peak_jax": pj,
         "matmul_peak_torch": pt, "achieved_ours": f_ours / ours["step_s"],
         "achieved_peer": peer_f / peer["step_s"], "max_speedup_at_jax_peak": ceiling.get("jax"),
         "max_speedup_at_best_peak": ceiling["best"]}
  print(f"FLOPs per step        ours {f_ours / 1e12:.3f} T (XLA cost analysis), peer "
        f"{peer_f / 1e12:.3f} T (torch FlopCounterMode)")
  print(f"fp32 matmul peak      jax {_fmt(pj and pj / g, '.0f')}, torch {_fmt(pt and pt / g, '.0f')}"
        f" GFLOP/s (2048^2 on the same {args.threads} cores)")
  print(f"achieved              ours {out['achieved_ours'] / g:.0f} GFLOP/s "
        f"({out['achieved_ours'] / best:.0%} of the best peak), peer {out['achieved_peer'] / g:.0f} "
        f"({out['achieved_peer'] / best:.0%})")
  parts = [f"{ceiling[k]:.2f}x at 100% of the {k} peak" for k in ("jax", "best")
           if k in ceiling and not (k == "best" and best == pj)]
  needed = GOAL_SPEEDUP / ceiling["best"]
  print(f"ceiling               ours/peer samples/s {'; '.join(parts)}; the {GOAL_SPEEDUP}x goal "
        f"needs {needed:.0%} of the best peak over the whole step (the peer runs at "
        f"{out['achieved_peer'] / best:.0%}); now {speed:.2f}x")
  return out


def main(argv=None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = _parse_args(argv)
  if args._worker:
    _run_worker(args)
    return
  frameworks = [args.only] if args.only else ["jax", "torch"]
  fwd = []
  for k, v in vars(args).items():  # the workers get every setting except these
    if k not in ("_worker", "only", "json"):
      fwd += [f"--{k.replace('_', '-')}", str(v)]
  rows = [_spawn(f, fwd) for f in frameworks]
  result = _report(args, rows)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
