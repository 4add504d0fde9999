"""Readings of an encoder's per-parcel tokens whose statistics come from training rows only.

A window's per-parcel tokens, `tokens` float32 [n, P, D] (each parcel's last-layer tokens
averaged over its time patches), carry two things every probe must tell apart: what the window's
signal made of them, and the learned parcel identity (the learned parcel table, or the xyz
projection) that every subject shares. The readings here remove the second with statistics
fitted on the probe's training rows, so a held-out subject never shapes its own features:

  reading = fit_reading("fc", tokens, live, train_rows)        # a FittedReading
  x = reading(rows)                                            # [len(rows), F]

Kinds:
  fc   `token_fc`: remove each parcel's mean token over the training windows (its identity),
       then each window's mean token over its live parcels; correlate every pair of parcels'
       tokens across the D features (Pearson), Fisher z.             [n, P (P - 1) / 2]
  pca  each parcel's token, its training mean removed, projected on its first k principal
       components (fitted per parcel on the training windows).       [n, P * k]

A dead parcel (live 0) or a token the encoder never saw (NaN: a masked readout's parcel that no
mask draw left visible) gives missing (NaN) features, which the probes impute from their
training rows (`linear.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

KINDS = ("fc", "pca")
CHUNK = 256  # windows per matmul in token_fc: [256, P, P] float32 at a time
R_CLIP = 1 - 1e-6


def _usable(tokens: np.ndarray, live: np.ndarray | None) -> np.ndarray:
  """bool [n, P]: the parcel is live in the window's recording and its token is finite."""
  ok = np.isfinite(tokens).all(axis=-1)
  return ok if live is None else ok & (np.asarray(live) > 0)


def parcel_means(tokens: np.ndarray, live: np.ndarray | None = None,
                 rows: np.ndarray | None = None) -> np.ndarray:
  """float64 [P, D]: each parcel's mean token over `rows` (default all) of `tokens` [n, P, D],
  counting only windows where it is usable (live and seen); 0 for a parcel never usable."""
  x = tokens if rows is None else tokens[rows]
  ok = _usable(x, None if live is None else (live if rows is None else live[rows]))
  total = np.einsum("np,npd->pd", ok.astype(np.float64), np.where(ok[..., None], x, 0.0))
  return total / np.maximum(ok.sum(axis=0), 1)[:, None]


def token_fc(tokens: np.ndarray, fisher_z: bool = True, live: np.ndarray | None = None,
             parcel_mean: np.ndarray | None = None) -> np.ndarray:
  """tokens [n, P, D] -> float32 [n, P (P - 1) / 2]: `parcel_mean` [P, D] (fitted elsewhere, e.g.
  `parcel_means` of the training windows) subtracted when given, then each window's mean token
  over its usable parcels; then the upper triangle (k=1) of the parcel x parcel Pearson
  correlation of the tokens across the D features, arctanh-ed (|r| clipped below 1 - 1e-6) if
  fisher_z. live [n, P]: a dead parcel's pairs are NaN, as in FC; so are an unseen token's."""
  n, p, _ = tokens.shape
  iu = np.triu_indices(p, k=1)
  out = np.empty((n, len(iu[0])), np.float32)
  for s in range(0, n, CHUNK):
    x = np.asarray(tokens[s:s + CHUNK], np.float32)
    ok = _usable(x, None if live is None else live[s:s + CHUNK])
    if parcel_mean is not None:
      x = x - np.asarray(parcel_mean, np.float32)
    x = np.where(ok[..., None], x, 0.0)
    w = ok.astype(np.float32)[..., None]
    x = x - (x * w).sum(axis=1, keepdims=True) / np.maximum(w.sum(axis=1, keepdims=True), 1.0)
    x = x - x.mean(axis=-1, keepdims=True)
    norm = np.sqrt((x * x).sum(axis=-1, keepdims=True))
    x = x / np.where(norm > 0, norm, 1.0)
    r = np.matmul(x, x.transpose(0, 2, 1))[:, iu[0], iu[1]]
    if fisher_z:
      r = np.arctanh(np.clip(r, -R_CLIP, R_CLIP))
    out[s:s + CHUNK] = np.where(ok[:, iu[0]] & ok[:, iu[1]], r, np.nan)
  return out


def parcel_components(tokens: np.ndarray, live: np.ndarray | None, mean: np.ndarray,
                      k: int) -> np.ndarray:
  """float32 [P, D, k]: each parcel's first `k` principal directions of its usable tokens
  [n, P, D] (centred by `mean` [P, D]); the sign of each makes its largest entry positive."""
  ok = _usable(tokens, live)
  x = np.where(ok[..., None], tokens - mean, 0.0).astype(np.float64)
  cov = np.einsum("npd,npe->pde", x, x)  # [P, D, D]
  _, vecs = np.linalg.eigh(cov)  # ascending eigenvalues
  comps = vecs[:, :, ::-1][:, :, :k]  # [P, D, k]
  big = np.take_along_axis(comps, np.abs(comps).argmax(axis=1)[:, None, :], axis=1)
  return (comps * np.where(big < 0, -1.0, 1.0)).astype(np.float32)


@dataclasses.dataclass
class FittedReading:
  """A reading whose statistics were fitted on some rows; call it on any rows -> [len(rows), F].

  kind: 'fc' | 'pca'; mean [P, D]: the parcels' training mean tokens; components [P, D, k]
  ('pca' only)."""
  kind: str
  tokens: np.ndarray
  live: np.ndarray | None
  mean: np.ndarray
  components: np.ndarray | None = None
  fisher_z: bool = True

  def __call__(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    rows = np.asarray(rows)
    x = self.tokens[rows]
    live = None if self.live is None else self.live[rows]
    if self.kind == "fc":
      return token_fc(x, self.fisher_z, live, self.mean)
    ok = _usable(x, live)
    y = np.einsum("npd,pdk->npk", (x - self.mean).astype(np.float32), self.components)
    return np.where(ok[..., None], y, np.nan).reshape(len(rows), -1).astype(np.float32)


def fit_reading(kind: str, tokens: np.ndarray, live: np.ndarray | None,
                fit_rows: Sequence[int] | np.ndarray, *, components: int = 4,
                fisher_z: bool = True) -> FittedReading:
  """The `kind` reading of `tokens` [n, P, D] with every statistic (the parcels' mean tokens, the
  per-parcel principal directions) from `fit_rows` only."""
  if kind not in KINDS:
    raise ValueError(f"token reading {kind!r}; expected one of {KINDS}")
  fit_rows = np.asarray(fit_rows)
  if not len(fit_rows):
    raise ValueError("a token reading needs at least one training window")
  mean = parcel_means(tokens, live, fit_rows).astype(np.float32)
  comps = None
  if kind == "pca":
    k = min(int(components), tokens.shape[-1])
    comps = parcel_components(tokens[fit_rows], None if live is None else live[fit_rows], mean, k)
  return FittedReading(kind, tokens, live, mean, comps, fisher_z)
