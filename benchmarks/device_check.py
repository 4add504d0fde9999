r"""The accelerator check: one script, one run, every figure the accelerator issue asks for.

  # on the GPU machine (its own JAX/flax/optax/orbax/torch; no TensorFlow, no network):
  PYTHONPATH=.:.device_wheels python benchmarks/device_check.py --out $OUT --data .device_data
  # here, on CPU at toy shapes (what tests/test_device_check.py runs in CI):
  python benchmarks/device_check.py --smoke --out /tmp/device_check --data ../shared/data/hcp_rest_aal94

Measures, each section on its own (a failing section is recorded and the rest still run):
  1. train steps of the `13m` and `111m` presets in bf16 compute / fp32 params, at a fixed common
     batch and at the largest batch that fits (XLA's memory analysis before running; see
     training/memory.py): step time, samples/s, tokens/s, MFU (XLA cost-analysis FLOPs against the
     device's dense bf16 peak: 989 TFLOP/s on H100/H200), peak device memory; `650m` with full
     remat at the common batch if it fits;
  2. the PyTorch peer (HF ViTMAEForPreTraining, bf16 autocast, SDPA, fused AdamW; eager and
     torch.compile, the faster reported) at the same widths, depths, token count and batch, and
     the ratios ours / peer (samples/s, peak memory);
  3. cuDNN flash attention against XLA attention: values and gradients, and their speed;
  4. `--train-steps` bf16 training steps on the real recordings in --data: loss finite and falling.
Writes OUT/device_check.json and OUT/device_check.md; exits 1 if any section failed.
Nothing here imports TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

A424 = os.path.join(REPO, "..", "shared", "data", "atlases", "A424", "A424_Coordinates.dat")


def _config(preset: str, batch: int, dtype: str, smoke: bool):
  from configs import pretrain  # pylint: disable=import-outside-toplevel
  c = pretrain.get_config("tiny" if smoke else preset)
  c.data.path = ""
  c.data.coords = ""
  c.data.num_parcels = 24 if smoke else 424
  c.model.dtype = dtype
  c.train.batch_size = batch
  c.mesh.num_devices = 1
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  if preset == "650m":
    c.model.remat = "full"
  if smoke:
    c.preset = f"{preset} (smoke: tiny shapes)"
    c.data.window = 40
    c.model.patch_len = 10
  return c


def _log(msg: str) -> None:
  print(f"[device_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _section(results: dict, name: str, fn, *args, **kw):
  t = time.perf_counter()
  try:
    out = fn(*args, **kw)
    results["sections"][name] = {"ok": True, "seconds": time.perf_counter() - t, "result": out}
  except Exception as e:  # pylint: disable=broad-except  # record it, run the other sections
    _log(f"{name} FAILED: {type(e).__name__}: {e}")
    results["sections"][name] = {"ok": False, "seconds": time.perf_counter() - t,
                                 "error": f"{type(e).__name__}: {e}",
                                 "traceback": traceback.format_exc()[-4000:]}


def _train_row(args, preset: str, batch: int, label: str) -> dict:
  """One train-step row; a failure becomes a row with 'error' (the other rows still run)."""
  from brainlm_jax.tools import bench  # pylint: disable=import-outside-toplevel
  _log(f"{preset} bf16 at batch {batch} ({label})")
  try:
    row = bench.bench_train_step(_config(preset, batch, "bfloat16", args.smoke), steps=args.steps,
                                 warmup=args.warmup, log=_log)
  except Exception as e:  # pylint: disable=broad-except  # recorded in the table
    _log(f"{preset} at batch {batch} FAILED: {type(e).__name__}: {e}")
    return {"name": f"brainlm_jax {preset}", "label": label, "batch_requested": batch,
            "error": f"{type(e).__name__}: {str(e)[:300]}"}
  row["label"] = label
  return _slim(row)


def _presets(args) -> list[str]:
  return ["13m"] if args.smoke else ["13m", "111m"]


def train_steps(args) -> list[dict]:
  """The presets' train steps at the common batch (what the peer is compared with)."""
  return [_train_row(args, preset, args.batch, "common") for preset in _presets(args)]


