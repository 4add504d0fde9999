"""Window features for linear probes: the pretrained encoder's readings, the same readings of the
same network at random init (several seeds), and functional connectivity, from one pass over the
same windows.

  feats = extract_features(pre, recordings, readings=("cls", "mean", "tokens-fc"),
                           random_seeds=(0, 1, 2), others=[pre_seed1, pre_seed2])
  feats.names                                   every row's name, in table order
  feats.reading(name, fit_rows, rows)           [len(rows), F], statistics from fit_rows only
  fc = fc_features(signal [n, P, W])            [n, P (P - 1) / 2] Pearson (Fisher z)

Readings of an encoder (READINGS; tokens-* only where tokens are parcels' time patches):
  cls, mean            its CLS token / the mean of its other tokens, every token seen      [n, D]
  patches-fc           parcel x parcel correlation of the last layer's per-patch tokens over
                       patches x features, each parcel's mean over the window's patches and
                       each patch's mean over parcels removed (`models.connectivity`
                       .patch_correlation: FC through the encoder), Fisher z   [n, P (P - 1) / 2]
  masked-cls, masked-mean  the same with the encoder seeing what it saw in pretraining: the
                       run's masking (mode, ratio), averaged over `mask_draws` draws      [n, D]
  tokens-fc            parcel x parcel correlation of the per-parcel tokens across the D
                       features, each parcel's mean token (its learned identity) fitted on the
                       training rows and removed first (`readouts.token_fc`) [n, P (P - 1) / 2]
  tokens-pca           each parcel's token on its first k principal directions, fitted per
                       parcel on the training rows (`readouts`)                        [n, P * k]
  masked-tokens-fc, masked-tokens-pca  the same of the masked readout's tokens (a parcel's
                       visible tokens averaged over the draws)
  parcels              (on request) the per-parcel tokens themselves                  [n, P * D]
  layers               (on request) layer<i>-cls / layer<i>-mean: the same read after encoder
                       layer i of 1 .. L - 1 (the residual stream)                         [n, D]
Row names: a reading of the pretrained encoder is its name (`tokens-fc`); of a random-init
encoder, `random-` + it; a second, third, ... pretraining run (`others`) or random seed adds
`@2`, `@3`, ... (`row_name`). `fc`: upper triangle of each (scaled) window's parcel x parcel
Pearson correlation, Fisher z by default [n, P (P - 1) / 2] (NaN, missing, for a recording's dead
parcels' pairs: the probes impute them from the training rows, `linear.py`).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from brainlm_jax.data.windows import iter_windows
from brainlm_jax.models import token_grid, tokens_are_parcel_patches
from brainlm_jax.transfer import functions, readouts
from brainlm_jax.transfer.readouts import token_fc  # noqa: F401  (re-exported)
from brainlm_jax.transfer.run import Pretrained, check_inputs, random_init

READINGS = ("cls", "mean", "patches-fc", "tokens-fc", "tokens-pca", "masked-cls", "masked-mean",
            "masked-tokens-fc", "masked-tokens-pca", "parcels", "layers")
TOKEN_READINGS = {"tokens-fc": ("fc", "tokens"), "tokens-pca": ("pca", "tokens"),
                  "masked-tokens-fc": ("fc", "masked-tokens"),
                  "masked-tokens-pca": ("pca", "masked-tokens")}
AT_RANDOM = ("cls", "mean", "patches-fc", "tokens-fc", "tokens-pca", "masked-cls",
             "masked-mean", "masked-tokens-fc", "masked-tokens-pca")  # what random init is read for
# The default set (fingerprinting halves, phenotype folds): the pooled tokens, random init, FC.
FEATURE_SETS = ("cls", "mean", "random-cls", "random-mean", "fc")
_RUN = re.compile(r"@(\d+)$")


def row_name(reading: str, random: bool = False, run: int = 0) -> str:
  """The row of `reading` for pretraining run `run` (0-based), or random-init seed `run`."""
  return f"{'random-' if random else ''}{reading}{f'@{run + 1}' if run else ''}"


def base_reading(name: str) -> str:
  """The reading of a row name, without its `random-` prefix and `@k` suffix."""
  name = _RUN.sub("", name)
  return name[len("random-"):] if name.startswith("random-") else name


def run_of(name: str) -> int:
  """0-based pretraining run / random seed index of a row name (`tokens-fc@3` -> 2)."""
  m = _RUN.search(name)
  return int(m.group(1)) - 1 if m else 0


def source_of(name: str) -> str:
  """'model' | 'random-init' | 'fc' | the name itself, for a row's name."""
  plain = _RUN.sub("", name)
  if plain.startswith("random-"):
    return "random-init"
  if plain == "fc":
    return "fc"
  if plain in READINGS or plain.startswith("layer") or plain.endswith("model"):
    return "model"
  return name


