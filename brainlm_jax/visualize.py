"""Figures of a pretrained BrainLM: reconstructions, per-parcel R², CLS attention, embeddings.

Data preparation (pure, unit-tested) is kept apart from plotting:
  analyse(pre, recordings, ...) -> Analysis        masked reconstructions + CLS attention, per parcel
  parcel_sums(pred, target, mask) -> {n, sse, sy, syy} each [P];  parcel_r2(sums) -> [P]
  cls_attention_to_parcels(cls_row [B, 1+K], ids_keep [B, K], P, T) -> [B, P] (rows sum to 1)
  group_by_network(values [P], networks [P]) -> [(network, values)], Yeo-7 order first
  embedding_pca(emb [n, D], subjects [n]) -> EmbeddingPCA
  read_metrics(WORKDIR/metrics.jsonl) -> {name: (steps, values)}
One plotting function per figure, each returning the PNG path:
  plot_traces, plot_parcel_map (nilearn glass brain at the parcel coordinates, or a per-parcel bar
  plot without them), plot_network_attention, plot_embedding_pca, plot_training_curves;
  write_tensorboard_images puts the PNGs into TensorBoard, and visualize_checkpoint does it all.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import json
import os
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from brainlm_jax import attention as attention_lib
from brainlm_jax import masking as masking_lib
from brainlm_jax import metrics as metrics_lib
from brainlm_jax import probe as probe_lib
from brainlm_jax import recordings as recordings_lib
from brainlm_jax import restore
from brainlm_jax.model import BrainLM, ModelConfig

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
SPLITS = ("auto", "validation", "train", "all")


# ----------------------------------------------------------------------------------------------
# Pure data preparation.


def parcel_sums(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None,
                weight: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Per-parcel sufficient statistics of the masked values (`metrics.masked_sums`, per parcel).

  pred/target [B, P, T, L]; mask [B, P, T] (1 = masked; None: every token); weight [B] (0 for
  padding). Returns float64 [P] arrays n, sse, sy, syy (add them up over batches).
  """
  pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  w = np.ones(pred.shape[:3]) if mask is None else np.asarray(mask, np.float64)
  if weight is not None:
    w = w * np.asarray(weight, np.float64)[:, None, None]
  w = np.broadcast_to(w[..., None], pred.shape)
  axes = (0, 2, 3)
  return {"n": w.sum(axes), "sse": (w * np.square(pred - target)).sum(axes),
          "sy": (w * target).sum(axes), "syy": (w * target * target).sum(axes)}


def add_sums(a: dict | None, b: dict) -> dict:
  return dict(b) if a is None else {k: a[k] + b[k] for k in a}


def parcel_r2(sums: dict[str, np.ndarray]) -> np.ndarray:
  """[P] R² per parcel (1 - SSE / SS_tot about that parcel's masked mean; NaN if no spread)."""
  return np.asarray([metrics_lib.reduce_sums({k: v[p] for k, v in sums.items()})["r2"]
                     for p in range(len(sums["n"]))], np.float64)


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
  with open(path, "r", encoding="utf-8") as f:
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


