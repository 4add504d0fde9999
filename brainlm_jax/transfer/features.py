"""Window features for linear probes: the encoder's, a random-init encoder's, and functional
connectivity, from one pass over the same windows.

  feats = extract_features(pre, recordings)     WindowFeatures: name -> [n_windows, F]
  fc = fc_features(signal [n, P, W])           [n, P (P - 1) / 2] Pearson (Fisher z)

Feature sets:
  cls, mean                 the pretrained encoder's CLS token / mean of the other tokens  [n, D]
  random-cls, random-mean   the same from a randomly initialised encoder of the same config
  parcels                   (on request) the last layer's tokens averaged over time, per
                            parcel                                                [n, P * D]
  tokens-fc, random-tokens-fc  (on request: "tokens-fc" gives both) a parcel x parcel reading
                            of those per-parcel tokens (pretrained / random-init encoder): the
                            Pearson correlation of two parcels' tokens across the D features,
                            after removing the window's mean token (`token_fc`), Fisher z
                            (like parcels, only where tokens are parcels' time patches)
                                                                         [n, P (P - 1) / 2]
  layer<i>-cls, layer<i>-mean  (on request: "layers") the same read after encoder layer i of
                            1 .. L - 1 (the residual stream; cls/mean are layer L's)     [n, D]
  fc                        upper triangle of the parcel x parcel Pearson correlation of each
                            (scaled) window, Fisher z by default         [n, P (P - 1) / 2]
                            (NaN, missing, for the pairs of a recording's dead parcels: the
                            probes impute them from the training rows, `linear.py`)
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from brainlm_jax.data.windows import iter_windows
from brainlm_jax.transfer import functions
from brainlm_jax.transfer.run import Pretrained, check_inputs, random_init

FEATURE_SETS = ("cls", "mean", "random-cls", "random-mean", "fc")
EXTRA_SETS = ("parcels", "layers", "tokens-fc")  # on request (the clinical probe's readings)
SOURCE = {"cls": "model", "mean": "model", "random-cls": "random-init",
          "random-mean": "random-init", "fc": "fc", "parcels": "model", "tokens-fc": "model",
          "random-tokens-fc": "random-init"}


def source_of(name: str) -> str:
  """'model' | 'random-init' | 'fc' | the name itself, for a feature set's name."""
  return SOURCE.get(name, "model" if name.startswith("layer") else name)


@dataclasses.dataclass
class WindowFeatures:
  """Per-window features. features: name -> float32 [n, F]; recording, window int [n]; subject
  str [n]; paths: the recordings' files (indexed by `recording`)."""
  features: dict[str, np.ndarray]
  recording: np.ndarray
  subject: np.ndarray
  window: np.ndarray
  paths: list[str]


def fc_features(signal: np.ndarray, fisher_z: bool = True,
                live: np.ndarray | None = None) -> np.ndarray:
  """signal [n, P, W] -> float32 [n, P (P - 1) / 2]: upper triangle (k=1) of each window's
  parcel x parcel Pearson correlation, arctanh-ed (clipped at |r| < 1 - 1e-6) if fisher_z.
  live [n, P]: 0 marks a dead (constant) parcel of the window's recording; its pairs are NaN
  (missing, not "uncorrelated")."""
  x = np.asarray(signal, np.float64)
  x = x - x.mean(axis=-1, keepdims=True)
  norm = np.sqrt((x * x).sum(axis=-1, keepdims=True))
  x = x / np.where(norm > 0, norm, 1.0)
  corr = np.einsum("npw,nqw->npq", x, x)
  iu = np.triu_indices(x.shape[1], k=1)
  r = corr[:, iu[0], iu[1]]
  if fisher_z:
    r = np.arctanh(np.clip(r, -1 + 1e-6, 1 - 1e-6))
  if live is not None:
    live = np.asarray(live, bool)
    r = np.where(live[:, iu[0]] & live[:, iu[1]], r, np.nan)
  return r.astype(np.float32)


def token_fc(tokens: np.ndarray, fisher_z: bool = True,
             live: np.ndarray | None = None) -> np.ndarray:
  """tokens [n, P, D] (one per parcel) -> float32 [n, P (P - 1) / 2]: `fc_features` of the tokens
  with the window's mean token (over its live parcels) removed, i.e. the Pearson correlation
  of two parcels' tokens across the D features. It keeps the parcel x parcel structure that
  pooling the tokens throws away. live [n, P]: a dead parcel's pairs are NaN, as in FC."""
  x = np.asarray(tokens, np.float64)
  w = np.ones(x.shape[:2]) if live is None else np.asarray(live, np.float64)
  mean = (x * w[..., None]).sum(axis=1) / np.maximum(w.sum(axis=1), 1.0)[:, None]
  return fc_features(x - mean[:, None], fisher_z, live)


