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


def train_steps(args) -> list[dict]:
  from brainlm_jax.tools import bench  # pylint: disable=import-outside-toplevel
  rows = []
  presets = [("13m", args.batch)] if args.smoke else [("13m", args.batch), ("111m", args.batch)]
  for preset, batch in presets:
    for label, b in (("common", batch), ("largest", args.largest)):
      _log(f"{preset} bf16 at batch {b} ({label})")
      row = bench.bench_train_step(_config(preset, b, "bfloat16", args.smoke), steps=args.steps,
                                   warmup=args.warmup, log=_log)
      row["label"] = label
      rows.append(_slim(row))
  if args.smoke:
    return rows
  _log("650m bf16, full remat, common batch")
  try:
    row = bench.bench_train_step(_config("650m", args.batch, "bfloat16", args.smoke),
                                 steps=args.steps, warmup=args.warmup, log=_log)
    row["label"] = "common"
    rows.append(_slim(row))
  except MemoryError as e:
    rows.append({"name": "brainlm_jax 650m", "label": "common", "error": str(e)})
  return rows


def _slim(row: dict) -> dict:
  keep = ("name", "label", "framework", "device", "platform", "dtype", "batch", "batch_requested",
          "batch_note", "tokens", "params", "compile_s", "step_s", "samples_per_s", "tokens_per_s",
          "mfu", "flops_per_step", "peak_flops_per_device", "device_peak_mib", "step_memory_mib",
          "attention", "remat", "scan_layers", "final_loss", "versions", "model",
          "visible_tokens", "peak_rss_mib")
  return {k: row.get(k) for k in keep if k in row}


def peers(args, ours: list[dict]) -> list[dict]:
  from brainlm_jax.tools import torch_peer  # pylint: disable=import-outside-toplevel
  os.environ["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in os.environ.get(
      "PYTHONPATH", "").split(os.pathsep) if p])
  out = []
  for row in ours:
    if row.get("label") != "common" or "model" not in row:
      continue
    ratio = 1.0 - row["visible_tokens"] / row["tokens"]
    best = None
    for compiled in (False, True) if not args.smoke else (False,):
      shape = {**torch_peer.peer_shape(row["model"], row["batch"], ratio, "bfloat16"),
               "compile": compiled}
      _log(f"peer for {row['name']}: {shape}")
      try:
        peer = torch_peer.peer_row(shape, steps=args.steps, warmup=args.warmup)
      except RuntimeError as e:
        _log(f"peer failed: {e}")
        continue
      if best is None or peer["samples_per_s"] > best["samples_per_s"]:
        best = peer
    if best is None:
      continue
    mem_ours = row.get("device_peak_mib") or row.get("peak_rss_mib")
    mem_peer = best.get("device_peak_mib") or best.get("peak_rss_mib")
    out.append({"ours": row["name"], "batch": row["batch"], "peer": _slim(best),
                "samples_per_s_ratio": row["samples_per_s"] / best["samples_per_s"],
                "peak_memory_ratio": (mem_ours / mem_peer) if mem_ours and mem_peer else None})
  return out


def attention(args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  b, s, h, d = (2, 64, 2, 16) if args.smoke else (8, 2048, 16, 64)
  rng = np.random.default_rng(0)
  q, k, v, ct = (jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.bfloat16) for _ in range(4))

  def make(impl):
    def loss(q, k, v):
      return (jax.nn.dot_product_attention(q, k, v, implementation=impl).astype(jnp.float32)
              * ct.astype(jnp.float32)).sum()
    fwd = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl))
    return fwd, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

  def timed(fn):
    jax.block_until_ready(fn(q, k, v))
    t = time.perf_counter()
    for _ in range(10):
      out = fn(q, k, v)
    jax.block_until_ready(out)
    return out, (time.perf_counter() - t) / 10

  ref_fwd, ref_grad = make("xla")
  (ref_out, ref_s), (ref_g, ref_gs) = timed(ref_fwd), timed(ref_grad)
  result = {"shape": [b, s, h, d], "dtype": "bfloat16", "xla_fwd_s": ref_s, "xla_grad_s": ref_gs}
  if jax.devices()[0].platform != "gpu":
    result["cudnn"] = "skipped: cuDNN attention needs an NVIDIA GPU"
    return result
  fwd, grad = make("cudnn")
  (out, t_f), (g, t_g) = timed(fwd), timed(grad)
  diff = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))  # noqa: E731
  result.update({
      "cudnn_fwd_s": t_f, "cudnn_grad_s": t_g,
      "max_abs_diff_out": diff(out, ref_out),
      "max_abs_diff_grads": [diff(a, r) for a, r in zip(g, ref_g)],
      "ref_max_abs_out": float(jnp.max(jnp.abs(ref_out.astype(jnp.float32)))),
  })
  result["match"] = bool(result["max_abs_diff_out"] < 0.05
                         and max(result["max_abs_diff_grads"]) < 0.1)
  return result


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


def _fmt(x, spec="", scale=1.0):
  return "-" if x is None else format(x * scale, spec)


def markdown(results: dict) -> str:
  s = results["sections"]
  lines = [f"# Device check: {results['device']} (JAX {results['jax']})", "",
           f"Command: `{results['command']}`", ""]
  rows = s.get("train_steps", {}).get("result") or []
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
  pairs = s.get("peers", {}).get("result") or []
  if pairs:
    lines += ["", "| ours | batch | peer samples/s | ours/peer samples/s | ours/peer peak memory |",
              "|---|---:|---:|---:|---:|"]
    for p in pairs:
      lines.append(f"| {p['ours']} | {p['batch']} | {p['peer']['samples_per_s']:.1f} "
                   f"({p['peer']['name']}) | {p['samples_per_s_ratio']:.2f}x | "
                   f"{_fmt(p['peak_memory_ratio'], '.2f')}x |")
  for name in ("attention", "real_training"):
    if s.get(name, {}).get("ok"):
      lines += ["", f"{name}: `{json.dumps(s[name]['result'])}`"]
  failed = [k for k, v in s.items() if not v["ok"]]
  if failed:
    lines += [""] + [f"FAILED {k}: {s[k]['error']}" for k in failed]
  return "\n".join(lines) + "\n"


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
  p.add_argument("--skip", default="", help="comma-separated sections to skip")
  args = p.parse_args(argv)
  args.batch = args.batch or (4 if args.smoke else 64)
  args.largest = args.largest or (16 if args.smoke else 4096)
  args.steps = args.steps or (2 if args.smoke else 10)
  args.train_steps = args.train_steps or (5 if args.smoke else 200)
  os.makedirs(args.out, exist_ok=True)
  import jax  # pylint: disable=import-outside-toplevel
  skip = set(filter(None, args.skip.split(",")))
  results = {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
             "jax": jax.__version__, "command": " ".join(sys.argv), "smoke": args.smoke,
             "sections": {}}
  for name, fn, fargs in (("train_steps", train_steps, (args,)),
                          ("attention", attention, (args,)),
                          ("real_training", real_training, (args,))):
    if name not in skip:
      _section(results, name, fn, *fargs)
  ours = (results["sections"].get("train_steps") or {}).get("result") or []
  if "peers" not in skip and ours:
    _section(results, "peers", peers, args, ours)
  results["tensorflow_loaded"] = "tensorflow" in sys.modules
  with open(os.path.join(args.out, "device_check.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1, default=str)
  with open(os.path.join(args.out, "device_check.md"), "w", encoding="utf-8") as f:
    f.write(markdown(results))
  print(markdown(results))
  return 0 if all(v["ok"] for v in results["sections"].values()) else 1


if __name__ == "__main__":
  sys.exit(main())
