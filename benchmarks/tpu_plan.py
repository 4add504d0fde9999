"""The TPU planning table of benchmarks/README.md: every preset compiled for the slices users
launch on, on this CPU machine (libtpu's compiler; `pip install -e '.[tpu]'`).

  JAX_PLATFORMS=cpu python -m benchmarks.tpu_plan --out benchmarks/tpu_plan.jsonl \
      [--only 111m@v5e-16,650m@v5p-128] [--max-compiles 2] [--set model.attention=xla]
  python -m benchmarks.tpu_plan --out benchmarks/tpu_plan.jsonl --table     # markdown only

Each row is `brainlm-bench --config configs/pretrain.py:PRESET --topology T [--slices S]`
(tools/plan.py), appended to --out as one JSON line as soon as it is compiled, so the table can
be built in steps (rows already in --out are skipped unless --redo). Compiles take 1-10 minutes
a row on 2 cores; the batch search adds one compile per --max-compiles beyond the first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

PRESETS = ("13m", "111m", "650m", "1b")
TOPOLOGIES = (("v4-8", 1), ("v5e-16", 1), ("v5e-256", 1), ("v5p-64", 1), ("v5p-128", 1),
              ("v6e-256", 1), ("v5e-256", 2))


def key(preset: str, topology: str, slices: int, overrides: str) -> str:
  return f"{preset}@{topology}" + (f"x{slices}" if slices > 1 else "") + (
      f"[{overrides}]" if overrides else "")


def load(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def table(rows: list[dict]) -> str:
  head = ("| preset | slice | mesh (data/fsdp/tensor) | batch | fits | GiB/chip (args + temp) | "
          "largest batch | bound ms, est. (by) | MFU bound, est. | FLOP/byte, est. (ridge) | "
          "ICI / DCN MiB, est. | compile s |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    if "error" in r and "bound_s" not in r:
      error = " ".join(r["error"].split())
      lines.append(f"| {r['preset']}{' ' + r['overrides'] if r.get('overrides') else ''} | "
                   f"{r['slices']} x {r['topology']} | | {r.get('batch', '')} | no | {error[:110]} "
                   f"| | | | | | {r.get('wall_s', 0):.0f} |")
      continue
    m = r["mesh"]
    coll = sum(c["bytes"] for c in r["collectives"].values()) / 2**20
    dcn = sum(c["dcn_bytes"] for c in r["collectives"].values()) / 2**20
    compile_s = " + ".join(f"{t['compile_s']:.0f}" for t in r.get("search", [])) or (
        f"{r['compile_s']:.0f}")
    lines.append(
        f"| {r['preset']}{' ' + r['overrides'] if r.get('overrides') else ''} | {r['slices']} x "
        f"{r['topology']} | {m['data']}/{m['fsdp']}/{m['tensor']} | {r['batch']} | "
        f"{'yes' if r['fits'] else 'no'} | {r['total_gib']:.1f} ({r['argument_gib']:.1f} + "
        f"{r['temp_gib']:.1f}) | {_largest(r)} | {r['bound_s'] * 1e3:.0f} "
        f"({r['bound_by']}) | {r['mfu_bound']:.0%} | {_intensity(r):.0f} ({r['ridge']:.0f}) | "
        f"{coll - dcn:.0f} / {dcn:.0f} | {compile_s} |")
  return "\n".join(lines)


def _largest(r: dict) -> str:
  if "max_batch" not in r:
    return "not searched"
  if len(r.get("search", [])) < 2:  # the first compile's linear estimate allowed nothing larger
    return f"{r['max_batch']} (est.)"
  return str(r["max_batch"] or "none")


def _intensity(r: dict) -> float:
  """FLOP per HBM byte of the compute term (as tools/plan.roofline)."""
  flops = max(r["model_flops"] / r["chips"], r["compiled_flops_per_chip"])
  return flops / r["hbm_bytes_per_chip"] if r["hbm_bytes_per_chip"] else 0.0


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="benchmarks/tpu_plan.jsonl")
  p.add_argument("--only", default="", help="comma-separated PRESET@TOPOLOGY[xSLICES] rows")
  p.add_argument("--max-compiles", type=int, default=2)
  p.add_argument("--set", action="append", default=[], help="config override a.b=value")
  p.add_argument("--table", action="store_true", help="print the markdown table and stop")
  p.add_argument("--redo", action="store_true")
  p.add_argument("--hlo-dir", default="", help="also write each row's compiled HLO text here")
  p.add_argument("--reanalyse", action="store_true",
                 help="re-read the rows' HLO-derived figures from --hlo-dir and rewrite --out")
  args = p.parse_args()
  if args.table:
    print(table(load(args.out)))
    return 0
  if args.reanalyse:  # HLO-derived figures read again from --hlo-dir, no compiling
    from brainlm_jax.tools import plan  # pylint: disable=import-outside-toplevel
    rows = []
    for r in load(args.out):
      path = os.path.join(args.hlo_dir, key(r["preset"], r["topology"], r["slices"],
                                            r.get("overrides", "")).replace("/", "_") + ".hlo.txt")
      if "error" not in r and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
          r = plan.reanalyse(r, f.read())
      rows.append(r)
    with open(args.out, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r, default=str) + "\n" for r in rows)
    print(table(rows))
    return 0
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from brainlm_jax.tools import plan, tpu  # pylint: disable=import-outside-toplevel
  tpu.quiet_libtpu_env()
  from configs import pretrain  # pylint: disable=import-outside-toplevel
  overrides = ",".join(args.set)
  wanted = [s.strip() for s in args.only.split(",") if s.strip()]
  done = {key(r["preset"], r["topology"], r["slices"], r.get("overrides", "")) for r in load(args.out)}
  rows = [(pr, t, s) for pr in PRESETS for t, s in TOPOLOGIES]
  if wanted:
    rows = [r for w in wanted for r in [(w.split("@")[0],) + _topo(w.split("@")[1])]]
  for preset, topology, slices in rows:
    k = key(preset, topology, slices, overrides)
    if k in done and not args.redo:
      continue
    config = pretrain.get_config(preset)
    for item in args.set:
      name, value = item.split("=", 1)
      node = config
      *parents, leaf = name.split(".")
      for part in parents:
        node = node[part]
      old = node[leaf]
      node[leaf] = (value.lower() in ("1", "true") if isinstance(old, bool) else type(old)(value))
    t0 = time.perf_counter()
    print(f"== {k}", flush=True)
    try:
      hlo_path = (os.path.join(args.hlo_dir, k.replace("/", "_") + ".hlo.txt")
                  if args.hlo_dir else None)
      row = plan.plan(config, topology, num_slices=slices, max_compiles=args.max_compiles,
                      hlo_path=hlo_path, log=lambda msg: print(msg, flush=True))
    except Exception as e:  # pylint: disable=broad-except  # one bad row must not stop the table
      traceback.print_exc()
      row = {"preset": preset, "topology": topology, "slices": slices, "batch":
             int(config.train.batch_size), "error": f"{type(e).__name__}: {e}"[:600]}
    row.update(overrides=overrides, wall_s=time.perf_counter() - t0,
               date=time.strftime("%Y-%m-%d"), machine=f"{os.cpu_count()} CPU cores")
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(json.dumps(row, default=str) + "\n")
    print(f"   done in {row['wall_s']:.0f} s", flush=True)
  return 0


def _topo(text: str) -> tuple[str, int]:
  if "x" in text.split("-")[-1] and ":" not in text:
    name, slices = text.rsplit("x", 1)
    return name, int(slices)
  return text, 1


if __name__ == "__main__":
  sys.exit(main())