@dataclasses.dataclass
class WindowFeatures:
  """Per-window features.

  features: row name -> float32 [n, F] (readings without fitted statistics, and fc);
  recording, window int [n]; subject str [n]; paths: the recordings' files (indexed by
  `recording`); tokens: token-table key (`tokens`, `masked-tokens`, with the row prefix/suffix)
  -> float32 [n, P, D]; live float32 [n, P] (0: the recording's dead parcels); fitted: row name ->
  (readouts kind, token-table key) of the readings whose statistics come from training rows."""
  features: dict[str, np.ndarray]
  recording: np.ndarray
  subject: np.ndarray
  window: np.ndarray
  paths: list[str]
  tokens: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  live: np.ndarray | None = None
  fitted: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
  order: list[str] | None = None
  pca_components: int = 4
  fisher_z: bool = True

  @property
  def names(self) -> list[str]:
    """Every row, in table order."""
    return list(self.order) if self.order else list(self.features) + list(self.fitted)

  def fixed(self, name: str) -> bool:
    """Whether a row needs no statistics from training rows (its values are `features[name]`)."""
    return name in self.features

  def fit(self, name: str, fit_rows) -> Callable[[np.ndarray], np.ndarray]:
    """Row `name` as a function of window indices -> float32 [len(rows), F]; a fitted reading
    takes every statistic from the windows `fit_rows` only."""
    if name in self.features:
      x = self.features[name]
      return lambda rows: x[np.asarray(rows)]
    kind, key = self.fitted[name]
    return readouts.fit_reading(kind, self.tokens[key], self.live, fit_rows,
                                components=self.pca_components, fisher_z=self.fisher_z)

  def reading(self, name: str, fit_rows, rows) -> np.ndarray:
    """`fit(name, fit_rows)(rows)`."""
    return self.fit(name, fit_rows)(rows)

  def dim(self, name: str) -> int:
    """Features per window of row `name`."""
    if name in self.features:
      return int(self.features[name].shape[1])
    kind, key = self.fitted[name]
    p = self.tokens[key].shape[1]
    return p * (p - 1) // 2 if kind == "fc" else p * min(self.pca_components,
                                                          self.tokens[key].shape[2])


def correlation_features(corr: np.ndarray, fisher_z: bool = True,
                         live: np.ndarray | None = None) -> np.ndarray:
  """corr [n, P, P] -> float32 [n, P (P - 1) / 2]: the upper triangle (k=1), arctanh-ed (clipped
  at |r| < 1 - 1e-6) if fisher_z; live [n, P]: 0 marks a dead (constant) parcel of the window's
  recording, whose pairs are NaN (missing, not "uncorrelated")."""
  iu = np.triu_indices(corr.shape[1], k=1)
  r = np.asarray(corr)[:, iu[0], iu[1]]
  if fisher_z:
    r = np.arctanh(np.clip(r, -1 + 1e-6, 1 - 1e-6))
  if live is not None:
    live = np.asarray(live, bool)
    r = np.where(live[:, iu[0]] & live[:, iu[1]], r, np.nan)
  return r.astype(np.float32)


def fc_features(signal: np.ndarray, fisher_z: bool = True,
                live: np.ndarray | None = None) -> np.ndarray:
  """signal [n, P, W] -> float32 [n, P (P - 1) / 2]: `correlation_features` of each window's
  parcel x parcel Pearson correlation (float64)."""
  x = np.asarray(signal, np.float64)
  x = x - x.mean(axis=-1, keepdims=True)
  norm = np.sqrt((x * x).sum(axis=-1, keepdims=True))
  x = x / np.where(norm > 0, norm, 1.0)
  return correlation_features(np.matmul(x, x.transpose(0, 2, 1)), fisher_z, live)


