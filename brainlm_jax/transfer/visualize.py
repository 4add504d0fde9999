"""Figures of a pretrained run: reconstructions, per-parcel R², CLS attention, embeddings.

Data preparation (pure, unit-tested) is kept apart from the figures (`plots.py`):
  analyse(pre, recordings, ...) -> Analysis     evaluate's reconstruction pass (masks a pure
                                                function of the window) + CLS attention per parcel
  cls_attention_to_parcels(cls_row [B, 1+K], ids_keep [B, K], P, T) -> [B, P] (rows sum to 1)
  group_by_network(values [P], networks [P]) -> [(network, values)], Yeo-7 order first
  embedding_pca(emb [n, D], subjects [n]) -> EmbeddingPCA
  read_metrics(WORKDIR/metrics.jsonl) -> {name: (steps, values)}
`Visualize(...).run(pre, out)` writes every figure as OUT/*.png, the same images into
OUT/tensorboard, and OUT/visualize.json / .md (per-parcel values, paths).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from brainlm_jax.data import phenotypes as phenotypes_lib
from brainlm_jax.data.readers import load_coordinates
from brainlm_jax.data.windows import iter_windows
from brainlm_jax.models import tokens_are_parcel_patches
from brainlm_jax.training import metrics as metrics_lib
from brainlm_jax.training import storage
from brainlm_jax.transfer import functions
from brainlm_jax.transfer import plots
from brainlm_jax.transfer import report
from brainlm_jax.transfer.evaluate import reconstruction_pass
from brainlm_jax.transfer.run import Evaluator, Pretrained, check_inputs

YEO7 = ("Visual", "Somatomotor", "Dorsal Attention", "Ventral Attention", "Limbic",
        "Frontoparietal", "Default")
# Other spellings of the Yeo-7 networks (Schaefer/Yeo atlas short names) -> canonical name.
_YEO7_ALIASES = {
    "vis": "Visual", "visual": "Visual", "sommot": "Somatomotor", "somatomotor": "Somatomotor",
    "dorsattn": "Dorsal Attention", "dorsalattention": "Dorsal Attention",
    "salventattn": "Ventral Attention", "ventralattention": "Ventral Attention",
    "salience": "Ventral Attention", "limbic": "Limbic", "cont": "Frontoparietal",
    "control": "Frontoparietal", "frontoparietal": "Frontoparietal", "default": "Default",
    "dmn": "Default", "defaultmode": "Default",
}


# ----------------------------------------------------------------------------------------------
# Pure data preparation.


def cls_attention_to_parcels(cls_row: np.ndarray, ids_keep: np.ndarray, num_parcels: int,
                             num_patches: int) -> np.ndarray:
  """The CLS token's attention per parcel.

  cls_row [B, 1 + K]: the CLS query's attention probabilities (index 0: the CLS key itself, then
  the K visible tokens in `ids_keep` order); ids_keep [B, K] token ids (parcel * T + patch).
  Returns [B, P]: the attention on each parcel's tokens, summed, as a share of the attention on
  all tokens but CLS itself (each row sums to 1).
  """
  cls_row, ids_keep = np.asarray(cls_row, np.float64), np.asarray(ids_keep)
  b = cls_row.shape[0]
  out = np.zeros((b, num_parcels))
  np.add.at(out, (np.arange(b)[:, None], ids_keep // num_patches), cls_row[:, 1:])
  return out / np.maximum(out.sum(axis=1, keepdims=True), 1e-30)


def canonical_network(name: str) -> str:
  """A Yeo-7 network's canonical name (aliases such as 'SomMot', 'DMN' map), else `name`."""
  key = "".join(c for c in str(name).lower() if c.isalnum())
  return _YEO7_ALIASES.get(key, str(name).strip())


def group_by_network(values: np.ndarray, networks: Sequence[str]) -> list[tuple[str, np.ndarray]]:
  """values [P] grouped by networks [P]: Yeo-7 networks in their usual order, then the others
  alphabetically. Returns [(network, values of its parcels)]."""
  values = np.asarray(values)
  if len(networks) != len(values):
    raise ValueError(f"{len(networks)} network labels for {len(values)} parcels")
  groups = collections.defaultdict(list)
  for v, n in zip(values, networks):
    groups[canonical_network(n)].append(v)
  order = [n for n in YEO7 if n in groups] + sorted(set(groups) - set(YEO7))
  return [(n, np.asarray(groups[n])) for n in order]