def extract_features(pre: Pretrained, recordings: Sequence, *, batch_size: int = 32,
                     seed: int = 0, fisher_z: bool = True,
                     feature_sets: Sequence[str] = FEATURE_SETS,
                     min_windows: int = 1) -> WindowFeatures:
  """One pass over every non-overlapping window of `recordings` (scaled with `pre.scaler`); at
  least `min_windows` (then overlapping) of a recording longer than one window.

  Args:
    recordings: `Recording`s with pre.model_cfg.num_parcels parcels.
    seed: seed of the random-init encoder.
    feature_sets: a subset of FEATURE_SETS + EXTRA_SETS.
  """
  unknown = sorted(set(feature_sets) - set(FEATURE_SETS + EXTRA_SETS))
  if unknown:
    raise ValueError(f"unknown feature set(s) {unknown}; choose from {FEATURE_SETS + EXTRA_SETS}")
  check_inputs(pre, recordings)
  encoders = {}
  deep_sets = set(EXTRA_SETS) & set(feature_sets)
  if {"cls", "mean"} & set(feature_sets) and not deep_sets:
    encoders[""] = pre.params
  rand = random_init(pre, seed) if {"random-cls", "random-mean", "tokens-fc"} & set(
      feature_sets) else None  # one random-init encoder for every random-* set
  if {"random-cls", "random-mean"} & set(feature_sets):
    encoders["random-"] = rand.params
  fn = functions.encode_fn(pre.model_cfg)
  deep, random_deep = None, None
  if deep_sets:  # every layer (the last: cls, mean), and per-parcel pooling, in one pass
    cfg, deep_params = functions.unscanned(pre.model_cfg, pre.params)
    deep = functions.encode_layers_fn(cfg)
    if "tokens-fc" in feature_sets:
      random_deep = functions.unscanned(pre.model_cfg, rand.params)[1]
  coords = None if pre.coords is None else jnp.asarray(pre.coords)
  out = collections.defaultdict(list)
  rec, win = [], []
  for b in iter_windows(recordings, pre.scaler, window=pre.model_cfg.window,
                        batch_size=batch_size, min_windows=min_windows):
    for prefix, params in encoders.items():
      cls, mean = jax.device_get(fn(params, b.signal, coords))
      out[prefix + "cls"].append(cls[:b.n])
      out[prefix + "mean"].append(mean[:b.n])
    if deep is not None:
      layers = jax.device_get(deep(deep_params, b.signal, coords))
      for name in ("cls", "mean"):
        if name in feature_sets:
          out[name].append(layers[name][-1, :b.n])
      if "parcels" in feature_sets and "parcels" in layers:
        out["parcels"].append(layers["parcels"][:b.n].reshape(b.n, -1))
      if "tokens-fc" in feature_sets and "parcels" in layers:
        random_tokens = jax.device_get(deep(random_deep, b.signal, coords))["parcels"]
        for prefix, tokens in (("", layers["parcels"]), ("random-", random_tokens)):
          out[prefix + "tokens-fc"].append(token_fc(tokens[:b.n], fisher_z, b.live[:b.n]))
      for i in range(len(layers["cls"]) - 1 if "layers" in feature_sets else 0):
        out[f"layer{i + 1}-cls"].append(layers["cls"][i, :b.n])
        out[f"layer{i + 1}-mean"].append(layers["mean"][i, :b.n])
    if "fc" in feature_sets:
      out["fc"].append(fc_features(b.signal[:b.n], fisher_z, b.live[:b.n]))
    rec.append(b.recording), win.append(b.window)
  rec = np.concatenate(rec)
  subjects = np.asarray([r.subject for r in recordings])
  order = [k for k in FEATURE_SETS if k in feature_sets] + [k for k in out if k not in FEATURE_SETS]
  return WindowFeatures(
      features={k: np.concatenate(out[k]) for k in order},
      recording=rec, subject=subjects[rec], window=np.concatenate(win),
      paths=[r.path for r in recordings])
