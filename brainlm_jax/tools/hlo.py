"""What one device does in a compiled XLA program, read from its HLO text, loops counted in full.

  stats = analyse(compiled.as_text(), slice_of=None)
  stats.flops            matmul FLOPs (dot / convolution) per device per step
  stats.hbm_bytes        bytes read + written in HBM per device per step (top-level ops' operands
                         and results, fusions as one op; buffers XLA placed on-chip (S(1)) left out)
  stats.collectives      {kind: {'count', 'bytes', 'dcn_bytes'}}: bytes each device sends
  stats.loops            [(body name, trip count)]; stats.custom_calls {target: count}

XLA's own `cost_analysis()` counts a loop body once; a scanned stack of layers (`scan_layers`) and
the blockwise attention's tiles are loops, so its FLOPs and bytes fall short by the trip counts.
Here every computation is weighted by how often it runs: a while body by its trip count (the
constant its condition compares the counter against; loops from `lax.scan` / `lax.map` count
from 0 in steps of 1), fused and called computations by their caller's weight. Work inside
custom calls (Pallas kernels) is invisible here: `custom_calls` names them.

Multi-slice programs reduce across slices with host-transfer sends to the Megascale runtime
(`_xla_megascale_transfer_type`), counted as 'dcn all-reduce' etc. with n = the slice count.
Bytes a collective sends per device, for a group of n devices and a result (all-gather) or
operand (reduce-scatter) of S bytes: all-gather and reduce-scatter (n-1)/n S, all-reduce
2 (n-1)/n S, all-to-all (n-1)/n S, collective-permute S. Groups that span TPU slices (`slice_of`:
device id -> slice) travel over the data-centre network and are counted in `dcn_bytes` too.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Callable

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->\s*.*\{\s*$")
_CALLS = re.compile(r"\b(condition|body|calls|to_apply|true_computation|false_computation)="
                    r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
         "conditional", "after-all", "partition-id", "replica-id", "iota", "opt-barrier",
         "custom-call-done"}


def _bytes(shape: str, hbm_only: bool = False) -> float:
  """Bytes of the arrays in an HLO shape string (tuples summed); with `hbm_only`, arrays laid out
  in another memory space (S(n) in the layout: on-chip) count 0."""
  total = 0.0
  for dtype, dims, layout in _ARRAY.findall(shape):
    if hbm_only and (not dims or (layout and re.search(r"S\(\d+\)", layout))):
      continue  # scalars (registers) and buffers placed on chip
    size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _split_shape(rest: str) -> tuple[str, str]:
  """'SHAPE opcode(...)...' -> (SHAPE, the rest); SHAPE may be a parenthesised tuple."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  shape, _, tail = rest.partition(" ")
  return shape, tail


def _operands(text: str) -> tuple[str, str]:
  """'opcode(%a, %b), attrs' -> ('%a, %b', 'attrs')."""
  start = text.index("(")
  depth = 0
  for i in range(start, len(text)):
    depth += text[i] == "("
    depth -= text[i] == ")"
    if depth == 0:
      return text[start + 1:i], text[i + 1:]
  return "", ""


@dataclasses.dataclass
class Instr:
  name: str
  shape: str
  opcode: str
  operands: list[str]  # value names
  attrs: str
  args: str = ""  # the text between the parentheses (a constant's literal)
  root: bool = False


@dataclasses.dataclass
class Stats:
  flops: float = 0.0
  hbm_bytes: float = 0.0
  collectives: dict = dataclasses.field(default_factory=dict)
  loops: list = dataclasses.field(default_factory=list)
  custom_calls: dict = dataclasses.field(default_factory=dict)

  @property
  def collective_bytes(self) -> float:
    return sum(c["bytes"] for c in self.collectives.values())

  @property
  def dcn_bytes(self) -> float:
    return sum(c["dcn_bytes"] for c in self.collectives.values())


def parse(text: str) -> tuple[dict[str, list[Instr]], str, dict[str, str]]:
  """HLO module text -> ({computation: [Instr]}, entry name, {value name: shape})."""
  comps: dict[str, list[Instr]] = {}
  shapes: dict[str, str] = {}
  entry, current = "", None
  for line in text.splitlines():
    head = _HEADER.match(line)
    if head and "=" not in line.split("(")[0]:
      current = head.group(2)
      comps[current] = []
      if head.group(1):
        entry = current
      continue
    if current is None or line.strip() in ("}", ""):
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, rest = m.groups()
    shape, tail = _split_shape(rest)
    opcode = tail.split("(", 1)[0].strip()
    if "(" not in tail:
      continue
    args, attrs = _operands(tail)
    shapes[name] = shape
    comps[current].append(Instr(name, shape, opcode, re.findall(r"%([\w.\-]+)", args), attrs,
                                args, line.lstrip().startswith("ROOT")))
  return comps, entry, shapes


