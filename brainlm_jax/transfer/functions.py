"""The jit-ted model functions every transfer job uses, built once per ModelConfig through
`models.build_model` (so each variant runs its own network) and traced inside
`sharding.use_mesh` (so the model's activation constraints apply).

  encode_fn(cfg)(params, signal [B, P, W], coords) -> (cls [B, D], mean [B, D])   all tokens seen
  encode_readout_fn(cfg)(params, signal, coords, ids_keep, live) -> {cls, mean [L, B, D],
                        parcel_sum [B, P, D], parcel_count [B, P], patch_corr [B, P, P]}
  readout_ids(seed, draw, index, grid, mode=..., ratio=...) -> ids_keep [B, K]  readout masks
  reconstruct_fn(cfg)(params, signal, coords, masking) -> (pred [B, P, W], mask [B, P, W])
  attention_fn(cfg)(params, signal, coords) -> cls_attention [B, 1 + N]  (last encoder layer)
  window_maskings(seed, first, count, grid, mode=..., ratio=...) -> Masking   per-window masks
  embed(pre, recordings) -> {'cls', 'mean', 'recording', 'subject', 'window'}

Functions run on a one-device mesh (where `run.load_pretrained` puts the params).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from brainlm_jax.data.readers import Recording
from brainlm_jax.data.windows import iter_windows
from brainlm_jax.models import build_model, token_grid, tokens_are_parcel_patches
from brainlm_jax.models import connectivity
from brainlm_jax.models import masking as masking_lib
from brainlm_jax.models.brainlm import ModelConfig
from brainlm_jax.training import sharding
from brainlm_jax.transfer.run import Pretrained, check_inputs

__all__ = ["attention_fn", "embed", "encode_fn", "encode_readout_fn", "readout_ids",
           "reconstruct_fn", "unscanned", "window_maskings"]


def on_mesh(fn: Callable, mesh=None) -> Callable:
  """jax.jit(fn), called (and so traced) inside `sharding.use_mesh(mesh)` (default: a mesh of
  the first local device); `.lower(*args)` lowers it there, `.jitted` is the jax.jit object
  (e.g. for its compilation cache)."""
  jitted = jax.jit(fn)
  mesh = mesh or sharding.single_device_mesh()

  def call(*args):
    with sharding.use_mesh(mesh):
      return jitted(*args)

  def lower(*args):
    with sharding.use_mesh(mesh):
      return jitted.lower(*args)

  call.lower = lower
  call.jitted = jitted
  return call


@functools.lru_cache(maxsize=8)
def encode_fn(cfg: ModelConfig):
  """(params, signal [B, P, W], coords [P, 3] | None) -> (cls [B, D], mean [B, D]) float32.

  Encodes every token (no masking, no dropout); `mean` averages the non-CLS tokens. One compiled
  function per ModelConfig, shared by the pretrained and the random-init params."""
  model = build_model(cfg)

  def fn(params, signal, coords):
    masking = masking_lib.no_masking(signal.shape[0], *token_grid(cfg))
    latent = model.apply({"params": params}, signal, coords, masking, train=False,
                         method=type(model).encode).astype(jnp.float32)
    return latent[:, 0], latent[:, 1:].mean(axis=1)

  return on_mesh(fn)


@functools.lru_cache(maxsize=8)
def encode_readout_fn(cfg: ModelConfig):
  """(params, signal [B, P, W], coords, ids_keep [B, K], live [B, P]) -> {'cls': [L, B, D],
  'mean': [L, B, D], 'parcel_sum': [B, P, D], 'parcel_count': [B, P], 'patch_corr': [B, P, P]}
  float32: the encoder run on the tokens `ids_keep` (all of them: `no_masking`'s; or a
  training-style masking's visible ones), each encoder layer's CLS token and mean of the other
  tokens (layers 1 .. L - 1: the residual stream after the layer; layer L: the final, normed,
  output, as `encode_fn`), and, when its tokens are parcels' time patches, the sum and count of
  each parcel's visible last-layer tokens (their mean: the parcel's token) and their
  `connectivity.patch_correlation` over the live parcels (meaningful when every token is
  visible). `cfg` must be unscanned (see `unscanned`); a variant whose stack records no layer
  outputs gives its last layer only (L = 1)."""
  model = build_model(cfg)
  grid = token_grid(cfg)

  def fn(params, signal, coords, ids_keep, live):
    b = signal.shape[0]
    visible = masking_lib.place_visible(jnp.zeros((b, grid[0] * grid[1]), jnp.float32),
                                        ids_keep, 1.0)
    masking = masking_lib.Masking(ids_keep=ids_keep,
                                  mask=(1.0 - visible).reshape(b, *grid))
    latent, inter = model.apply({"params": params}, signal, coords, masking,
                                method=type(model).encode, mutable=["intermediates"])
    sown = inter.get("intermediates", {}).get("encoder", {}).get("hidden", ())
    x = jnp.stack(list(sown[:-1]) + [latent]).astype(jnp.float32)  # [L, B, 1 + K, D]
    d = latent.shape[-1]
    out = {"cls": x[:, :, 0], "mean": x[:, :, 1:].mean(axis=2)}
    if tokens_are_parcel_patches(cfg):
      tokens = masking_lib.place_visible(jnp.zeros((b, grid[0] * grid[1], d), jnp.float32),
                                         ids_keep, x[-1, :, 1:])
      tokens = tokens.reshape(b, grid[0], grid[1], d)
      out["parcel_sum"] = tokens.sum(axis=2)
      out["parcel_count"] = visible.reshape(b, *grid).sum(axis=2)
      out["patch_corr"] = connectivity.patch_correlation(tokens, live)
    return out

  return on_mesh(fn)


@functools.lru_cache(maxsize=8)
def _readout_masking_fn(rows: int, cols: int, mode: str, ratio: float, forecast: int):
  def fn(seed, draw, index):  # index int32 [B]: the windows' ids
    base = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 0x0DA7), draw)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(index)
    one = lambda k: masking_lib.make_masking(  # noqa: E731
        k, 1, rows, cols, mode=mode, ratio=ratio, forecast_patches=forecast).ids_keep[0]
    return jax.vmap(one)(keys)
  return jax.jit(fn)


def readout_ids(seed: int, draw: int, index: np.ndarray, grid: tuple[int, int], *, mode: str,
                ratio: float, forecast_patches: int = 1) -> np.ndarray:
  """int32 [B, K]: the visible tokens of a training-style masking (`mode`, `ratio`) of the
  windows `index` [B] (their ids, e.g. positions in the feature table), mask draw `draw`: a pure
  function of (seed, draw, window id), whatever the batch."""
  fn = _readout_masking_fn(*grid, mode, float(ratio), int(forecast_patches))
  return np.asarray(fn(seed, draw, jnp.asarray(index, jnp.int32)))


@functools.lru_cache(maxsize=8)
def reconstruct_fn(cfg: ModelConfig):
  """(params, signal [B, P, W], coords, Masking) -> (pred [B, P, W] float32, mask [B, P, W]):
  the variant's reconstruction of every value, and which values were masked."""
  model = build_model(cfg)

  def fn(params, signal, coords, masking):
    return model.apply({"params": params}, signal, coords, masking,
                       method=type(model).reconstruct)

  return on_mesh(fn)


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
def attention_fn(cfg: ModelConfig):
  """(params, signal [B, P, W], coords) -> cls_attention float32 [B, 1 + N]: with every token
  visible, the CLS query's softmax attention over the tokens (CLS itself first) in the last
  encoder layer, averaged over heads. `cfg` must be unscanned (see `unscanned`)."""
  model = build_model(cfg)
  last = f"layer_{cfg.num_layers - 1}"

  def fn(params, signal, coords):
    masking = masking_lib.no_masking(signal.shape[0], *token_grid(cfg))
    _, inter = model.apply({"params": params}, signal, coords, masking,
                           method=type(model).encode, mutable=["intermediates"])
    return inter["intermediates"]["encoder"][last]["attention"]["cls_attention"][0]

  return on_mesh(fn)