def train_largest(args, common: list[dict]) -> list[dict]:
  """The presets' train steps at the largest batch that fits: asks for --largest, or less where
  the common row's memory analysis, scaled linearly, says less fits (saves compiling a step
  that cannot run; bench_train_step re-checks and shrinks further if needed)."""
  from brainlm_jax.training import memory  # pylint: disable=import-outside-toplevel
  rows = []
  for preset in _presets(args):
    want = args.largest
    row = next((r for r in common if r["name"].startswith(f"brainlm_jax {preset} ")
                and "step_memory_mib" in r), None)
    have, _ = memory.available_bytes()
    if row and have and row.get("step_memory_mib") and row.get("xla_argument_mib"):
      batch_input = row["batch"] * row["tokens"] * row["model"]["patch_len"] * 4  # float32
      state = max(row["xla_argument_mib"] * 2**20 - batch_input, 0)
      fit = memory.fitting_batch(int(row["step_memory_mib"] * 2**20), row["batch"], batch_input,
                                 int(state), have)
      if fit:
        want = min(want, fit)
    rows.append(_train_row(args, preset, want, "largest"))
  return rows


def train_650m(args) -> list[dict]:
  """`650m` with full remat at the common batch, on the one device, if it fits."""
  return [_train_row(args, "650m", args.batch, "common")]


def _slim(row: dict) -> dict:
  keep = ("name", "label", "framework", "device", "platform", "dtype", "batch", "batch_requested",
          "batch_note", "tokens", "params", "compile_s", "step_s", "samples_per_s", "tokens_per_s",
          "mfu", "flops_per_step", "peak_flops_per_device", "device_peak_mib", "step_memory_mib",
          "attention", "remat", "scan_layers", "final_loss", "versions", "model",
          "visible_tokens", "peak_rss_mib", "xla_argument_mib", "flops_source")
  return {k: row.get(k) for k in keep if k in row}