def _trip_count(cond: str, body: str | None, comps: dict[str, list[Instr]]) -> int:
  """Trip count of a while loop: the integer constant its condition compares the counter with
  (in the condition or what it calls), divided by the counter's step when the body adds a
  constant to it (XLA's windowed FSDP matmuls step by 2; `lax.scan` / `lax.map` by 1). Counters
  are taken to start at 0. 1 if no constant is found."""
  consts, todo, seen = [], [cond], set()
  while todo:
    name = todo.pop()
    seen.add(name)
    for ins in comps.get(name, []):
      if ins.opcode == "constant" and re.fullmatch(r"[su]\d+\[\]", ins.shape.split("{")[0]):
        consts.append(int(ins.args))
      todo += [c for _, c in _CALLS.findall(ins.attrs) if c in comps and c not in seen]
  if not consts:
    return 1
  return -(-max(consts) // _counter_step(cond, body, comps))


def _counter_step(cond: str, body: str | None, comps: dict[str, list[Instr]]) -> int:
  """The constant a loop body adds to the tuple element its condition compares (1 if unclear)."""
  by_name = lambda comp: {i.name: i for i in comps.get(comp, [])}  # noqa: E731
  index = lambda ins: re.search(r"\bindex=(\d+)", ins.attrs)  # noqa: E731
  c_ins = by_name(cond)
  compare = next((i for i in comps.get(cond, []) if i.root and i.opcode == "compare"), None)
  if compare is None or body is None:
    return 1
  counter = next((c_ins[o] for o in compare.operands if o in c_ins
                  and c_ins[o].opcode == "get-tuple-element"), None)
  if counter is None or not index(counter):
    return 1
  k = int(index(counter).group(1))
  b_ins = by_name(body)
  root = next((i for i in comps.get(body, []) if i.root and i.opcode == "tuple"), None)
  if root is None or k >= len(root.operands) or root.operands[k] not in b_ins:
    return 1
  update = b_ins[root.operands[k]]
  if update.opcode != "add":
    return 1
  parts = [b_ins.get(o) for o in update.operands]
  reads_counter = any(p is not None and p.opcode == "get-tuple-element" and index(p)
                      and int(index(p).group(1)) == k for p in parts)
  steps = [int(p.args) for p in parts if p is not None and p.opcode == "constant"
           and re.fullmatch(r"-?\d+", p.args.strip())]
  return max(1, steps[0]) if reads_counter and steps else 1


def _group_size(attrs: str, default: int) -> tuple[int, list[list[int]] | None]:
  """(devices per replica group, the explicit groups if listed) of a collective's attributes."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:  # mesh['axis_0'=2,'axis_1'=256,...] {'axis_0'}: groups vary along the listed axes
    names_sizes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
    names, sizes = [n for n, _ in names_sizes], [int(v) for _, v in names_sizes]
    listed = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(2)) if a in names]
    ids = np.arange(math.prod(sizes)).reshape(sizes)
    rest = [i for i in range(len(sizes)) if i not in listed]
    size = math.prod(sizes[i] for i in listed)
    return size, ids.transpose(rest + listed).reshape(-1, size).tolist()
  m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](T\(([\d,]+)\))?", attrs)
  if m:
    groups = [int(x) for x in m.group(1).split(",")]
    src = [int(x) for x in m.group(2).split(",")]
    ids = np.arange(math.prod(src)).reshape(src)
    if m.group(4):
      ids = ids.transpose([int(x) for x in m.group(4).split(",")])
    ids = ids.reshape(groups[0], -1) if len(groups) > 1 else ids.reshape(1, -1)
    return ids.shape[1], ids.tolist()
  m = re.search(r"replica_groups=\{(\{[\d,{} ]*\})\}", attrs)
  if m:
    groups = [[int(x) for x in g.split(",") if x.strip()]
              for g in re.findall(r"\{([\d, ]*)\}", m.group(1))]
    if groups and groups[0]:
      return len(groups[0]), groups
  pairs = re.search(r"source_target_pairs=\{(.*?)\}\}?", attrs)
  if pairs:
    return 2, [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", attrs)]
  return default, None


def _fusion_bytes(ins: Instr, body: list[Instr], shapes: dict[str, str]) -> float:
  """HBM bytes of one fusion: what it reads of each operand and writes of its result. An
  operand the fused code only slices (dynamic-slice) costs the slices; a result made by
  dynamic-update-slice into an operand (in place: a loop writing one layer of a stacked
  buffer) costs the update, and that operand is not read in full."""
  params = {i.name: int(i.args) for i in body if i.opcode == "parameter" and i.args.isdigit()}
  users: dict[str, list[Instr]] = collections.defaultdict(list)
  for i in body:
    for o in i.operands:
      users[o].append(i)
  roots = [i for i in body if i.root]
  outs = roots
  if roots and roots[0].opcode == "tuple":
    by_name = {i.name: i for i in body}
    outs = [by_name[o] for o in roots[0].operands if o in by_name]
  in_place = {o.operands[0] for o in outs if o.opcode == "dynamic-update-slice"}
  written = sum(_bytes(shapes.get(o.operands[1], ""), True) if o.opcode == "dynamic-update-slice"
                else _bytes(o.shape, True) for o in outs) if outs else _bytes(ins.shape, True)
  read = 0.0
  for pname, index in params.items():
    if index >= len(ins.operands):
      continue
    full = _bytes(shapes.get(ins.operands[index], ""), True)
    use = users.get(pname, [])
    if pname in in_place and all(u.opcode == "dynamic-update-slice" for u in use):
      continue
    if use and all(u.opcode == "dynamic-slice" and u.operands[0] == pname for u in use):
      read += min(full, sum(_bytes(u.shape) for u in use))
    else:
      read += full
  return read + written


def _sent_bytes(kind: str, result: float, operand: float, n: int) -> float:
  frac = (n - 1) / n if n > 1 else 0.0
  if kind == "all-gather":
    return frac * result
  if kind == "reduce-scatter":
    return frac * operand
  if kind == "all-reduce":
    return 2 * frac * result
  if kind == "all-to-all":
    return frac * result
  return result  # collective-permute


def _dot_flops(ins: Instr, shapes: dict[str, str]) -> float:
  out = _bytes_elems(ins.shape)
  if ins.opcode == "dot":
    lhs = _dims(shapes.get(ins.operands[0], ""))
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
    k = math.prod(lhs[int(i)] for i in m.group(1).split(",") if i) if m and lhs else 1
    return 2.0 * out * k
  lhs = _dims(shapes.get(ins.operands[0], "")) if ins.operands else []
  kernel = _dims(shapes.get(ins.operands[1], "")) if len(ins.operands) > 1 else []
  out_dims = _dims(ins.shape)
  m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
  if not lhs or not kernel or not out_dims or not m or "i" not in m.group(2):
    return 0.0
  # MACs = (outputs / output spatial positions) x input features x, per spatial dimension, the
  # (input, tap) pairs that land on real input: XLA writes batched and windowed (FSDP) matmuls as
  # convolutions whose spatial dims are padded or dilated batch dims, where most taps see zeros.
  lhs_labels, out_labels = m.group(1), m.group(3)
  window = re.search(r"window=\{([^}]*)\}", ins.attrs)
  field = lambda name, n, default: ([  # noqa: E731
      [int(v) for v in part.split("_")] if "_" in part else int(part)
      for part in re.search(rf"\b{name}=([\d_x]+)", window.group(1)).group(1).split("x")]
      if window and re.search(rf"\b{name}=", window.group(1)) else [default] * n)
  spatial = sorted(c for c in lhs_labels if c.isdigit())
  n = len(spatial)
  sizes, pads = field("size", n, 1), field("pad", n, [0, 0])
  strides, dilates = field("stride", n, 1), field("lhs_dilate", n, 1)
  per_out = float(kernel[m.group(2).index("i")])
  for d, label in enumerate(spatial):
    n_in, n_out = lhs[lhs_labels.index(label)], out_dims[out_labels.index(label)]
    pos = pads[d][0] + dilates[d] * np.arange(n_in)  # real inputs in the padded, dilated axis
    last = np.minimum(n_out - 1, pos // strides[d])
    first = np.maximum(0, -(-(pos - sizes[d] + 1) // strides[d]))
    per_out *= float(np.clip(last - first + 1, 0, None).sum()) / max(n_out, 1)
  return 2.0 * out * per_out


def _dims(shape: str) -> list[int]:
  m = _ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def _bytes_elems(shape: str) -> int:
  return math.prod(_dims(shape)) if _dims(shape) else 0


def analyse(text: str, slice_of: Callable[[int], int] | None = None,
            num_devices: int = 1) -> Stats:
  """Per-device FLOPs, HBM bytes and collectives of one run of the compiled program `text`
  (see the module docstring). `slice_of(device id)`: which slice a device is in (multi-slice)."""
  comps, entry, shapes = parse(text)
  stats = Stats()
  edges: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
  fused: set[str] = set()
  for comp, instrs in comps.items():
    for ins in instrs:
      callees = _CALLS.findall(ins.attrs) + [
          ("branch", b.strip().lstrip("%")) for m in _BRANCHES.findall(ins.attrs)
          for b in m.split(",") if b.strip()]
      for role, callee in callees:
        if callee not in comps or role == "to_apply":
          continue
        factor = 1.0
        if role == "body":
          cond = next((c for r, c in callees if r == "condition"), None)
          factor = float(_trip_count(cond, callee, comps) if cond else 1)
          stats.loops.append((callee, int(factor)))
        if ins.opcode == "fusion":
          fused.add(callee)
        edges[comp].append((callee, factor))
  order, state = [], {}

  def visit(c):  # depth-first post-order; HLO computations form a DAG
    stack = [(c, iter(edges[c]))]
    state[c] = 1
    while stack:
      node, it = stack[-1]
      nxt = next(it, None)
      if nxt is None:
        stack.pop()
        order.append(node)
      elif nxt[0] not in state:
        state[nxt[0]] = 1
        stack.append((nxt[0], iter(edges[nxt[0]])))

  visit(entry)
  order.reverse()  # callers first
  weight: dict[str, float] = collections.defaultdict(float)
  weight[entry] = 1.0
  for comp in order:
    for callee, factor in edges[comp]:
      weight[callee] += weight[comp] * factor
      if comp in fused:
        fused.add(callee)
  collectives: dict = {}
  for comp in order:
    w = weight[comp]
    for ins in comps[comp]:
      op = ins.opcode
      if op in ("dot", "convolution"):
        stats.flops += w * _dot_flops(ins, shapes)
      if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
        key = target.group(1) if target else "?"
        stats.custom_calls[key] = stats.custom_calls.get(key, 0) + w
      kind = op[:-len("-start")] if op.endswith("-start") else op
      if kind in COLLECTIVES:
        n, groups = _group_size(ins.attrs, num_devices)
        operand = sum(_bytes(shapes.get(o, "")) for o in ins.operands)
        result = _bytes(ins.shape) if not op.endswith("-start") else operand * (
            n if kind == "all-gather" else 1)
        sent = _sent_bytes(kind, result, operand, n)
        across = bool(slice_of and groups and any(
            len({slice_of(d) for d in g}) > 1 for g in groups))
        c = collectives.setdefault(kind, {"count": 0, "bytes": 0.0, "dcn_bytes": 0.0})
        c["count"] += w
        c["bytes"] += w * sent
        c["dcn_bytes"] += w * sent * across
      megascale = re.search(r'_xla_megascale_transfer_type="(\w+)"', ins.attrs)
      if op == "send" and megascale:  # a multi-slice collective over DCN (host transfer)
        kind = f"dcn {megascale.group(1).lower().replace('_', '-')}"
        slices = len({slice_of(d) for d in range(num_devices)}) if slice_of else 2
        size = _bytes(_ARRAY.search(ins.shape).group(0)) if _ARRAY.search(ins.shape) else 0.0
        sent = _sent_bytes(kind[4:], size, size, slices)
        c = collectives.setdefault(kind, {"count": 0, "bytes": 0.0, "dcn_bytes": 0.0})
        c["count"] += w
        c["bytes"] += w * sent
        c["dcn_bytes"] += w * sent
      if comp in fused or op in _FREE or op.endswith("-start"):
        continue
      if op == "copy-done":  # a prefetch into on-chip memory or an eviction: one side is HBM
        stats.hbm_bytes += w * _bytes(ins.shape)
        continue
      if op.endswith("-done"):
        stats.hbm_bytes += w * 2 * _bytes(ins.shape, hbm_only=True)
        continue
      if op == "fusion":
        called = _CALLS.search(ins.attrs)
        body = comps.get(called.group(2), []) if called else []
        stats.hbm_bytes += w * _fusion_bytes(ins, body, shapes)
      elif op == "dynamic-update-slice":
        stats.hbm_bytes += w * 2 * _bytes(shapes.get(ins.operands[1], ""), hbm_only=True)
      elif op == "dynamic-slice":
        stats.hbm_bytes += w * 2 * _bytes(ins.shape, hbm_only=True)
      else:
        stats.hbm_bytes += w * (_bytes(ins.shape, hbm_only=True) + sum(
            _bytes(shapes.get(o, ""), hbm_only=True) for o in ins.operands))
  stats.collectives = collectives
  return stats
