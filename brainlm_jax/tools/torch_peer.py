"""The PyTorch peer of our train step: Hugging Face `ViTMAEForPreTraining` at our widths, depths
and token count, timed in its own process (its own peak RSS).

  shape = peer_shape(our_row["model"], batch, mask_ratio, dtype)
  row = peer_row(shape, steps=5, warmup=2, threads=2)   # python -m brainlm_jax.tools.torch_peer
  flops = peer_flops(shape)                              # torch's FlopCounterMode, meta device
Needs torch and transformers (the `bench` / `test` extras).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Callable

from brainlm_jax.tools.measure import MIB, best_rate, finish_row, limit_cpus, malloc_trim
from brainlm_jax.tools.measure import measure, rss_mib


def torch_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """The same for torch: float32 n x n matmul FLOP/s on this process's CPUs."""
  import torch  # pylint: disable=import-outside-toplevel
  a = torch.randn(n, n)
  return best_rate(lambda: a @ a, 2.0 * n ** 3, repeats)


def peer_shape(model: dict, batch: int, mask_ratio: float, dtype: str = "float32") -> dict:
  """The peer's settings for our model (a row's `model`: ModelConfig fields): same widths and
  depths; a square grid of 16 x 16 one-channel patches with about our token count (HF's 2-D
  sin-cos position table needs a square grid)."""
  m = model
  side = max(1, round((m["num_parcels"] * (m["window"] // m["patch_len"])) ** 0.5))
  keys = ("hidden_size", "num_layers", "num_heads", "mlp_dim", "decoder_hidden_size",
          "decoder_num_layers", "decoder_num_heads", "decoder_mlp_dim")
  return {**{k: m[k] for k in keys}, "image_size": 16 * side, "patch_size": 16, "batch": batch,
          "mask_ratio": mask_ratio, "dtype": dtype}


def _peer_model(s: dict):
  """transformers.ViTMAEForPreTraining at the peer shape `s` (see `peer_shape`), SDPA attention."""
  from transformers import ViTMAEConfig, ViTMAEForPreTraining  # pylint: disable=import-outside-toplevel
  cfg = ViTMAEConfig(
      hidden_size=s["hidden_size"], num_hidden_layers=s["num_layers"],
      num_attention_heads=s["num_heads"], intermediate_size=s["mlp_dim"],
      decoder_hidden_size=s["decoder_hidden_size"],
      decoder_num_hidden_layers=s["decoder_num_layers"],
      decoder_num_attention_heads=s["decoder_num_heads"],
      decoder_intermediate_size=s["decoder_mlp_dim"], image_size=s["image_size"],
      patch_size=s["patch_size"], num_channels=1, mask_ratio=s["mask_ratio"],
      attn_implementation="sdpa")
  return ViTMAEForPreTraining(cfg)


def peer_worker(shape: dict, *, steps: int, warmup: int,
                log: Callable[[str], None] = lambda _: None) -> dict:
  """Builds and times the peer in this process (torch + transformers). Returns a row."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_interop_threads(1)
  import transformers  # pylint: disable=import-outside-toplevel
  from torch.nn.attention import SDPBackend  # pylint: disable=import-outside-toplevel

  import_rss = rss_mib()
  torch.manual_seed(0)
  s = shape
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = _peer_model(s).to(device)
  model.train()
  # Fused AdamW (one kernel for all parameters) where CUDA has it; torch.compile if asked.
  opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05,
                          fused=device == "cuda")
  if s.get("compile"):
    model = torch.compile(model)
  pixels = torch.randn(s["batch"], 1, s["image_size"], s["image_size"], device=device)
  n_tokens = (s["image_size"] // s["patch_size"]) ** 2
  malloc_trim()
  setup_rss = rss_mib()
  log(f"peer setup: {sum(p.numel() for p in model.parameters()):,} params, {n_tokens} tokens")
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=s["dtype"] == "bfloat16")
  box = {}

  def run_step():
    opt.zero_grad(set_to_none=True)
    with autocast:
      out = model(pixel_values=pixels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    box["loss"] = float(out.loss.detach())  # syncs

  # Which SDPA kernels the model calls (first step only).
  backends = {int(v): k for k, v in SDPBackend.__members__.items()}
  calls, original = [], torch.nn.functional.scaled_dot_product_attention

  def counting_sdpa(q, k, v, *a, **kw):
    try:
      choice = backends.get(int(torch._fused_sdp_choice(q, k, v, *a, **kw)), "?")  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except
      choice = "?"
    calls.append((tuple(q.shape), str(q.dtype).replace("torch.", ""), choice))
    return original(q, k, v, *a, **kw)

  first = {"done": False}

  def run_step_traced():
    if first["done"]:
      return run_step()
    torch.nn.functional.scaled_dot_product_attention = counting_sdpa
    try:
      run_step()
    finally:
      torch.nn.functional.scaled_dot_product_attention = original
      first["done"] = True

  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  out = measure(run_step_traced, steps=steps, warmup=warmup, batch=s["batch"], log=log)
  matmul_peak = torch_matmul_peak() if device == "cpu" else None  # after the timed steps
  visible = int(n_tokens * (1 - s["mask_ratio"]))
  out.update({
      "framework": "torch",
      "name": "HF ViTMAEForPreTraining (sdpa" + (", compiled)" if s.get("compile") else ")"),
      "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
      "device": (torch.cuda.get_device_name() if device == "cuda" else device),
      "platform": device, "batch": s["batch"], "dtype": s["dtype"],
      "tokens": n_tokens, "visible_tokens": visible, "encoder_seq": 1 + visible,
      "decoder_seq": 1 + n_tokens,
      "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
      "params_total": sum(p.numel() for p in model.parameters()),
      "attention": {"requested": "sdpa", "config": model.config._attn_implementation,  # pylint: disable=protected-access
                    "sdpa_calls_per_forward": len(calls),
                    "sdpa_kernels": sorted({f"{c[0]}:{c[1]}:{c[2]}" for c in calls})},
      "compile_s": None, "import_rss_mib": import_rss, "setup_rss_mib": setup_rss,
      "tokens_per_s": s["batch"] * n_tokens / out["step_s"],
      "device_peak_mib": (torch.cuda.max_memory_allocated() / MIB if device == "cuda"
                          else None),
      "final_loss": box["loss"], "matmul_peak_flops": matmul_peak,
  })
  return out


def peer_flops(shape: dict) -> float:
  """FLOPs of one peer train step (forward + backward) at `shape`, by torch's FlopCounterMode.

  Traced on the meta device (shapes only: no memory, no time) with SDPA's math backend, whose
  matmuls the counter sees (the fused CPU flash kernel has no FLOP formula); so attention's
  backward is counted without a flash kernel's recomputation, as XLA's cost analysis of ours is.
  The optimizer's elementwise work is not counted (~10 FLOPs per parameter: < 0.01% here).
  """
  import torch  # pylint: disable=import-outside-toplevel
  from torch.nn.attention import SDPBackend, sdpa_kernel  # pylint: disable=import-outside-toplevel
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=import-outside-toplevel
  with torch.device("meta"):
    model = _peer_model(shape)
    pixels = torch.empty(shape["batch"], 1, shape["image_size"], shape["image_size"])
  counter = FlopCounterMode(display=False)
  with sdpa_kernel(SDPBackend.MATH), counter:
    model(pixel_values=pixels).loss.backward()
  return float(counter.get_total_flops())


def peer_row(shape: dict, *, steps: int, warmup: int, threads: int | None = None) -> dict:
  """Runs `peer_worker` in a fresh Python (its own peak RSS; pinned to `threads` CPUs)."""
  spec = json.dumps({"shape": shape, "steps": steps, "warmup": warmup, "threads": threads})
  proc = subprocess.run([sys.executable, "-m", "brainlm_jax.tools.torch_peer", spec],
                        stdout=subprocess.PIPE, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    why = " (killed by SIGKILL: most likely out of memory)" if proc.returncode == -9 else ""
    raise RuntimeError(f"peer worker failed (exit {proc.returncode}){why}: {proc.stdout[-2000:]}")
  return json.loads(lines[-1])


def _main(argv: list[str]) -> None:
  """`python -m brainlm_jax.tools.torch_peer JSON`: the peer worker; prints its row as one JSON line."""
  if len(argv) != 2:
    raise SystemExit("usage: python -m brainlm_jax.tools.torch_peer '{\"shape\": ..., "
                     "\"steps\": N, \"warmup\": N, \"threads\": N}'")
  spec = json.loads(argv[1])
  t0 = time.perf_counter()
  threads = spec.get("threads")
  cpus = limit_cpus(threads) if threads else []
  if threads:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(threads)

  def log(msg):
    print(f"[torch {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

  row = peer_worker(spec["shape"], steps=spec["steps"], warmup=spec["warmup"], log=log)
  print(json.dumps(finish_row(row, t0, threads, cpus)), flush=True)


if __name__ == "__main__":
  _main(sys.argv)