@dataclasses.dataclass
class EmbeddingPCA:
  """2-D PCA of embeddings. windows [n, 2]; subjects: ids in order; means [S, 2] (per subject);
  explained [2] variance ratios; fit_on: 'subject means' or 'windows' (fewer than 3 subjects)."""
  windows: np.ndarray
  window_subject: np.ndarray
  subjects: list[str]
  means: np.ndarray
  explained: np.ndarray
  fit_on: str


def embedding_pca(emb: np.ndarray, subjects: Sequence[str], seed: int = 0) -> EmbeddingPCA:
  """emb [n, D] window embeddings -> per-subject means -> 2-D PCA (fit on the subject means when
  there are >= 3 subjects, else on the windows); windows are projected with the same PCA."""
  from sklearn.decomposition import PCA  # pylint: disable=import-outside-toplevel
  emb, subjects = np.asarray(emb, np.float64), np.asarray(subjects).astype(str)
  ids = list(dict.fromkeys(subjects.tolist()))
  means = np.stack([emb[subjects == s].mean(axis=0) for s in ids])
  fit_on = "subject means" if len(ids) >= 3 else "windows"
  x = means if fit_on == "subject means" else emb
  k = min(2, x.shape[0], x.shape[1])
  pca = PCA(n_components=k, random_state=seed).fit(x)
  pad = lambda z: np.pad(z, ((0, 0), (0, 2 - k)))  # noqa: E731  (one component: y = 0)
  return EmbeddingPCA(pad(pca.transform(emb)), subjects, ids, pad(pca.transform(means)),
                      np.pad(pca.explained_variance_ratio_, (0, 2 - k)), fit_on)