def _ours_shape(preset: str, args) -> tuple[dict, float]:
  """(our ModelConfig fields, effective mask ratio) at `preset`, without touching the device."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from brainlm_jax.models import masking  # pylint: disable=import-outside-toplevel
  from brainlm_jax.training import state as state_lib  # pylint: disable=import-outside-toplevel
  c = _config(preset, args.batch, "bfloat16", args.smoke)
  mcfg = state_lib.model_config(c, c.data.num_parcels, False)
  tokens = mcfg.num_parcels * mcfg.num_patches
  visible = masking.num_visible(c.masking.mode, mcfg.num_parcels, mcfg.num_patches,
                                c.masking.ratio, c.masking.forecast_patches)
  return dataclasses.asdict(mcfg), 1.0 - visible / tokens


def peers(args) -> list[dict]:
  """The PyTorch peer at each preset's shape and the common batch, eager and (--peer-compile)
  torch.compile, the faster kept. Runs first, in worker processes, before JAX has taken any
  device memory (a second run that measured ours first saw JAX's allocator hold 97 GiB and the
  111m peer fail for want of memory)."""
  from brainlm_jax.tools import torch_peer  # pylint: disable=import-outside-toplevel
  os.environ["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in os.environ.get(
      "PYTHONPATH", "").split(os.pathsep) if p])
  out = []
  for preset in _presets(args):
    model, ratio = _ours_shape(preset, args)
    best = None
    modes = (False, True) if preset in args.peer_compile.split(",") and not args.smoke else (False,)
    for compiled in modes:
      shape = {**torch_peer.peer_shape(model, args.batch, ratio, "bfloat16"), "compile": compiled}
      _log(f"peer for {preset}: {shape}")
      try:
        peer = torch_peer.peer_row(shape, steps=args.steps, warmup=args.warmup)
      except RuntimeError as e:
        _log(f"peer failed: {e}")
        continue
      if best is None or peer["samples_per_s"] > best["samples_per_s"]:
        best = peer
    if best is not None:
      out.append({"preset": preset, "batch": args.batch, "peer": _slim(best)})
  return out


def ratios(peer_rows: list[dict], ours: list[dict]) -> list[dict]:
  """ours / peer at the common batch: samples/s and peak device memory (host RSS on CPU)."""
  out = []
  for p in peer_rows:
    row = next((r for r in ours if r["name"].startswith(f"brainlm_jax {p['preset']} ")
                and "samples_per_s" in r), None)
    if row is None:
      continue
    mem_ours = row.get("device_peak_mib") or row.get("peak_rss_mib")
    mem_peer = p["peer"].get("device_peak_mib") or p["peer"].get("peak_rss_mib")
    out.append({"ours": row["name"], "batch": row["batch"], "peer": p["peer"],
                "samples_per_s_ratio": row["samples_per_s"] / p["peer"]["samples_per_s"],
                "peak_memory_ratio": (mem_ours / mem_peer) if mem_ours and mem_peer else None})
  return out


def attention(args) -> dict:
  """cuDNN flash attention (ours: padded to a multiple of 64 where needed) against XLA's, values
  and gradients, at a length cuDNN takes as is (2048) and at the encoder's 849 (padded)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from brainlm_jax.models import attention as attention_lib  # pylint: disable=import-outside-toplevel
  shapes = [(2, 64, 2, 16), (2, 49, 2, 16)] if args.smoke else [(8, 2048, 16, 64), (8, 849, 16, 64)]
  rows = []
  for b, s, h, d in shapes:
    rng = np.random.default_rng(0)
    q, k, v, ct = (jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.bfloat16) for _ in range(4))

    def make(impl):
      attend = lambda q, k, v: attention_lib.dot_product_attention(  # noqa: E731
          q, k, v, implementation=impl)  # pylint: disable=cell-var-from-loop
      loss = lambda q, k, v: (attend(q, k, v).astype(jnp.float32)  # noqa: E731
                              * ct.astype(jnp.float32)).sum()  # pylint: disable=cell-var-from-loop
      return jax.jit(attend), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    def timed(fn):
      jax.block_until_ready(fn(q, k, v))  # pylint: disable=cell-var-from-loop
      t = time.perf_counter()
      for _ in range(10):
        out = fn(q, k, v)  # pylint: disable=cell-var-from-loop
      jax.block_until_ready(out)
      return out, (time.perf_counter() - t) / 10

    ref_fwd, ref_grad = make("xla")
    (ref_out, ref_s), (ref_g, ref_gs) = timed(ref_fwd), timed(ref_grad)
    row = {"shape": [b, s, h, d], "dtype": "bfloat16", "xla_fwd_s": ref_s, "xla_grad_s": ref_gs}
    rows.append(row)
    if jax.devices()[0].platform != "gpu":
      row["cudnn"] = "skipped: cuDNN attention needs an NVIDIA GPU"
      continue
    fwd, grad = make("cudnn")
    (out, t_f), (g, t_g) = timed(fwd), timed(grad)
    diff = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))  # noqa: E731
    row.update({
        "padded_to": -(-s // attention_lib.CUDNN_SEQ_MULTIPLE) * attention_lib.CUDNN_SEQ_MULTIPLE,
        "cudnn_fwd_s": t_f, "cudnn_grad_s": t_g,
        "max_abs_diff_out": diff(out, ref_out),
        "max_abs_diff_grads": [diff(a, r) for a, r in zip(g, ref_g)],
        "ref_max_abs_out": float(jnp.max(jnp.abs(ref_out.astype(jnp.float32)))),
    })
    row["match"] = bool(row["max_abs_diff_out"] < 0.05 and max(row["max_abs_diff_grads"]) < 0.1)
  return {"shapes": rows}


def real_training(args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from brainlm_jax.data import datasets  # pylint: disable=import-outside-toplevel
  from brainlm_jax.data.scaling import RobustScaler  # pylint: disable=import-outside-toplevel
  from brainlm_jax.models import build_model  # pylint: disable=import-outside-toplevel
  from brainlm_jax.training import sharding, state as state_lib, steps  # pylint: disable=import-outside-toplevel
  if not args.data:
    raise ValueError("--data: a folder of real recordings is needed for this section")
  config = _config("13m", args.batch, "bfloat16", args.smoke)
  window = config.data.window
  recs, skipped = datasets.load_recordings(args.data, window=window)
  if not recs:
    raise ValueError(f"{args.data}: no usable recording (skipped: {skipped})")
  scaler = RobustScaler().fit(recs)
  scaled = [scaler.transform(r.signal, r.path) for r in recs]
  config.data.num_parcels = recs[0].num_parcels
  config.train.warmup_steps = max(1, args.train_steps // 10)
  config.train.num_steps = args.train_steps
  config.train.learning_rate = 1e-3
  mcfg = state_lib.model_config(config, recs[0].num_parcels, False)
  mesh = sharding.create_mesh(config.mesh)
  tx = state_lib.make_optimizer(config.train)
  state, shardings = state_lib.create_train_state(mcfg, tx, mesh, config.seed)
  rng = np.random.default_rng(0)
  losses = []
  t0 = time.perf_counter()
  with sharding.use_mesh(mesh):
    step = steps.make_train_step(build_model(mcfg), tx, config, mesh, shardings)
    for _ in range(args.train_steps):
      picks = rng.integers(len(scaled), size=config.train.batch_size)
      batch = np.stack([scaled[i][s:s + window].T for i, s in zip(
          picks, (rng.integers(scaled[i].shape[0] - window + 1) for i in picks))])
      state, m = step(state, steps.to_global({"signal": batch.astype(np.float32)}, mesh), None)
      losses.append(m["train_loss"])
  losses = np.asarray(jax.device_get(losses), np.float64)
  k = max(1, len(losses) // 10)
  first, last = float(losses[:k].mean()), float(losses[-k:].mean())
  return {"recordings": len(recs), "skipped": len(skipped), "parcels": recs[0].num_parcels,
          "steps": len(losses), "batch": config.train.batch_size, "dtype": "bfloat16",
          "seconds": time.perf_counter() - t0, "first_loss": first, "last_loss": last,
          "finite": bool(np.isfinite(losses).all()), "falling": bool(last < first)}


# First match wins: cuDNN's flash kernels are named like 'cudnn_generated_..._sdpa_sm90_flash_...'.
_CATEGORIES = (("attention", ("sdpa", "fmha", "flash", "cudnn", "attention", "softmax")),
               ("padding for cuDNN", ("pad_fusion", "slice_fusion")),
               ("matmul", ("gemm", "cublas", "nvjet", "xmma", "dot", "matmul")),
               ("copies/transposes", ("copy", "transpose", "memcpy", "memset")))


def profile(args) -> list[dict]:
  """`_profile` of each of --profile-presets (smoke: 13m); a failure becomes a row with 'error'."""
  rows = []
  for preset in ["13m"] if args.smoke else args.profile_presets.split(","):
    try:
      rows.append(_profile(args, preset))
    except Exception as e:  # pylint: disable=broad-except  # recorded in the result
      _log(f"profile of {preset} FAILED: {type(e).__name__}: {e}")
      rows.append({"preset": preset, "error": f"{type(e).__name__}: {str(e)[:300]}"})
  return rows


def _profile(args, preset: str) -> dict:
  """Where the step's time goes: three steps of `preset` at the common batch under jax.profiler.trace,
  device kernel time summed by name and by rough category (matmul, attention, copies, the rest:
  fusions of elementwise ops, norms and the optimizer update), against the step's wall time."""
  import glob  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  from brainlm_jax.tools import bench  # pylint: disable=import-outside-toplevel
  trace_dir = tempfile.mkdtemp(prefix="device_check_trace_")
  row = bench.bench_train_step(_config(preset, args.batch, "bfloat16", args.smoke), steps=2,
                               warmup=1, log=_log, profile_dir=trace_dir)
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {trace_dir}")
  if os.path.getsize(files[0]) < 15 * 2**20:
    shutil.copy(files[0], os.path.join(args.out, f"trace_{preset}.xplane.pb"))
  return {"preset": preset, "batch": row["batch"], "step_s": row["step_s"], "mfu": row.get("mfu"),
          **summarize_trace(files[0], steps=3, step_s=row["step_s"])}


def summarize_trace(path: str, steps: int, step_s: float) -> dict:
  """Device kernel time per step from a jax.profiler .xplane.pb: by category and the top 20 names;
  `host_gap_share` is the part of the step's wall time with no kernel running (streams summed)."""
  from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
  by_name: dict[str, float] = {}
  lines_used = []
  for plane in ProfileData.from_file(path).planes:
    if not plane.name.startswith("/device:"):
      continue
    lines = {line.name: line for line in plane.lines}
    # 'XLA Ops' names HLO ops (one event per op launch); else the streams' kernels.
    chosen = [lines["XLA Ops"]] if "XLA Ops" in lines else [
        l for n, l in lines.items() if n.startswith("Stream")]
    for line in chosen:
      lines_used.append(f"{plane.name}/{line.name}")
      for e in line.events:
        by_name[e.name[:100]] = by_name.get(e.name[:100], 0.0) + e.duration_ns * 1e-9
  busy = sum(by_name.values()) / steps
  cats: dict[str, float] = {}
  for name, secs in by_name.items():
    low = name.lower()
    cat = next((c for c, keys in _CATEGORIES if any(k in low for k in keys)), "other fusions")
    cats[cat] = cats.get(cat, 0.0) + secs / steps
  top = sorted(by_name.items(), key=lambda kv: -kv[1])[:20]
  return {"lines": lines_used, "device_busy_s_per_step": busy,
          "host_gap_share": (1 - busy / step_s) if by_name else None,
          "by_category_s_per_step": cats, "top_ops_s_per_step": [[n, t / steps] for n, t in top]}


def _fmt(x, spec="", scale=1.0):
  return "-" if x is None else format(x * scale, spec)


def markdown(results: dict) -> str:
  s = results["sections"]
  lines = [f"# Device check: {results.get('device', '?')} (JAX {results.get('jax', '?')})", "",
           f"Command: `{results['command']}`", ""]
  rows = [r for name in ("train_steps", "train_largest", "train_650m")
          for r in (s.get(name, {}).get("result") or [])]
  if rows:
    lines += ["| model | batch | step s | samples/s | tokens/s | MFU | peak MiB | note |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
      if "error" in r:
        lines.append(f"| {r['name']} | - | - | - | - | - | - | {r['error']} |")
        continue
      lines.append(
          f"| {r['name']} ({r['label']}) | {r['batch']} | {r['step_s']:.4f} | "
          f"{r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {_fmt(r.get('mfu'), '.1%')} | "
          f"{_fmt(r.get('device_peak_mib') or r.get('peak_rss_mib'), '.0f')} | "
          f"{r.get('batch_note') or ''} |")
  pairs = results.get("ratios") or []
  if pairs:
    lines += ["", "| ours | batch | peer samples/s | ours/peer samples/s | ours/peer peak memory |",
              "|---|---:|---:|---:|---:|"]
    for p in pairs:
      lines.append(f"| {p['ours']} | {p['batch']} | {p['peer']['samples_per_s']:.1f} "
                   f"({p['peer']['name']}) | {p['samples_per_s_ratio']:.2f}x | "
                   f"{_fmt(p['peak_memory_ratio'], '.2f')}x |")
  for name in ("attention", "real_training", "profile"):
    if s.get(name, {}).get("ok") and "result" in s[name]:
      lines += ["", f"{name}: `{json.dumps(s[name]['result'])}`"]
  failed = [k for k, v in s.items() if not v["ok"] and "error" in v]
  if failed:
    lines += [""] + [f"FAILED {k}: {s[k]['error']}" for k in failed]
  return "\n".join(lines) + "\n"


def _write(results: dict, out: str) -> None:
  results["tensorflow_loaded"] = "tensorflow" in sys.modules
  with open(os.path.join(out, "device_check.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1, default=str)
  with open(os.path.join(out, "device_check.md"), "w", encoding="utf-8") as f:
    f.write(markdown(results))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.environ.get("OUT", "device_check_out"))
  p.add_argument("--data", default=None, help="real recordings for the training section")
  p.add_argument("--smoke", action="store_true", help="toy shapes (CPU): the script's own test")
  p.add_argument("--batch", type=int, default=None, help="the common batch (default 64; smoke 4)")
  p.add_argument("--largest", type=int, default=None,
                 help="requested 'largest' batch, cut to what fits (default 4096; smoke 16)")
  p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--train-steps", type=int, default=None, help="default 200; smoke 5")
  p.add_argument("--peer-compile", default="13m,111m",
                 help="presets whose peer is also timed under torch.compile")
  p.add_argument("--profile-presets", default="13m,111m", help="presets profiled (smoke: 13m)")
  p.add_argument("--skip", default="", help="comma-separated sections to skip")
  p.add_argument("--budget-s", type=float, default=0,
                 help="start no section after this many seconds (0: no limit)")
  args = p.parse_args(argv)
  args.batch = args.batch or (4 if args.smoke else 64)
  args.largest = args.largest or (16 if args.smoke else 4096)
  args.steps = args.steps or (2 if args.smoke else 10)
  args.train_steps = args.train_steps or (5 if args.smoke else 200)
  os.makedirs(args.out, exist_ok=True)
  skip = set(filter(None, args.skip.split(",")))
  # JAX's GPU client is created (and takes 75% of the device's memory, one contiguous pool) at
  # the first section after the peer's; the peer's worker processes have the device to
  # themselves. (A run with XLA_PYTHON_CLIENT_PREALLOCATE=false instead let the pool grow in
  # pieces, and a 94 GiB temp buffer then failed to fit beside 10 GiB of older pieces.)
  results = {"command": " ".join(sys.argv), "smoke": args.smoke, "sections": {}}
  t0 = time.perf_counter()
  # The peer first (before JAX holds device memory), then the most wanted: a run cut short by its
  # time limit still leaves those on disk.
  for name, fn in (("peers", peers), ("attention", attention), ("train_steps", train_steps),
                   ("profile", profile), ("train_largest", train_largest),
                   ("real_training", real_training), ("train_650m", train_650m)):
    if name in skip or (name == "train_650m" and args.smoke):
      continue
    if args.budget_s and time.perf_counter() - t0 > args.budget_s:
      results["sections"][name] = {"ok": True, "skipped": f"time budget of {args.budget_s} s spent"}
      continue
    if name != "peers" and "device" not in results:
      import jax  # pylint: disable=import-outside-toplevel
      results.update({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                      "platform": jax.devices()[0].platform})
    if name == "train_largest":
      ours = (results["sections"].get("train_steps") or {}).get("result") or []
      _section(results, name, fn, args, ours)
    else:
      _section(results, name, fn, args)
    if name == "train_steps" and results["sections"].get("peers", {}).get("ok"):
      results["ratios"] = ratios(results["sections"]["peers"]["result"],
                                 results["sections"]["train_steps"].get("result") or [])
    _write(results, args.out)
  _write(results, args.out)
  print(markdown(results))
  failed = [r for name in ("train_steps", "train_largest", "train_650m")
            for r in (results["sections"].get(name, {}).get("result") or []) if "error" in r]
  return 0 if all(v["ok"] for v in results["sections"].values()) and not failed else 1


if __name__ == "__main__":
  sys.exit(main())