@dataclasses.dataclass
class _Encoder:
  """One network to read: its params, the row-name prefix/suffix, what to read of it."""
  params: object
  random: bool
  run: int
  readings: tuple[str, ...]

  def name(self, reading: str) -> str:
    return row_name(reading, self.random, self.run)


class _Reader:
  """Accumulates one encoder's readings over batches of windows."""

  def __init__(self, enc: _Encoder, layers: bool):
    self.enc, self.layers = enc, layers
    self.out = collections.defaultdict(list)

  def add(self, name: str, value: np.ndarray):
    self.out[self.enc.name(name)].append(value)

  def read(self, full: dict | None, masked: list[dict], n: int, live: np.ndarray,
           fisher_z: bool):
    """full: the readout of every token (or None); masked: one readout per mask draw; live
    [n, P] (0: a dead parcel, whose pairs are missing)."""
    want = set(self.enc.readings)
    if full is not None:
      for r in ("cls", "mean"):
        if r in want:
          self.add(r, full[r][-1, :n])
      if "patches-fc" in want and "patch_corr" in full:
        self.add("patches-fc", correlation_features(full["patch_corr"][:n], fisher_z, live))
      for i in range(len(full["cls"]) - 1 if "layers" in want else 0):
        self.add(f"layer{i + 1}-cls", full["cls"][i, :n])
        self.add(f"layer{i + 1}-mean", full["mean"][i, :n])
      if "parcel_sum" in full:
        tokens = full["parcel_sum"][:n] / full["parcel_count"][:n, :, None]
        if "parcels" in want:
          self.add("parcels", tokens.reshape(n, -1))
        if want & {"tokens-fc", "tokens-pca"}:
          self.add("tokens", tokens)
    if masked:
      for r in ("cls", "mean"):
        if f"masked-{r}" in want:
          self.add(f"masked-{r}", np.mean([m[r][-1, :n] for m in masked], axis=0))
      if want & {"masked-tokens-fc", "masked-tokens-pca"} and "parcel_sum" in masked[0]:
        total = np.sum([m["parcel_sum"][:n] for m in masked], axis=0)
        count = np.sum([m["parcel_count"][:n] for m in masked], axis=0)[..., None]
        with np.errstate(invalid="ignore", divide="ignore"):
          self.add("masked-tokens", np.where(count > 0, total / np.maximum(count, 1), np.nan))


def _masking_of(pre: Pretrained) -> dict:
  m = dict(pre.config.get("masking", {}))
  return {"mode": m.get("mode", "uniform"), "ratio": float(m.get("ratio", 0.5)),
          "forecast_patches": int(m.get("forecast_patches", 1))}


