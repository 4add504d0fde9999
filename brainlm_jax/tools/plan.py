"""Plan a pretraining run on a Cloud TPU slice without one: compile the real step for it, read
memory, FLOPs, bytes and collectives off the compiled program, and bound its step time.

  row = plan(config, "v5e-16", num_slices=1, search_batch=True, log=print)

The step is the one `brainlm-pretrain` runs (`steps.make_train_step`, or `make_eval_step` with
step="eval"), with the project's mesh, logical-axis rules and shardings, built from shapes only
(`abstract_train_state`, `steps.abstract_batch`) and compiled by libtpu for compile-only devices
of the named topology (tools/tpu.py). A row holds:

  memory        per chip, the compiler's memory analysis: arguments, temporaries, total
                (`memory.step_bytes`) against HBM; fits = the TPU compiler accepted the program
                and the total is within HBM
  flops         model FLOPs per step, counted by hand (`bench.analytic_flops`: every matmul,
                forward + backward = 3 x forward; the bench's own fallback, so that a plan needs
                no second, unrolled trace of the step), and an estimate of the
                compiled program's matmul FLOPs per chip read from its HLO (remat included;
                tools/hlo.py)
  hbm_bytes     an estimate of the bytes per chip per step read from the HLO (tools/hlo.py: loops
                counted by their trip counts); the compiler's own count (`xla_cost_analysis`,
                a loop body counted once) is kept beside it
  collectives   by kind, from the HLO: count, bytes sent per chip (an estimate: ring algorithms),
                the share over DCN (across slices)
  roofline      an estimate: compute = max(model / chips, compiled) FLOPs / bf16 peak; hbm =
                bytes / HBM bandwidth; collectives = ICI bytes / (2 links x link bandwidth: a bidirectional
                ring along one torus dimension) + DCN bytes / DCN bandwidth; bound = the largest
                of the three (perfect overlap); mfu_bound = model FLOPs / (bound x peak x chips);
                intensity = the compute term's FLOPs per HBM byte (Pallas kernels' FLOPs are
                invisible in the HLO, so the model count stands in for them where larger)
  batch search  the largest global batch that compiles and fits, found by compiling: from the
                linear estimate (`memory.fitting_batch`), re-compiled until a fitting batch's
                next estimate adds nothing (or `max_compiles` is spent)
"""

from __future__ import annotations

import re
import time
from typing import Callable

from brainlm_jax.tools import hlo, tpu

GIB = 1024.0 ** 3


class DoesNotFit(RuntimeError):
  """The TPU compiler refused the program for want of HBM; `need` is its figure (bytes)."""

  def __init__(self, message: str, need: float | None):
    super().__init__(message)
    self.need = need


def _gib(text: str) -> float | None:
  m = re.search(r"([\d.]+)([KMGT])", text)
  if not m:
    return None
  return float(m.group(1)) * {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)]


