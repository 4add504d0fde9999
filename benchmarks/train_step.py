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
  --masking parcel   (BrainLM's default) keeps int(10 * 0.25) = 2 of the 10 patches of every
                     parcel: 424 * 2 = 848 visible tokens (an effective mask ratio of 0.8);
  --masking uniform  (ViT-MAE style) keeps int(4240 * 0.25) = 1,060 visible tokens;
  peer               keeps int(4096 * 0.25) = 1,024.
So 'uniform' is the like-for-like comparison (ours: 3.5% more tokens in both encoder and decoder);
'parcel' gives our encoder ~17% fewer tokens than the peer's. The decoders see every token
(ours 1 + 4,240, peer 1 + 4,096).

Memory columns (MiB): `import` = RSS after the framework imports (ours: jax + brainlm_jax.train,
which pulls in TensorFlow through brainlm_jax.input_pipeline -- ~600 MiB that the step itself
does not use, counted here as it is in a real run); `setup` = RSS after building model, optimizer
state and batch; `peak` = getrusage(RUSAGE_SELF).ru_maxrss over the worker's whole life
(imports, setup, JAX compile, all steps); `peak-setup` = peak minus the RSS after setup;
`steady` = peak RSS during the timed steps only (VmHWM after writing 5 to /proc/self/clear_refs;
'-' where the kernel does not allow it). The memory goal uses `peak`.

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
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
A424_COORDS = os.path.join(REPO, "..", "shared", "data", "atlases", "A424", "A424_Coordinates.dat")
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
# Process-level measurements.

_MIB = 1024.0 * 1024.0


def _rss_mib() -> float:
  with open("/proc/self/statm", encoding="ascii") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / _MIB


def _maxrss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _hwm_mib() -> float | None:
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return None


def _reset_hwm() -> bool:
  """Resets VmHWM (the peak RSS the kernel reports in /proc/self/status) to the current RSS."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _malloc_trim() -> None:
  """Returns freed heap to the OS (glibc), so RSS tracks live memory rather than the allocator's
  high-water mark. Done in both workers, before the setup reading and before the timed steps."""
  try:
    import ctypes  # pylint: disable=import-outside-toplevel
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _limit_cpus(n: int) -> list[int]:
  """Pins this process (and the threads it will start) to `n` of its allowed CPUs."""
  try:
    allowed = sorted(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return []
  if n < len(allowed):
    os.sched_setaffinity(0, allowed[:n])
  return sorted(os.sched_getaffinity(0))


def _thread_env(n: int) -> None:
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(n)


def _busy_cpu_s() -> float | None:
  """CPU seconds the whole machine has spent busy (all processes), from /proc/stat."""
  try:
    with open("/proc/stat", encoding="ascii") as f:
      fields = [int(x) for x in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
  t = os.times()
  return t.user + t.system


def _measure(run_step, args: argparse.Namespace, log) -> dict:
  """Warmup (untimed; the first one timed alone) then `args.steps` timed steps."""
  t = time.perf_counter()
  run_step()
  first = time.perf_counter() - t
  log(f"first step {first:.2f} s")
  for _ in range(args.warmup - 1):
    run_step()
  _malloc_trim()
  hwm_ok = _reset_hwm()
  times, others = [], []
  cpu0, wall0, busy0 = time.process_time(), time.perf_counter(), _busy_cpu_s()
  for i in range(args.steps):
    t, own, busy = time.perf_counter(), _own_cpu_s(), _busy_cpu_s()
    run_step()
    times.append(time.perf_counter() - t)
    # Cores' worth of CPU used by *other* processes during this step (0 on an idle machine).
    other = (None if busy is None else
             max(0.0, (_busy_cpu_s() - busy) - (_own_cpu_s() - own)) / times[-1])
    others.append(other)
    log(f"step {i + 1}/{args.steps}: {times[-1]:.2f} s"
        + ("" if other is None else f" (other processes: {other:.2f} cores)"))
  cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
  busy = _busy_cpu_s()
  other_load = (None if busy0 is None or busy is None else
                max(0.0, (busy - busy0) - cpu) / wall)
  med = statistics.median(times)
  return {
      "first_step_s": first,
      "step_s": med,
      "step_times_s": times,
      "samples_per_s": args.batch / med,
      "cpu_util": cpu / wall,
      "other_load": other_load,
      "other_load_per_step": others,
      "steady_peak_rss_mib": _hwm_mib() if hwm_ok else None,
      "peak_rss_mib": _maxrss_mib(),
  }


# ----------------------------------------------------------------------------------------------
# Workers.


def _worker_jax(args: argparse.Namespace, log) -> dict:
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from brainlm_jax.cli import common  # pylint: disable=import-outside-toplevel
  common.configure_xla_flags()  # the same XLA flags as brainlm-pretrain
  import numpy as np  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from configs import pretrain  # pylint: disable=import-outside-toplevel
  from brainlm_jax import attention as attention_lib  # pylint: disable=import-outside-toplevel
  from brainlm_jax import masking as masking_lib  # pylint: disable=import-outside-toplevel
  from brainlm_jax import sharding, train  # pylint: disable=import-outside-toplevel
  from brainlm_jax.model import BrainLM, count_params  # pylint: disable=import-outside-toplevel

  import_rss = _rss_mib()
  c = pretrain.get_config(args.preset)
  c.data.window = args.window  # model.window is a reference to it
  c.train.batch_size = args.batch
  c.masking.ratio = args.mask_ratio
  c.masking.mode = args.masking
  c.model.attention = args.attention
  c.model.dtype = args.dtype
  c.mesh.num_devices = 1
  train.validate_config(c, jax.device_count())

  rng = np.random.default_rng(0)
  if args.parcels == 424 and os.path.isfile(A424_COORDS):
    from brainlm_jax import recordings  # pylint: disable=import-outside-toplevel
    coords_np, coords_src = recordings.load_coordinates(A424_COORDS), "A424_Coordinates.dat"
  else:
    coords_np, coords_src = rng.uniform(-70, 70, (args.parcels, 3)).astype(np.float32), "random"
  signal = rng.standard_normal((args.batch, args.parcels, args.window), dtype=np.float32)

  mcfg = train.model_config(c, num_parcels=args.parcels, has_coords=True)
  mesh = sharding.create_mesh(c.mesh)
  tx = train.make_optimizer(c.train)
  state, shardings = train.create_train_state(mcfg, tx, mesh, seed=0)
  n_tokens = mcfg.num_parcels * mcfg.num_patches
  visible = masking_lib.num_visible(c.masking.mode, mcfg.num_parcels, mcfg.num_patches,
                                    c.masking.ratio, c.masking.forecast_patches)
  head_dim = mcfg.hidden_size // mcfg.num_heads
  dec_head_dim = mcfg.decoder_hidden_size // mcfg.decoder_num_heads

  def impl(length, heads, dim):
    x = jax.ShapeDtypeStruct((args.batch, length, heads, dim), jax.numpy.dtype(args.dtype))
    return attention_lib.resolve_implementation(x, x, mcfg.attention)

  with jax.set_mesh(mesh):
    batch = train.to_global({"signal": signal}, mesh)
    coords = jax.device_put(coords_np, sharding.replicated(mesh))
    jax.block_until_ready((state, batch, coords))
    _malloc_trim()
    setup_rss = _rss_mib()
    log(f"setup done: {count_params(state.params):,} params, RSS {setup_rss:.0f} MiB; compiling")
    step = train.make_train_step(BrainLM(mcfg), tx, c, mesh, shardings)
    t = time.perf_counter()
    compiled = step.lower(state, batch, coords).compile()
    compile_s = time.perf_counter() - t
    log(f"compiled in {compile_s:.1f} s")
    mem = compiled.memory_analysis()
    holder = {"state": state}
    del state

    def run_step():
      holder["state"], metrics = compiled(holder["state"], batch, coords)
      jax.block_until_ready((holder["state"], metrics))
      holder["loss"] = float(metrics["train_loss"])

    out = _measure(run_step, args, log)
  out.update({
      "framework": "jax",
      "name": f"brainlm_jax {args.preset} ({args.masking})",
      "versions": {"jax": jax.__version__},
      "tokens": n_tokens,
      "visible_tokens": visible,
      "encoder_seq": 1 + visible,
      "decoder_seq": 1 + n_tokens,
      "params": count_params(holder["state"].params),
      "attention": {"requested": mcfg.attention,
                    "encoder": impl(1 + visible, mcfg.num_heads, head_dim),
                    "decoder": impl(1 + n_tokens, mcfg.decoder_num_heads, dec_head_dim)},
      "compile_s": compile_s,
      "import_rss_mib": import_rss,
      "setup_rss_mib": setup_rss,
      "xla_temp_mib": getattr(mem, "temp_size_in_bytes", 0) / _MIB if mem is not None else None,
      "coords": coords_src,
      "tensorflow_loaded": "tensorflow" in sys.modules,
      "final_loss": holder["loss"],
  })
  return out


def _worker_torch(args: argparse.Namespace, log) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(args.threads)
  torch.set_num_interop_threads(1)
  import transformers  # pylint: disable=import-outside-toplevel
  from torch.nn.attention import SDPBackend  # pylint: disable=import-outside-toplevel
  from transformers import ViTMAEConfig, ViTMAEForPreTraining  # pylint: disable=import-outside-toplevel

  import_rss = _rss_mib()
  torch.manual_seed(0)
  cfg = ViTMAEConfig(
      hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
      decoder_hidden_size=256, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
      decoder_intermediate_size=1024, image_size=args.peer_image_size,
      patch_size=args.peer_patch_size, num_channels=1, mask_ratio=args.mask_ratio,
      attn_implementation="sdpa")
  model = ViTMAEForPreTraining(cfg)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
  pixels = torch.randn(args.batch, 1, args.peer_image_size, args.peer_image_size)
  side = args.peer_image_size // args.peer_patch_size
  n_tokens = side * side
  visible = int(n_tokens * (1 - args.mask_ratio))
  _malloc_trim()
  setup_rss = _rss_mib()
  log(f"setup done: {sum(p.numel() for p in model.parameters()):,} params "
      f"(attn_implementation={model.config._attn_implementation}), RSS {setup_rss:.0f} MiB")

  autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bfloat16"
              else torch.autocast("cpu", enabled=False))
  loss_box = {}

  def run_step():
    opt.zero_grad(set_to_none=True)
    with autocast:
      out = model(pixel_values=pixels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    loss_box["loss"] = float(out.loss.detach())

  # Record which SDPA kernels the model actually calls (a cheap wrapper, first step only).
  backends = {int(v): k for k, v in SDPBackend.__members__.items()}
  sdpa_calls = []
  original = torch.nn.functional.scaled_dot_product_attention

  def counting_sdpa(q, k, v, *a, **kw):
    try:
      choice = backends.get(int(torch._fused_sdp_choice(q, k, v, *a, **kw)), "?")  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except
      choice = "?"
    sdpa_calls.append((tuple(q.shape), str(q.dtype).replace("torch.", ""), choice))
    return original(q, k, v, *a, **kw)

  first_done = {"v": False}

  def run_step_traced():
    if first_done["v"]:
      return run_step()
    torch.nn.functional.scaled_dot_product_attention = counting_sdpa
    try:
      run_step()
    finally:
      torch.nn.functional.scaled_dot_product_attention = original
      first_done["v"] = True

  out = _measure(run_step_traced, args, log)
  kinds = sorted({f"{s[0]}:{s[1]}:{s[2]}" for s in sdpa_calls})
  out.update({
      "framework": "torch",
      "name": "HF ViTMAEForPreTraining (sdpa)",
      "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
      "tokens": n_tokens,
      "visible_tokens": visible,
      "encoder_seq": 1 + visible,
      "decoder_seq": 1 + n_tokens,
      "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
      "params_total": sum(p.numel() for p in model.parameters()),
      "attention": {"requested": "sdpa", "config": model.config._attn_implementation,
                    "sdpa_calls_per_forward": len(sdpa_calls), "sdpa_kernels": kinds},
      "compile_s": None,
      "import_rss_mib": import_rss,
      "setup_rss_mib": setup_rss,
      "final_loss": loss_box["loss"],
  })
  return out


def _run_worker(args: argparse.Namespace) -> None:
  cpus = _limit_cpus(args.threads)
  _thread_env(args.threads)
  t0 = time.perf_counter()

  def log(msg):
    print(f"[{args._worker} {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

  loadavg = os.getloadavg()[0]
  row = (_worker_jax if args._worker == "jax" else _worker_torch)(args, log)
  row.update({"cpus": cpus, "threads": args.threads, "loadavg_at_start": loadavg,
              "peak_after_setup_mib": row["peak_rss_mib"] - row["setup_rss_mib"],
              "wall_s": time.perf_counter() - t0})
  print(json.dumps(row), flush=True)


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
            f"coords {r['coords']}; jax {r['versions']['jax']}"
            + ("; TensorFlow imported (by brainlm_jax.input_pipeline)"
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
    speed = ours["samples_per_s"] / peer["samples_per_s"]
    mem = ours["peak_rss_mib"] / peer["peak_rss_mib"]
    mem_setup = ours["peak_after_setup_mib"] / peer["peak_after_setup_mib"]
    steady = (ours["steady_peak_rss_mib"] / peer["steady_peak_rss_mib"]
              if ours["steady_peak_rss_mib"] and peer["steady_peak_rss_mib"] else None)
    per_token = speed * ours["tokens"] / peer["tokens"]
    result["ratios"] = {"samples_per_s": speed, "tokens_per_s": per_token, "peak_rss": mem,
                        "peak_after_setup": mem_setup, "steady_peak_rss": steady}
    result["goals"] = {"speedup": GOAL_SPEEDUP, "speedup_met": speed >= GOAL_SPEEDUP,
                       "memory": GOAL_MEMORY, "memory_met": mem <= GOAL_MEMORY}
    print()
    print(f"ours/peer samples/s   {speed:.2f}x   (goal >= {GOAL_SPEEDUP}x: "
          f"{'MET' if speed >= GOAL_SPEEDUP else 'NOT MET'}); tokens/s {per_token:.2f}x")
    print(f"ours/peer peak RSS    {mem:.2f}x   (goal <= {GOAL_MEMORY}x: "
          f"{'MET' if mem <= GOAL_MEMORY else 'NOT MET'}); peak-after-setup {mem_setup:.2f}x; "
          f"steady {_fmt(steady, '.2f')}x")
  busy = [r["framework"] for r in rows if (r["other_load"] or 0.0) > 0.1]
  if busy:
    print(f"WARNING: other processes used > 0.1 cores during the timed steps of {busy} "
          "(column 'other'): timings are contaminated; rerun on an idle machine")
  return result


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