def extract_features(pre: Pretrained, recordings: Sequence, *,
                     readings: Sequence[str] = ("cls", "mean"),
                     random_seeds: Sequence[int] = (0,), fc: bool = True,
                     others: Sequence[Pretrained] = (), batch_size: int = 32,
                     fisher_z: bool = True, min_windows: int = 1, mask_draws: int = 2,
                     mask_seed: int = 0, pca_components: int = 4) -> WindowFeatures:
  """One pass over every non-overlapping window of `recordings` per pretraining run (each scaled
  with its run's scaler; random-init encoders and FC with `pre`'s); at least `min_windows`
  (then overlapping) of a recording longer than one window.

  Args:
    recordings: `Recording`s with pre.model_cfg.num_parcels parcels.
    readings: of READINGS, read of `pre`, of each of `others` and (those in AT_RANDOM) of a
      random-init encoder of each of `random_seeds` (`state.init_params(cfg, seed)`: seed s is
      the init a pretraining run of seed s started from).
    fc: add the `fc` row.
    others: more pretraining runs of the same network (e.g. other seeds): rows `<reading>@2`, ...
    mask_draws: masks per window of the masked-* readings (the run's masking mode and ratio;
      window i's draw d is a pure function of (mask_seed, d, i)).
    pca_components: k of the tokens-pca readings.
  """
  unknown = sorted(set(readings) - set(READINGS))
  if unknown:
    raise ValueError(f"unknown reading(s) {unknown}; choose from {READINGS}")
  check_inputs(pre, recordings)
  cfg, _ = functions.unscanned(pre.model_cfg, pre.params)
  readings = tuple(r for r in READINGS if r in readings)
  if not tokens_are_parcel_patches(cfg):
    dropped = [r for r in readings if "tokens" in r or r in ("parcels", "patches-fc")]
    if dropped:
      logging.info("%s: the %s network's tokens are not parcels' time patches", dropped,
                   cfg.variant)
    readings = tuple(r for r in readings if r not in dropped)
  for other in others:
    if other.model_cfg != pre.model_cfg:
      raise ValueError(f"{other.path}: another network than {pre.path}'s; the runs compared "
                       "in one probe must share the model config")
  at_random = tuple(r for r in readings if r in AT_RANDOM)
  passes = [(pre, [_Encoder(functions.unscanned(pre.model_cfg, pre.params)[1], False, 0,
                            readings)]
             + [_Encoder(functions.unscanned(pre.model_cfg, random_init(pre, s).params)[1], True,
                         k, at_random) for k, s in enumerate(random_seeds) if at_random])]
  passes += [(o, [_Encoder(functions.unscanned(o.model_cfg, o.params)[1], False, k + 1,
                           readings)]) for k, o in enumerate(others)]
  full_fn = functions.encode_readout_fn(cfg)
  grid = token_grid(cfg)
  every = np.arange(grid[0] * grid[1], dtype=np.int32)
  masking = _masking_of(pre)
  out: dict[str, list] = collections.defaultdict(list)
  rec, win, live = [], [], []
  for p, (run, encoders) in enumerate(passes):
    coords = None if run.coords is None else jnp.asarray(run.coords)
    readers = [_Reader(e, "layers" in readings) for e in encoders]
    first = 0
    for b in iter_windows(recordings, run.scaler, window=cfg.window, batch_size=batch_size,
                          min_windows=min_windows):
      index = np.arange(first, first + len(b.signal))
      draws = [functions.readout_ids(mask_seed, d, index, grid, **masking)
               for d in range(mask_draws)]
      ids_all = np.broadcast_to(every, (len(b.signal), every.size))
      for reader in readers:
        want = set(reader.enc.readings)
        full = (jax.device_get(full_fn(reader.enc.params, b.signal, coords, ids_all, b.live))
                if want - {r for r in READINGS if r.startswith("masked-")} else None)
        masked = ([jax.device_get(full_fn(reader.enc.params, b.signal, coords, ids, b.live))
                   for ids in draws] if any(r.startswith("masked-") for r in want) else [])
        reader.read(full, masked, b.n, b.live[:b.n], fisher_z)
      if p == 0:
        if fc:
          out["fc"].append(fc_features(b.signal[:b.n], fisher_z, b.live[:b.n]))
        rec.append(b.recording), win.append(b.window), live.append(b.live[:b.n])
      first += b.n
    for reader in readers:
      for k, v in reader.out.items():
        out[k] = v
  tables = {k: np.concatenate(v) for k, v in out.items()}
  token_keys = {k for k in tables if base_reading(k) in ("tokens", "masked-tokens")}
  tokens = {k: tables.pop(k) for k in token_keys}
  fitted, order = {}, []
  for _, encoders in passes:
    for e in encoders:
      for r in e.readings:
        if r in TOKEN_READINGS:
          kind, table = TOKEN_READINGS[r]
          fitted[e.name(r)] = (kind, e.name(table))
          order.append(e.name(r))
        elif r == "layers":
          order += [k for k in tables if re.fullmatch(
              rf"layer\d+-(cls|mean){re.escape(e.name('')) if e.run else ''}", k)]
        else:
          order.append(e.name(r))
  order = _table_order(order + (["fc"] if fc else []))
  rec = np.concatenate(rec)
  subjects = np.asarray([r.subject for r in recordings])
  return WindowFeatures(
      features={k: tables[k] for k in order if k in tables}, recording=rec,
      subject=subjects[rec], window=np.concatenate(win), paths=[r.path for r in recordings],
      tokens=tokens, live=np.concatenate(live), fitted=fitted, order=order,
      pca_components=pca_components, fisher_z=fisher_z)


def _table_order(names: list[str]) -> list[str]:
  """Pretrained rows (run by run), then random-init rows (seed by seed), then the rest."""
  key = {"model": 0, "random-init": 1}
  return sorted(dict.fromkeys(names), key=lambda n: (key.get(source_of(n), 2), run_of(n)))