def compile_step(config, devices, batch_size: int, *, num_parcels: int = 424,
                 step: str = "train") -> dict:
  """Compiles `config`'s train (or eval) step at global `batch_size` for `devices` (compile-only
  TPU devices, or any) from shapes alone. Returns {'compiled', 'compile_s', 'mesh', 'mcfg',
  'state_bytes', 'tx', 'abstract'}; raises DoesNotFit when the compiler runs out of HBM."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from brainlm_jax.models import build_model  # pylint: disable=import-outside-toplevel
  from brainlm_jax.training import memory, sharding  # pylint: disable=import-outside-toplevel
  from brainlm_jax.training import state as state_lib, steps  # pylint: disable=import-outside-toplevel
  config = config.copy_and_resolve_references()
  config.train.batch_size = int(batch_size)
  config.train.eval_batch_size = int(batch_size)
  platform = devices[0].platform
  state_lib.validate_config(config, len(devices), sharding.num_slices(devices))
  mesh = sharding.create_mesh(config.mesh, devices)
  mcfg = state_lib.model_config(config, num_parcels, bool(config.data.coords), platform)
  tx = state_lib.make_optimizer(config.train)
  abstract, shardings = state_lib.abstract_train_state(mcfg, tx, mesh)
  coords = (jax.ShapeDtypeStruct((num_parcels, 3), np.float32, sharding=sharding.replicated(mesh))
            if mcfg.spatial == "xyz" else None)
  t = time.perf_counter()
  try:
    with sharding.use_mesh(mesh):
      model = build_model(mcfg)
      if step == "train":
        batch = steps.abstract_batch(config, mcfg, batch_size, mesh)
        fn = steps.make_train_step(model, tx, config, mesh, shardings)
        compiled = fn.lower(abstract, batch, coords).compile()
      else:
        batch = steps.abstract_batch(config, mcfg, batch_size, mesh, train=False)
        fn = steps.make_eval_step(model, config, mesh, shardings.params)
        key = jax.ShapeDtypeStruct((2,), np.uint32, sharding=sharding.replicated(mesh))
        compiled = fn.lower(abstract.params, batch, coords, key).compile()
  except Exception as e:  # pylint: disable=broad-except
    msg = str(e)
    if "RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg:
      need = re.search(r"required for [^(]*\(([\d.]+[KMGT])", msg)
      raise DoesNotFit(msg.splitlines()[0][:400], _gib(need.group(1)) if need else None) from e
    raise
  return {"compiled": compiled, "compile_s": time.perf_counter() - t, "mesh": mesh,
          "mcfg": mcfg, "tx": tx, "abstract": abstract,
          "state_bytes": memory.tree_bytes(abstract if step == "train" else abstract.params)}


def model_flops(config, out: dict, batch_size: int) -> tuple[float, str]:
  """Model FLOPs of one global train step, as `brainlm-bench` counts them."""
  from brainlm_jax.models import masking as masking_lib  # pylint: disable=import-outside-toplevel
  from brainlm_jax.tools import bench  # pylint: disable=import-outside-toplevel
  mcfg = out["mcfg"]
  visible = masking_lib.num_visible(config.masking.mode, mcfg.num_parcels, mcfg.num_patches,
                                    config.masking.ratio, config.masking.forecast_patches)
  return bench.analytic_flops(mcfg, batch_size, visible), "counted matmuls (analytic_flops)"


def roofline(chip: tpu.Chip, chips: int, model: float, stats: hlo.Stats) -> dict:
  """Step-time bounds (s) and the MFU the bound allows; see the module docstring."""
  flops_chip = max(model / chips, stats.flops)
  compute = flops_chip / chip.peak_bf16
  hbm_s = stats.hbm_bytes / chip.hbm_bw
  ici = (stats.collective_bytes - stats.dcn_bytes) / (2 * chip.ici_link_bw)
  dcn = stats.dcn_bytes / chip.dcn_bw
  bound = max(compute, hbm_s, ici + dcn)
  limit = {compute: "compute", hbm_s: "HBM", ici + dcn: "collectives"}[bound]
  return {"compute_s": compute, "hbm_s": hbm_s, "ici_s": ici, "dcn_s": dcn, "bound_s": bound,
          "bound_by": limit, "mfu_bound": model / (bound * chip.peak_bf16 * chips) if bound else None,
          "intensity": flops_chip / stats.hbm_bytes if stats.hbm_bytes else None,
          "ridge": chip.ridge}


def reanalyse(row: dict, text: str) -> dict:
  """`row` with its HLO-derived figures (FLOPs, bytes, collectives, roofline) read again from the
  compiled program's text (`hlo_path`), e.g. after a change to tools/hlo.py, without compiling.
  Multi-slice meshes put the slices outermost (`sharding.create_mesh`), so device i of n is in
  slice i // (n / slices)."""
  chips, slices = int(row["chips"]), int(row["slices"])
  slice_of = (lambda i: i // (chips // slices)) if slices > 1 else None  # noqa: E731
  stats = hlo.analyse(text, slice_of, chips)
  chip = tpu.parse_topology(row["topology"]).chip
  return {**row, "compiled_flops_per_chip": stats.flops, "hbm_bytes_per_chip": stats.hbm_bytes,
          "collectives": stats.collectives, "loops": len(stats.loops),
          **roofline(chip, chips, row["model_flops"], stats)}


def describe(config, topology: str, num_slices: int, batch: int, out: dict,
             step: str = "train", hlo_path: str | None = None) -> dict:
  """The row of one compiled step (see the module docstring); `hlo_path`: also write the
  compiled program's HLO text there (to re-read it without compiling again)."""
  from brainlm_jax.models.brainlm import count_params  # pylint: disable=import-outside-toplevel
  from brainlm_jax.training import memory  # pylint: disable=import-outside-toplevel
  slice_ = tpu.parse_topology(topology)
  chip, mesh, compiled = slice_.chip, out["mesh"], out["compiled"]
  chips = int(mesh.devices.size)
  mem = compiled.memory_analysis()
  need = memory.step_bytes(mem) or 0
  slice_ids = {i: getattr(d, "slice_index", 0) for i, d in enumerate(mesh.devices.flat)}
  text = compiled.as_text()
  if hlo_path:
    with open(hlo_path, "w", encoding="utf-8") as f:
      f.write(text)
  stats = hlo.analyse(text, slice_ids.get if num_slices > 1 else None, chips)
  flops, source = model_flops(config, out, batch)
  if step != "train":
    flops /= 3.0  # forward only
  xla = compiled.cost_analysis()
  xla = (xla[0] if isinstance(xla, (list, tuple)) else xla) or {}
  mcfg = out["mcfg"]
  return {
      "preset": config.get("preset", "?"), "step": step, "topology": topology,
      "topology_name": slice_.topology_name, "slices": num_slices, "chips": chips,
      "device_kind": mesh.devices.flat[0].device_kind, "mesh": dict(mesh.shape),
      "params": count_params(out["abstract"].params), "batch": batch,
      "dtype": mcfg.dtype, "attention": mcfg.attention, "remat": mcfg.remat,
      "scan_layers": mcfg.scan_layers, "compile_s": out["compile_s"],
      "argument_gib": mem.argument_size_in_bytes / GIB, "temp_gib": mem.temp_size_in_bytes / GIB,
      "total_gib": need / GIB, "hbm_gib": chip.hbm_bytes / GIB,
      "fits": need <= chip.hbm_bytes, "state_gib": out["state_bytes"] / GIB,
      "model_flops": flops, "model_flops_source": source, "compiled_flops_per_chip": stats.flops,
      "hbm_bytes_per_chip": stats.hbm_bytes, "collectives": stats.collectives,
      "custom_calls": {k: v for k, v in stats.custom_calls.items() if "tpu_custom_call" in k},
      "loops": len(stats.loops),
      "xla_cost_analysis": {"flops": float(xla.get("flops", 0.0)),
                            "bytes_accessed": float(xla.get("bytes accessed", 0.0)),
                            "note": "a loop body counted once"},
      **roofline(chip, chips, flops, stats),
  }


def parcels_of(config) -> int:
  """Parcels the plan compiles for: model.num_parcels when set, else the rows of data.coords,
  else 424 (A424, BrainLM's atlas)."""
  if int(config.model.get("num_parcels", -1) or -1) > 0:
    return int(config.model.num_parcels)
  if config.data.get("coords"):
    from brainlm_jax.data import readers  # pylint: disable=import-outside-toplevel
    return len(readers.load_coordinates(config.data.coords))
  return 424


def plan(config, topology: str, *, num_slices: int = 1, batch: int | None = None,
         search_batch: bool = True, max_compiles: int = 3, step: str = "train",
         num_parcels: int | None = None, hlo_path: str | None = None,
         log: Callable[[str], None] = lambda _: None) -> dict:
  """Compiles `config`'s step for `num_slices` x `topology` at `batch` (default: the preset's
  global batch) and returns its row; with `search_batch`, also 'max_batch' (the largest batch
  found to compile and fit) and 'search' (every batch tried: fits, GiB, compile s)."""
  from brainlm_jax.training import memory, sharding  # pylint: disable=import-outside-toplevel
  devices = tpu.topology_devices(topology, num_slices)
  chip = tpu.parse_topology(topology).chip
  num_parcels = num_parcels or parcels_of(config)
  batch = int(batch or config.train.batch_size)
  tried: list[dict] = []

  def attempt(b):
    log(f"{config.get('preset', '?')} on {num_slices} x {topology}: compiling the {step} step "
        f"at global batch {b}")
    t = time.perf_counter()
    try:
      out = compile_step(config, devices, b, num_parcels=num_parcels, step=step)
    except DoesNotFit as e:
      tried.append({"batch": b, "fits": False, "total_gib": (e.need or 0) / GIB or None,
                    "compile_s": time.perf_counter() - t, "error": str(e)})
      log(f"  batch {b}: does not fit ({str(e)[:160]})")
      return None, e.need, None
    need = memory.step_bytes(out["compiled"].memory_analysis()) or 0
    fits = need <= chip.hbm_bytes
    tried.append({"batch": b, "fits": fits, "total_gib": need / GIB,
                  "compile_s": out["compile_s"]})
    log(f"  batch {b}: {'fits' if fits else 'does not fit'}, {need / GIB:.2f} GiB per chip of "
        f"{chip.hbm_bytes / GIB:.2f}; compiled in {out['compile_s']:.0f} s")
    return out, need, fits

  out, need, fits = attempt(batch)
  row = (describe(config, topology, num_slices, batch, out, step, hlo_path)
         if out is not None else None)
  if not search_batch:
    if row is None:
      raise DoesNotFit(tried[-1]["error"], need)
    return {**row, "search": tried}
  data, fsdp, _ = sharding.global_mesh_shape(config.mesh, len(devices), num_slices)
  divisor = data * fsdp  # the global batch splits over data x fsdp
  best, b = (batch if fits else 0), batch
  for _ in range(max_compiles - 1):
    if not need:  # the compiler gave no figure to extrapolate from
      break
    est = memory.fitting_batch(int(need), b, 0, int(out["state_bytes"] if out else 0),
                               int(chip.hbm_bytes), divisor)
    nxt = est if est != b else 0
    if best and nxt <= best:  # the estimate adds nothing to what already fits
      break
    if not nxt:  # no estimate below a batch that does not fit: halve it
      nxt = (b // 2) // divisor * divisor
      if nxt < divisor:
        break
    b = nxt
    out, need, fits = attempt(b)
    if out is not None and fits:
      best = max(best, b)
      if row is None or not row["fits"]:
        row = describe(config, topology, num_slices, b, out, step, hlo_path)
  if row is None:
    raise DoesNotFit(f"no batch tried fits on {topology}: " + "; ".join(
        f"{t['batch']}: {t.get('error', '')[:80]}" for t in tried), None)
  return {**row, "max_batch": best, "search": tried}