def unscanned(cfg: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
  """The same network with one named module per layer (no nn.scan, no remat), for inspection:
  scanned 'layers' params [num_layers, ...] become 'layer_i'."""
  new_cfg = dataclasses.replace(cfg, scan_layers=False, remat="none")
  if not cfg.scan_layers:
    return new_cfg, params
  params = dict(params)
  for name, n in (("encoder", cfg.num_layers), ("decoder", cfg.decoder_num_layers)):
    stack = dict(params[name])
    layers = stack.pop("layers")
    stack.update({f"layer_{i}": jax.tree_util.tree_map(lambda a, i=i: a[i], layers)
                  for i in range(n)})
    params[name] = stack
  return new_cfg, params


@functools.lru_cache(maxsize=8)
def analysis_fn(cfg: ModelConfig, mode: str, ratio: float, forecast_patches: int):
  """jit-ted (params, signal [B, P, W], coords, rng) -> (pred [B, P, T, L], mask [B, P, T],
  cls_attention [B, 1 + P*T]). `cfg` must be unscanned (see `unscanned`).

  pred/mask: one masked reconstruction (masking `mode`, `ratio`). cls_attention: with every token
  visible, the CLS query's attention in the last encoder layer, averaged over heads.
  """
  model = BrainLM(cfg)
  p, t = cfg.num_parcels, cfg.num_patches
  last = f"layer_{cfg.num_layers - 1}"

  def is_last_ln(mdl, method):
    return method == "__call__" and tuple(mdl.scope.path) == ("encoder", last, "ln_attention")

  def fn(params, signal, coords, rng):
    b = signal.shape[0]
    masking = masking_lib.make_masking(rng, b, p, t, mode=mode, ratio=ratio,
                                       forecast_patches=forecast_patches)
    pred, _ = model.apply({"params": params}, signal, coords, masking, train=False)
    _, inter = model.apply({"params": params}, signal, coords, masking_lib.no_masking(b, p, t),
                           method=BrainLM.encode, capture_intermediates=is_last_ln,
                           mutable=["intermediates"])
    x = inter["intermediates"]["encoder"][last]["ln_attention"]["__call__"][0]  # [B, 1+N, D]
    attn = params["encoder"][last]["attention"]
    proj = lambda y, w: (jnp.einsum("bsd,dhk->bshk", y.astype(jnp.float32), w["kernel"])  # noqa
                         + w["bias"])
    q, k = proj(x[:, :1], attn["query"]), proj(x, attn["key"])
    weights = attention_lib.attention_weights(q, k)  # [B, H, 1, 1+N]
    return pred, masking.mask, weights[:, :, 0].mean(axis=1)

  return jax.jit(fn)


@dataclasses.dataclass
class Analysis:
  """What the figures need from one pass over the windows.

  r2 [P]: masked-reconstruction R² per parcel; sums: its statistics (see `parcel_sums`);
  attention [P]: mean CLS attention share per parcel; example: one window, {signal [P, W],
  pred [P, W], mask [P, T], recording, window}; n_windows.
  """
  r2: np.ndarray
  sums: dict
  attention: np.ndarray
  example: dict
  n_windows: int


def analyse(pre: restore.Pretrained, recordings: Sequence, *, mask_ratio: float | None = None,
            seed: int = 0, batch_size: int = 16, max_windows: int = 0) -> Analysis:
  """Reconstructs every non-overlapping window (up to `max_windows`; 0: all) with the run's
  masking mode at `mask_ratio` (default: the run's), masks drawn from `seed`."""
  window = restore.check_inputs(pre, recordings)
  m = pre.config.get("masking", {})
  mode, ratio = m.get("mode", "parcel"), float(m.get("ratio", 0.75) if mask_ratio is None
                                               else mask_ratio)
  masking_lib.num_visible(mode, 1, pre.model_cfg.num_patches, ratio,
                          int(m.get("forecast_patches", 1)))  # validates the ratio
  cfg, params = unscanned(pre.model_cfg, pre.params)
  fn = analysis_fn(cfg, mode, ratio, int(m.get("forecast_patches", 1)))
  coords = None if cfg.spatial != "xyz" else jnp.asarray(pre.coords)
  key = jax.random.PRNGKey(seed)
  sums, attention, example, n = None, np.zeros(cfg.num_parcels), None, 0
  for i, b in enumerate(restore.iter_windows(recordings, pre.scaler, window=window,
                                             batch_size=batch_size)):
    take = b.n if not max_windows else min(b.n, max_windows - n)
    if take <= 0:
      break
    pred, mask, cls_row = jax.device_get(fn(params, b.signal, coords, jax.random.fold_in(key, i)))
    target = b.signal.reshape(pred.shape)
    weight = (np.arange(len(b.signal)) < take).astype(np.float64)
    sums = add_sums(sums, parcel_sums(pred, target, mask, weight))
    tokens = cfg.num_parcels * cfg.num_patches  # every token visible in the attention pass
    ids = np.broadcast_to(np.arange(tokens), (len(b.signal), tokens))
    attention += cls_attention_to_parcels(cls_row, ids, cfg.num_parcels,
                                          cfg.num_patches)[:take].sum(axis=0)
    if example is None:
      example = {"signal": b.signal[0], "pred": pred[0].reshape(cfg.num_parcels, window),
                 "mask": mask[0], "recording": int(b.recording[0]), "window": int(b.window[0])}
    n += take
  return Analysis(parcel_r2(sums), sums, attention / max(n, 1), example, n)


# ----------------------------------------------------------------------------------------------
# Figures (Agg canvas; no pyplot state except inside nilearn).


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=C0415
  from matplotlib.figure import Figure  # pylint: disable=C0415
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  return path


def plot_traces(example: dict, parcels: Sequence[int], names: Sequence[str], path: str, *,
                tr: float | None = None, patch_len: int, r2: np.ndarray | None = None,
                title: str = "") -> str:
  """True vs reconstructed time series of one window for `parcels`; masked patches shaded, the
  reconstruction drawn on the masked patches (what the loss sees)."""
  sig, pred, mask = example["signal"], example["pred"], example["mask"]
  w = sig.shape[1]
  x = np.arange(w) * (tr or 1.0)
  fig = _figure(10, 1.9 * len(parcels) + 0.8)
  for row, p in enumerate(parcels):
    ax = fig.add_subplot(len(parcels), 1, row + 1)
    masked_t = np.repeat(mask[p] > 0, patch_len)
    for j in np.flatnonzero(mask[p] > 0):
      ax.axvspan(x[j * patch_len], x[min((j + 1) * patch_len, w - 1)], color="0.88", lw=0)
    ax.plot(x, sig[p], color="black", lw=1.1, label="true (scaled)")
    ax.plot(x, np.where(masked_t, pred[p], np.nan), color="tab:red", lw=1.3,
            label="reconstructed (masked patches)")
    label = f"{names[p]}" + (f"  (R² {r2[p]:.2f} over all windows)" if r2 is not None else "")
    ax.set_ylabel("signal", fontsize=8)
    ax.set_title(label, fontsize=9, loc="left")
    ax.tick_params(labelsize=8)
    if row == 0:
      ax.legend(loc="upper right", fontsize=7, ncol=2, framealpha=0.8)
  ax.set_xlabel("time (s)" if tr else "time (timepoints)", fontsize=9)
  fig.suptitle(title or "True vs reconstructed (grey: masked patches)", fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def plot_parcel_map(values: np.ndarray, coords: np.ndarray | None, path: str, *, title: str,
                    label: str, cmap: str = "viridis", vmin: float | None = None,
                    vmax: float | None = None, names: Sequence[str] | None = None) -> str:
  """Per-parcel values as a brain map: nilearn glass-brain markers at `coords` [P, 3] (MNI mm);
  without coordinates a per-parcel bar plot, titled as such."""
  values = np.asarray(values, np.float64)
  finite = values[np.isfinite(values)]
  if vmin is None:
    vmin = float(np.percentile(finite, 2)) if finite.size else 0.0
  if vmax is None:
    vmax = float(np.percentile(finite, 98)) if finite.size else 1.0
  if vmax <= vmin:
    vmax = vmin + 1e-6
  import matplotlib  # pylint: disable=import-outside-toplevel
  if coords is not None:
    from nilearn import plotting  # pylint: disable=import-outside-toplevel
    fig = _figure(11, 3.8)
    shown = np.where(np.isfinite(values), values, vmin)
    size = 30.0 if len(values) < 150 else 14.0
    plotting.plot_markers(np.clip(shown, vmin, vmax), np.asarray(coords), node_size=size,
                          node_cmap=cmap, node_vmin=vmin, node_vmax=vmax, display_mode="lyrz",
                          figure=fig, axes=(0.0, 0.0, 0.9, 0.9), title=None, alpha=0.9,
                          colorbar=False)
    bar = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(vmin, vmax), cmap)
    fig.colorbar(bar, cax=fig.add_axes([0.915, 0.12, 0.013, 0.72]), label=label)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
  p = len(values)
  fig = _figure(max(8.0, min(0.09 * p + 2, 20)), 4.0)
  ax = fig.add_subplot(1, 1, 1)
  norm = matplotlib.colors.Normalize(vmin, vmax)
  ax.bar(np.arange(p), np.nan_to_num(values), color=matplotlib.colormaps[cmap](norm(values)),
         width=0.85)
  ax.set_xlim(-1, p)
  ax.set_xlabel("parcel index (no coordinates: pass --coords for a glass-brain map)", fontsize=9)
  ax.set_ylabel(label, fontsize=9)
  ax.axhline(0, color="black", lw=0.6)
  ax.grid(axis="y", alpha=0.3)
  if names is not None and p <= 40:
    ax.set_xticks(np.arange(p))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
  ax.set_title(f"{title}\n(per-parcel plot: no parcel coordinates)", fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def plot_network_attention(values: np.ndarray, networks: Sequence[str], path: str, *,
                           title: str) -> str:
  """CLS attention share per parcel grouped by network: a box per network with its parcels as
  points, and the network's total share annotated."""
  groups = group_by_network(values, networks)
  total = float(np.sum(values))
  fig = _figure(max(6.0, 1.1 * len(groups) + 2), 4.4)
  ax = fig.add_subplot(1, 1, 1)
  ax.boxplot([g for _, g in groups], positions=np.arange(len(groups)), widths=0.6,
             showfliers=False)
  rng = np.random.default_rng(0)
  for i, (_, g) in enumerate(groups):
    ax.scatter(i + rng.uniform(-0.18, 0.18, len(g)), g, s=10, alpha=0.6, color="tab:blue")
  uniform = 1.0 / len(values)
  ax.axhline(uniform, color="red", ls="--", lw=1, label=f"uniform (1/{len(values)})")
  ax.set_xticks(np.arange(len(groups)))
  ax.set_xticklabels([f"{n}\n{len(g)} parcels\n{100 * g.sum() / total:.1f}% total"
                      for n, g in groups], fontsize=8)
  ax.set_ylabel("CLS attention share per parcel", fontsize=9)
  ax.legend(fontsize=8, loc="upper right")
  ax.grid(axis="y", alpha=0.3)
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def _colours(values: list[str]):
  """Labels -> (float values, True) when numeric with > 4 distinct values (a colour scale), else
  (category ids, False) (a legend)."""
  nums = [probe_lib._as_float(v) for v in values]  # pylint: disable=protected-access
  if nums and all(v is not None for v in nums) and len(set(nums)) > 4:
    return np.asarray(nums), True
  cats = probe_lib._sorted_classes(values)  # pylint: disable=protected-access
  return np.asarray([cats.index(v) for v in values]), False


def plot_embedding_pca(pcas: dict[str, EmbeddingPCA], path: str, *,
                       colour_by: dict[str, str] | None = None, colour_name: str = "subject",
                       title: str = "") -> str:
  """One panel per embedding kind ('mean', 'cls'): windows (small) and subject means (large,
  outlined) on the first two PCs, coloured by a phenotype {subject: value} or by subject."""
  fig = _figure(5.2 * len(pcas) + 1.4, 4.8)
  first = next(iter(pcas.values()))
  has = [s for s in first.subjects if colour_by is None or s in colour_by]
  if colour_by is not None and not has:
    raise ValueError(f"no subject of the data has a {colour_name!r} value (subjects: "
                     f"{first.subjects[:5]}...)")
  labels = [s if colour_by is None else colour_by[s] for s in has]
  cvals, numeric = _colours(labels)
  import matplotlib  # pylint: disable=import-outside-toplevel
  cmap = matplotlib.colormaps["viridis" if numeric else "tab10" if len(set(labels)) <= 10
                              else "tab20"]
  if numeric:
    norm = matplotlib.colors.Normalize(cvals.min(), cvals.max() if cvals.max() > cvals.min()
                                       else cvals.min() + 1)
    colour_of = {s: cmap(norm(v)) for s, v in zip(has, cvals)}
  else:
    colour_of = {s: cmap(int(v) % cmap.N) for s, v in zip(has, cvals)}
  for i, (kind, pc) in enumerate(pcas.items()):
    ax = fig.add_subplot(1, len(pcas), i + 1)
    for s, xy in zip(pc.subjects, pc.means):
      if s not in colour_of:
        continue
      win = pc.windows[pc.window_subject == s]
      ax.scatter(win[:, 0], win[:, 1], s=12, alpha=0.35, color=colour_of[s], lw=0)
      ax.scatter(xy[0], xy[1], s=110, color=colour_of[s], edgecolor="black", lw=1.0, zorder=3)
    ax.set_xlabel(f"PC1 ({100 * pc.explained[0]:.0f}% var)", fontsize=9)
    ax.set_ylabel(f"PC2 ({100 * pc.explained[1]:.0f}% var)", fontsize=9)
    ax.set_title(f"{kind} embedding (PCA fit on {pc.fit_on})", fontsize=9)
    ax.grid(alpha=0.3)
  if numeric:
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, cax=fig.add_axes([0.895, 0.15, 0.015, 0.68]), label=colour_name)
  else:
    from matplotlib.lines import Line2D  # pylint: disable=import-outside-toplevel
    seen = dict.fromkeys(labels)
    handles = [Line2D([], [], marker="o", ls="", markersize=7, markeredgecolor="black",
                      color=cmap(int(cvals[labels.index(l)]) % cmap.N), label=l) for l in seen]
    fig.legend(handles=handles, title=colour_name, fontsize=7, title_fontsize=8,
               loc="center left", bbox_to_anchor=(0.88, 0.5))
  fig.suptitle(title or "Subject embeddings: large = subject mean, small = windows", fontsize=10)
  fig.subplots_adjust(left=0.07, right=0.86, top=0.86, bottom=0.12, wspace=0.28)
  return _save(fig, path)


def plot_training_curves(metrics: dict[str, tuple[np.ndarray, np.ndarray]], path: str, *,
                         title: str = "Training curves") -> str:
  """Masked MSE (train and eval) and eval R² against step; grad norm when logged."""
  panels = [("masked MSE", [("train_loss", "train (masked MSE)", "tab:blue"),
                            ("eval_loss", "eval (validation)", "tab:orange")]),
            ("eval R² (masked patches)", [("eval_r2", "eval R²", "tab:green")]),
            ("gradient norm", [("grad_norm", "grad norm (before clipping)", "tab:gray")])]
  panels = [(y, [c for c in curves if c[0] in metrics]) for y, curves in panels]
  panels = [(y, curves) for y, curves in panels if curves]
  if not panels:
    raise ValueError(f"no train_loss / eval_loss / eval_r2 in the metrics (have {sorted(metrics)})")
  fig = _figure(4.6 * len(panels), 3.8)
  for i, (ylabel, curves) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    for key, lab, colour in curves:
      steps, vals = metrics[key]
      ax.plot(steps, vals, marker="o" if len(steps) <= 30 else None, ms=3, color=colour, label=lab)
    if ylabel.startswith("eval R²"):
      ax.axhline(0, color="black", lw=0.6, ls=":")
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def write_tensorboard_images(pngs: dict[str, str], logdir: str, step: int) -> str:
  """Writes each PNG as an image summary (tag = its name) at `step` into `logdir`."""
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  from matplotlib import image as mpimg  # pylint: disable=import-outside-toplevel
  images = {}
  for name, p in pngs.items():
    img = mpimg.imread(p)  # float [H, W, 3|4] in [0, 1]
    images[name] = (np.clip(img[..., :3], 0, 1) * 255).round().astype(np.uint8)[None]
  writer = metric_writers.SummaryWriter(logdir)
  try:
    writer.write_images(int(step), images)
    writer.flush()
  finally:
    writer.close()
  return logdir


# ----------------------------------------------------------------------------------------------
# The whole job.


def _select_split(recs: list, pre: restore.Pretrained, split: str, explicit_data: bool) -> list:
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; expected one of {SPLITS}")
  if split == "auto":
    split = "all" if explicit_data else "validation"
  if split == "all":
    return recs
  wanted = set(pre.subjects.get(split, []))
  chosen = [r for r in recs if r.subject in wanted]
  if not chosen:
    raise ValueError(f"none of the {len(recs)} recordings belongs to the checkpoint's {split} "
                     f"subjects {sorted(wanted)[:5]}; pass --split=all")
  return chosen


def visualize_checkpoint(checkpoint: str, out_dir: str, *, data: str | None = None,
                         parcels: str | None = None, network_labels: str | None = None,
                         phenotypes: str | None = None, subject_column: str = "participant_id",
                         color_by: str | None = None, coords: str | None = None,
                         mask_ratio: float | None = None, seed: int = 0, step: int | None = None,
                         split: str = "auto", batch_size: int = 16, max_windows: int = 0,
                         tr: float | None = None) -> dict[str, Any]:
  """Restores a checkpoint, analyses the recordings, writes every figure as OUT/*.png, the same
  images into OUT/tensorboard, and OUT/visualize.json (per-parcel values, paths). Returns that
  summary. `data` defaults to the run's data.path (then only its validation subjects, unless
  `split` says otherwise)."""
  if (phenotypes is None) != (color_by is None):
    raise ValueError("--phenotypes and --color-by go together (the PCA is coloured by a column "
                     "of the phenotype file)")
  colour = probe_lib.read_phenotypes(phenotypes, subject_column, color_by) if phenotypes else None
  pre = restore.load_pretrained(checkpoint, step=step)
  cfg = pre.model_cfg
  data_cfg = pre.config.get("data", {})
  path = data or data_cfg.get("path")
  if not path:
    raise ValueError(f"no --data given and the checkpoint {pre.path} stores no data.path")
  recs, skipped = recordings_lib.load_recordings(
      path, window=cfg.window, num_parcels=cfg.num_parcels,
      subject_pattern=data_cfg.get("subject_pattern") or recordings_lib.DEFAULT_SUBJECT_PATTERN)
  recs = _select_split(recs, pre, split, data is not None)
  xyz = recordings_lib.load_coordinates(coords) if coords else pre.coords
  if xyz is not None and len(xyz) != cfg.num_parcels:
    raise ValueError(f"{coords or 'the checkpoint coordinates'}: {len(xyz)} parcels, but the "
                     f"model has {cfg.num_parcels}")
  names, networks = [f"parcel {i}" for i in range(cfg.num_parcels)], None
  if network_labels:
    names, networks = read_network_labels(network_labels, cfg.num_parcels)
  chosen = parse_parcels(parcels, names) if parcels else None  # bad names fail before any work
  logging.info("Visualising %s (step %d) on %d recordings of %d subjects (%d skipped)", pre.path,
               pre.step, len(recs), len({r.subject for r in recs}), len(skipped))

  a = analyse(pre, recs, mask_ratio=mask_ratio, seed=seed, batch_size=batch_size,
              max_windows=max_windows)
  pooled = metrics_lib.reduce_sums({k: v.sum() for k, v in a.sums.items()})
  ratio = mask_ratio if mask_ratio is not None else pre.config.get("masking", {}).get("ratio")
  where = f"step {pre.step}, {a.n_windows} windows of {len({r.subject for r in recs})} subjects"
  chosen = chosen or parse_parcels(None, names, a.r2)
  out_dir = os.path.abspath(out_dir)
  rec = recs[a.example["recording"]]
  pngs = {
      "traces": plot_traces(
          a.example, chosen, names, os.path.join(out_dir, "traces.png"), tr=tr,
          patch_len=cfg.patch_len, r2=a.r2,
          title=f"{os.path.basename(rec.path)}, window {a.example['window']}: true vs "
                f"reconstructed (mask ratio {ratio}; grey = masked patches)"),
      "r2_map": plot_parcel_map(
          a.r2, xyz, os.path.join(out_dir, "r2_map.png"), names=names, cmap="viridis",
          title=f"Masked-reconstruction R² per parcel ({where}; pooled R² {pooled['r2']:.3f})",
          label="R² of masked patches"),
      "cls_attention_map": plot_parcel_map(
          a.attention * cfg.num_parcels, xyz, os.path.join(out_dir, "cls_attention_map.png"),
          names=names, cmap="magma",
          title=f"CLS attention per parcel, last encoder layer, mean over heads ({where})",
          label="CLS attention share x P (1 = uniform)"),
  }
  if networks is not None:
    pngs["cls_attention_networks"] = plot_network_attention(
        a.attention, networks, os.path.join(out_dir, "cls_attention_networks.png"),
        title=f"CLS attention by network ({where})")
  emb = restore.embed(pre, recs, batch_size=batch_size)
  pcas = {k: embedding_pca(emb[k], emb["subject"], seed) for k in ("mean", "cls")}
  pngs["embeddings_pca"] = plot_embedding_pca(
      pcas, os.path.join(out_dir, "embeddings_pca.png"),
      colour_by=None if colour is None else {s: colour[probe_lib._norm_subject(s)]  # pylint: disable=protected-access
                                             for s in pcas["mean"].subjects
                                             if probe_lib._norm_subject(s) in colour},  # pylint: disable=protected-access
      colour_name=color_by or "subject",
      title=f"Subject embeddings ({where}): large = subject mean, small = windows")
  metrics_path = os.path.join(os.path.dirname(os.path.dirname(pre.path)), "metrics.jsonl")
  if os.path.isfile(metrics_path):
    pngs["training_curves"] = plot_training_curves(
        read_metrics(metrics_path), os.path.join(out_dir, "training_curves.png"),
        title=f"Training curves ({metrics_path})")
  else:
    logging.warning("No %s: skipping the training curves", metrics_path)
  tb = write_tensorboard_images(pngs, os.path.join(out_dir, "tensorboard"), pre.step)
  order = np.argsort(-a.attention)
  summary = {
      "checkpoint": {"path": pre.path, "step": pre.step}, "data": str(path),
      "subjects": sorted({r.subject for r in recs}), "n_windows": a.n_windows,
      "mask_ratio": ratio, "seed": seed, "pooled_r2": pooled["r2"], "pooled_mse": pooled["mse"],
      "parcels": [{"index": i, "name": names[i], "r2": float(a.r2[i]),
                   "cls_attention": float(a.attention[i]),
                   **({"network": networks[i]} if networks else {})}
                  for i in range(cfg.num_parcels)],
      "top_attention": [names[i] for i in order[:5]], "traced": [names[i] for i in chosen],
      "coordinates": "from --coords" if coords else "checkpoint" if xyz is not None else None,
      "png": pngs, "tensorboard": tb}
  with open(os.path.join(out_dir, "visualize.json"), "w", encoding="utf-8") as f:
    json.dump(probe_lib._jsonable(summary), f, indent=1)  # pylint: disable=protected-access
  return summary