def read_metrics(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """metrics.jsonl -> {name: (steps, values)}, sorted by step; a step logged again (a resumed
  run) keeps its last value. Unparseable lines are skipped with a warning."""
  rows: dict[str, dict[int, float]] = collections.defaultdict(dict)
  with storage.open_file(path, "r") as f:  # a local path or gs://
    for i, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        step = int(row.pop("step"))
      except (ValueError, KeyError, TypeError) as e:
        logging.warning("%s line %d: skipped (%s)", path, i, e)
        continue
      for k, v in row.items():
        if isinstance(v, (int, float)):
          rows[k][step] = float(v)
  return {k: (np.asarray(sorted(d)), np.asarray([d[s] for s in sorted(d)])) for k, d in
          rows.items()}


def read_network_labels(path: str, num_parcels: int) -> tuple[list[str], list[str]]:
  """A CSV/TSV (or whitespace) file of `parcel network` rows, one per parcel in model order (an
  optional header row is skipped) -> (parcel names, network names)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: network label file not found")
  with open(path, "r", encoding="utf-8-sig", newline="") as f:
    lines = [l for l in f.read().splitlines() if l.strip() and not l.lstrip().startswith("#")]
  delim = "\t" if any("\t" in l for l in lines) else "," if any("," in l for l in lines) else None
  rows = [next(csv.reader([l], delimiter=delim)) if delim else l.split() for l in lines]
  rows = [[c.strip() for c in r] for r in rows]
  bad = [i for i, r in enumerate(rows, start=1) if len(r) < 2 or not r[1]]
  if bad:
    raise ValueError(f"{path}: line {bad[0]} does not have two columns (parcel, network)")
  if rows and rows[0][1].lower() in ("network", "networks", "yeo7", "yeo", "label", "name"):
    rows = rows[1:]
  if len(rows) != num_parcels:
    raise ValueError(f"{path}: {len(rows)} parcel rows, but the model has {num_parcels} parcels "
                     "(one `parcel network` row per parcel, in the model's parcel order)")
  return [r[0] for r in rows], [r[1] for r in rows]


def parse_parcels(spec: str | Sequence | None, names: Sequence[str],
                  r2: np.ndarray | None = None) -> list[int]:
  """'3,17,PCC_L' -> parcel indices (0-based indices or names); default (None or ''): the best,
  median and worst reconstructed parcels by R² (or the first 3)."""
  p = len(names)
  if not spec:
    if r2 is None or not np.isfinite(r2).any():
      return list(range(min(3, p)))
    order = [int(i) for i in np.argsort(-np.nan_to_num(r2, nan=-np.inf))]
    return list(dict.fromkeys([order[0], order[len(order) // 2], order[-1]]))
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  lookup = {n.lower(): i for i, n in enumerate(names)}
  out = []
  for item in (str(s).strip() for s in items):
    if not item:
      continue
    if item.lower() in lookup:
      out.append(lookup[item.lower()])
    elif item.lstrip("-").isdigit() and 0 <= int(item) < p:
      out.append(int(item))
    else:
      raise ValueError(f"--parcels: {item!r} is neither a parcel index in [0, {p - 1}] nor a "
                       "parcel name (names come from --network-labels)")
  return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------------------------
# Model passes.


def cls_attention(pre: Pretrained, recordings: Sequence, *, batch_size: int = 16,
                  max_windows: int | None = None) -> np.ndarray:
  """[P] mean share of the CLS token's attention on each parcel's tokens (last encoder layer,
  heads averaged, every token visible) over the windows of `recordings`."""
  cfg, params = functions.unscanned(pre.model_cfg, pre.params)
  fn = functions.attention_fn(cfg)
  coords = None if pre.coords is None else jnp.asarray(pre.coords)
  tokens = cfg.num_parcels * cfg.num_patches
  total, n = np.zeros(cfg.num_parcels), 0
  for b in iter_windows(recordings, pre.scaler, window=cfg.window, batch_size=batch_size,
                        max_windows=max_windows):
    cls_row = np.asarray(jax.device_get(fn(params, b.signal, coords)))
    ids = np.broadcast_to(np.arange(tokens), (len(b.signal), tokens))
    total += cls_attention_to_parcels(cls_row, ids, cfg.num_parcels,
                                      cfg.num_patches)[:b.n].sum(axis=0)
    n += b.n
  return total / max(n, 1)


@dataclasses.dataclass
class Analysis:
  """What the figures need from the passes over the windows.

  r2 [P]: masked-reconstruction R² per parcel; sums: its statistics (`metrics.masked_sums`
  per parcel); attention [P] | None: mean CLS attention share per parcel (None for variants
  whose tokens are not parcels' time patches); example: one window, {signal [P, W], pred [P, W],
  mask [P, W], recording, window}; n_windows.
  """
  r2: np.ndarray
  sums: dict
  attention: np.ndarray | None
  example: dict
  n_windows: int


def analyse(pre: Pretrained, recordings: Sequence, *, mask_ratio: float | None = None,
            seed: int = 0, batch_size: int = 16, max_windows: int = 0) -> Analysis:
  """Reconstructs every non-overlapping window (up to `max_windows`; 0: all) with the run's
  masking mode at `mask_ratio` (default: the run's), window i masked from (seed, i) as
  `brainlm-evaluate` masks it, then measures the CLS attention with every token visible."""
  check_inputs(pre, recordings)
  m = pre.config.get("masking") or {}
  ratio = float(m.get("ratio", 0.75) if mask_ratio is None else mask_ratio)
  run = reconstruction_pass(pre, recordings, mode=m.get("mode", "uniform"), ratio=ratio,
                            forecast_patches=int(m.get("forecast_patches", 1)), seed=seed,
                            batch_size=batch_size, with_baselines=False,
                            max_windows=max_windows or None)
  sums = run.sums["model"]
  attention = None
  if tokens_are_parcel_patches(pre.model_cfg):
    attention = cls_attention(pre, recordings, batch_size=batch_size,
                              max_windows=max_windows or None)
  example = dict(run.example, pred=run.example["pred"]["model"])
  return Analysis(metrics_lib.reduce_sums(sums)["r2"], sums, attention, example, run.n_windows)


# ----------------------------------------------------------------------------------------------
# The job.


def _markdown(s: dict) -> str:
  lines = ["# Figures of a pretrained run", "",
           f"- checkpoint: `{s['checkpoint']['path']}` (step {s['checkpoint']['step']})",
           f"- data: `{s['data']}` ({s['split']}: {len(s['subjects'])} subjects, "
           f"{s['n_windows']} windows); mask ratio {s['mask_ratio']}, mask seed {s['seed']}",
           f"- masked reconstruction: pooled R² {s['pooled_r2']:.3f}, MSE {s['pooled_mse']:.3f}",
           f"- traced parcels: {', '.join(s['traced'])}"]
  if s["top_attention"]:
    lines.append(f"- most CLS-attended parcels: {', '.join(s['top_attention'])}")
  lines += ["", "| figure | file |", "|---|---|"]
  lines += [f"| {name} | `{os.path.basename(path)}` |" for name, path in s["png"].items()]
  return "\n".join(lines) + "\n"


class Visualize(Evaluator):
  """`brainlm-visualize`: figures of a run on the recordings of its --data / --split.

  Options: parcels (to trace: indices or names; default best, median, worst), network_labels
  (`parcel network` rows), phenotypes + color_by (colour the embedding PCA), subject_column,
  coords (override the run's), mask_ratio (default: the run's), seed, batch_size, max_windows
  (0: all), tr (seconds on the trace axis).
  """
  name = "visualize"
  auto_split = "validation"

  def __init__(self, *, parcels: str | None = None, network_labels: str | None = None,
               phenotypes: str | None = None, subject_column: str = "participant_id",
               color_by: str | None = None, coords: str | None = None,
               mask_ratio: float | None = None, seed: int = 0, batch_size: int = 16,
               max_windows: int = 0, tr: float | None = None, **kw):
    super().__init__(**kw)
    if (phenotypes is None) != (color_by is None):
      raise ValueError("--phenotypes and --color-by go together (the PCA is coloured by a "
                       "column of the phenotype file)")
    self.colour = (phenotypes_lib.read_phenotypes(phenotypes, subject_column, color_by)
                   if phenotypes else None)
    self.parcels, self.network_labels, self.color_by = parcels, network_labels, color_by
    self.coords, self.mask_ratio, self.seed = coords, mask_ratio, seed
    self.batch_size, self.max_windows, self.tr = batch_size, max_windows, tr

  def run(self, pre: Pretrained, out_dir: str) -> dict[str, Any]:
    cfg = pre.model_cfg
    sel = self.select(pre)
    recs = sel.recordings
    xyz = load_coordinates(self.coords) if self.coords else pre.coords
    if xyz is not None and len(xyz) != cfg.num_parcels:
      raise ValueError(f"{self.coords or 'the checkpoint coordinates'}: {len(xyz)} parcels, but "
                       f"the model has {cfg.num_parcels}")
    names, networks = [f"parcel {i}" for i in range(cfg.num_parcels)], None
    if self.network_labels:
      names, networks = read_network_labels(self.network_labels, cfg.num_parcels)
    chosen = parse_parcels(self.parcels, names) if self.parcels else None  # fail before work
    logging.info("Visualising %s (step %d) on %d recordings of %d subjects (%d skipped)",
                 pre.path, pre.step, len(recs), len(sel.subjects), len(sel.skipped))
    a = analyse(pre, recs, mask_ratio=self.mask_ratio, seed=self.seed,
                batch_size=self.batch_size, max_windows=self.max_windows)
    pooled = metrics_lib.reduce_sums({k: v.sum() for k, v in a.sums.items()})
    ratio = (self.mask_ratio if self.mask_ratio is not None
             else (pre.config.get("masking") or {}).get("ratio"))
    where = f"step {pre.step}, {a.n_windows} windows of {len(sel.subjects)} subjects"
    chosen = chosen or parse_parcels(None, names, a.r2)
    rec = recs[a.example["recording"]]
    figures = {
        "traces": ("traces.png", lambda path: plots.plot_traces(
            a.example["signal"], a.example["mask"], [("reconstructed", a.example["pred"],
                                                      "tab:red")],
            chosen, path, names=names, tr=self.tr, r2=a.r2,
            title=f"{os.path.basename(rec.path)}, window {a.example['window']}: true vs "
                  f"reconstructed (mask ratio {ratio}; grey = masked)")),
        "r2_map": ("r2_map.png", lambda path: plots.plot_parcel_map(
            a.r2, xyz, path, names=names, cmap="viridis", label="R² of masked values",
            title=f"Masked-reconstruction R² per parcel ({where}; pooled R² "
                  f"{pooled['r2']:.3f})")),
    }
    if a.attention is not None:
      figures["cls_attention_map"] = ("cls_attention_map.png", lambda path: plots.plot_parcel_map(
          a.attention * cfg.num_parcels, xyz, path, names=names, cmap="magma",
          title=f"CLS attention per parcel, last encoder layer, mean over heads ({where})",
          label="CLS attention share x P (1 = uniform)"))
      if networks is not None:
        figures["cls_attention_networks"] = (
            "cls_attention_networks.png", lambda path: plots.plot_network_attention(
                group_by_network(a.attention, networks), path,
                title=f"CLS attention by network ({where})"))
    else:
      logging.info("%s tokens are image patches, not parcels: no CLS-attention maps",
                   cfg.variant)
    emb = functions.embed(pre, recs, batch_size=self.batch_size)
    pcas = {k: embedding_pca(emb[k], emb["subject"], self.seed) for k in ("mean", "cls")}
    norm = phenotypes_lib.norm_subject
    colour = None if self.colour is None else {
        s: self.colour[norm(s)] for s in pcas["mean"].subjects if norm(s) in self.colour}
    figures["embeddings_pca"] = ("embeddings_pca.png", lambda path: plots.plot_embedding_pca(
        pcas, path, colour_by=colour, colour_name=self.color_by or "subject",
        title=f"Subject embeddings ({where}): large = subject mean, small = windows"))
    metrics_path = storage.join(storage.dirname(storage.dirname(pre.path)), "metrics.jsonl")
    if storage.isfile(metrics_path):
      figures["training_curves"] = ("training_curves.png", lambda path: plots.plot_training_curves(
          read_metrics(metrics_path), path, title=f"Training curves ({metrics_path})"))
    else:
      logging.warning("No %s: skipping the training curves", metrics_path)
    out_dir = storage.resolve(out_dir)
    order = np.argsort(-a.attention) if a.attention is not None else []
    s = dict(sel.describe(pre), n_windows=a.n_windows, mask_ratio=ratio, seed=self.seed,
             pooled_r2=pooled["r2"], pooled_mse=pooled["mse"],
             parcels=[{"index": i, "name": names[i], "r2": float(a.r2[i]),
                       **({} if a.attention is None else
                          {"cls_attention": float(a.attention[i])}),
                       **({"network": networks[i]} if networks else {})}
                      for i in range(cfg.num_parcels)],
             top_attention=[names[i] for i in order[:5]], traced=[names[i] for i in chosen],
             coordinates=("from --coords" if self.coords else
                          "checkpoint" if xyz is not None else None))
    s["png"] = {k: storage.join(out_dir, f) for k, (f, _) in figures.items()}
    s["tensorboard"] = storage.join(out_dir, "tensorboard")
    s["report"] = report.write_report(s, out_dir, "visualize", _markdown(s), figures=figures)
    plots.write_tensorboard_images(s["png"], s["tensorboard"], pre.step)
    return s

  def summary(self, results: dict) -> dict[str, float]:
    return {"pooled_r2": results["pooled_r2"], "pooled_mse": results["pooled_mse"]}

  def describe(self, s: dict) -> str:
    r2 = sorted(s["parcels"], key=lambda p: p["r2"])
    lines = [f"{s['checkpoint']['path']} (step {s['checkpoint']['step']}): {s['n_windows']} "
             f"windows of {len(s['subjects'])} subjects, mask ratio {s['mask_ratio']}",
             f"  masked reconstruction: pooled R² {s['pooled_r2']:.3f}, MSE "
             f"{s['pooled_mse']:.3f}",
             f"  per-parcel R²: worst {r2[0]['name']} {r2[0]['r2']:.3f}, best {r2[-1]['name']} "
             f"{r2[-1]['r2']:.3f}"]
    if s["top_attention"]:
      lines.append(f"  most CLS-attended parcels: {', '.join(s['top_attention'])}")
    lines.append(f"  traced parcels: {', '.join(s['traced'])}")
    lines += [f"  {name:24s} {path}" for name, path in s["png"].items()]
    lines.append(f"  tensorboard images       {s['tensorboard']}")
    return "\n".join(lines)