@functools.lru_cache(maxsize=8)
def _window_masking_fn(rows: int, cols: int, mode: str, ratio: float, forecast: int):
  def one(seed, index):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
    m = masking_lib.make_masking(key, 1, rows, cols, mode=mode, ratio=ratio,
                                 forecast_patches=forecast)
    return jax.tree_util.tree_map(lambda a: a[0], m)
  return jax.jit(one)  # one compile per masking, whatever the number of windows


def window_maskings(seed: int, first: int, count: int, grid: tuple[int, int], *, mode: str,
                    ratio: float, forecast_patches: int = 1) -> masking_lib.Masking:
  """Maskings (host arrays) of windows first .. first + count - 1 over a (rows, cols) token
  grid; window i's mask depends only on (seed, i): ids_keep [count, K], mask [count, rows,
  cols]."""
  fn = _window_masking_fn(*grid, mode, float(ratio), int(forecast_patches))
  per_window = jax.device_get([fn(seed, i) for i in range(first, first + count)])
  return jax.tree_util.tree_map(lambda *a: np.stack(a), *per_window)


def embed(pre: Pretrained, recordings: Sequence[Recording | np.ndarray], *, batch_size: int = 32,
          stride: int | None = None) -> dict[str, np.ndarray]:
  """Encoder embeddings of every window (default non-overlapping) of `recordings`, scaled with
  the run's scaler.

  Returns (n = number of windows): cls float32 [n, D], mean float32 [n, D] (mean over the non-CLS
  tokens), recording int [n] (index into `recordings`), subject str [n], window int [n] (index
  of the window within its recording).
  """
  window = check_inputs(pre, recordings)
  fn = encode_fn(pre.model_cfg)
  coords = None if pre.coords is None else jnp.asarray(pre.coords)
  cls, mean, rec, win = [], [], [], []
  for b in iter_windows(recordings, pre.scaler, window=window, stride=stride,
                        batch_size=batch_size):
    c, m = jax.device_get(fn(pre.params, b.signal, coords))
    cls.append(c[:b.n]), mean.append(m[:b.n]), rec.append(b.recording), win.append(b.window)
  rec = np.concatenate(rec)
  subjects = np.asarray([r.subject if isinstance(r, Recording) else str(i)
                         for i, r in enumerate(recordings)])
  return {"cls": np.concatenate(cls), "mean": np.concatenate(mean), "recording": rec,
          "subject": subjects[rec], "window": np.concatenate(win)}
