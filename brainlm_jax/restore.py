"""A pretrained encoder from a pretraining checkpoint, and window embeddings from it.

  load_pretrained(WORKDIR | WORKDIR/checkpoints/<step>) -> Pretrained   params only, no optimizer
  random_init(pre, seed) -> Pretrained                                   same network, untrained
  encoder_fn(model_cfg)(params, signal [B, P, W], coords) -> (cls [B, D], mean [B, D])   jit
  iter_windows(recordings, scaler, window=W) -> WindowBatch ...          scaled [B, P, W] batches
  embed(pre, recordings) -> {'cls': [n, D], 'mean': [n, D], 'recording', 'subject', 'window'}

Only the `params` subtree of the saved TrainState is read (an Orbax partial restore: the
optimizer moments, typically 2x the parameters, never leave the disk). Parameters are restored
onto one device (a SingleDeviceSharding), which is what embedding extraction needs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from brainlm_jax import masking as masking_lib
from brainlm_jax.checkpoint import CheckpointError
from brainlm_jax.input_pipeline import RobustScaler
from brainlm_jax.model import ModelConfig
from brainlm_jax.models import build_model, token_grid
from brainlm_jax.recordings import Recording

__all__ = ["Pretrained", "WindowBatch", "check_inputs", "embed", "encoder_fn", "init_params",
           "iter_windows", "load_pretrained", "random_init", "resolve_step_dir"]


@dataclasses.dataclass
class Pretrained:
  """What probing/fine-tuning needs from a pretraining run.

  model_cfg: the network's ModelConfig.   params: the BrainLM params pytree (on one device).
  scaler: the run's fitted RobustScaler.   coords: float32 [P, 3] parcel coordinates or None.
  config: the run's config (dict).        step: the checkpoint's step.
  subjects: {'train': [...], 'validation': [...]} subjects seen in pretraining.
  path: the step directory it was read from ('' for `random_init`).
  """
  model_cfg: ModelConfig
  params: Any
  scaler: RobustScaler
  coords: np.ndarray | None
  config: dict
  step: int
  subjects: dict
  path: str = ""


# ----------------------------------------------------------------------------------------------
# Restoring.


def _is_step_dir(path: str) -> bool:
  return os.path.basename(os.path.normpath(path)).isdigit() and os.path.isdir(
      os.path.join(path, "state"))


def _steps_in(directory: str) -> list[int]:
  """Finished steps in a checkpoints directory (Orbax renames a step dir into place when done)."""
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n, "state")))


def resolve_step_dir(checkpoint: str, step: int | None = None) -> tuple[str, int]:
  """WORKDIR, WORKDIR/checkpoints or WORKDIR/checkpoints/<step> -> (step dir, step)."""
  path = os.path.abspath(os.fspath(checkpoint))
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such checkpoint directory (pass a pretraining --workdir "
                          "or one of its checkpoints/<step> directories)")
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a directory (expected a pretraining workdir or a "
                          "checkpoints/<step> directory)")
  if _is_step_dir(path):
    found = int(os.path.basename(os.path.normpath(path)))
    if step is not None and int(step) != found:
      raise CheckpointError(f"{path} is the checkpoint of step {found}, but step={step} was asked")
    return path, found
  root = os.path.join(path, "checkpoints") if os.path.isdir(
      os.path.join(path, "checkpoints")) else path
  steps = _steps_in(root)
  if not steps:
    raise CheckpointError(f"{path}: no checkpoints found (expected {root}/<step>/state; has "
                          "pretraining saved one yet?)")
  if step is None:
    return os.path.join(root, str(steps[-1])), steps[-1]
  if int(step) not in steps:
    raise CheckpointError(f"{root}: no checkpoint for step {step}; available steps: {steps}")
  return os.path.join(root, str(int(step))), int(step)


def _dummy_inputs(cfg: ModelConfig, batch: int = 1):
  signal = jnp.zeros((batch, cfg.num_parcels, cfg.window), jnp.float32)
  coords = jnp.zeros((cfg.num_parcels, 3), jnp.float32) if cfg.spatial == "xyz" else None
  return signal, coords, masking_lib.no_masking(batch, *token_grid(cfg))


def abstract_params(cfg: ModelConfig) -> Any:
  """ShapeDtypeStructs of the cfg.variant network's params (nothing is allocated)."""
  model = build_model(cfg)
  variables = jax.eval_shape(lambda k: model.init(k, *_dummy_inputs(cfg)), jax.random.PRNGKey(0))
  return nn.unbox(variables["params"])


def _flat(tree: Any) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def _check_param_shapes(saved: Any, expected: Any, where: str, cfg: ModelConfig) -> None:
  saved_f, exp_f = _flat(saved), _flat(expected)
  problems = [f"{k}: missing from the checkpoint" for k in sorted(set(exp_f) - set(saved_f))]
  problems += [f"{k}: in the checkpoint but not in the model" for k in
               sorted(set(saved_f) - set(exp_f))]
  for k in sorted(set(saved_f) & set(exp_f)):
    s, e = tuple(saved_f[k].shape), tuple(exp_f[k].shape)
    if s != e:
      problems.append(f"{k}: checkpoint shape {s} vs model shape {e}")
  if problems:
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    raise CheckpointError(
        f"{where}: the saved params do not match the ModelConfig (hidden_size="
        f"{cfg.hidden_size}, num_layers={cfg.num_layers}, num_parcels={cfg.num_parcels}, ...); "
        f"{len(problems)} mismatching key(s):\n  " + "\n  ".join(shown))


def _restore_params(handler, state_dir: epath.Path, cfg: ModelConfig, device) -> dict:
  try:
    saved = handler.metadata(state_dir).tree
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{state_dir}: cannot read checkpoint metadata: "
                          f"{type(e).__name__}: {e}") from e
  if "params" not in saved:
    raise CheckpointError(f"{state_dir}: no 'params' in the saved state (has {sorted(saved)})")
  expected = abstract_params(cfg)
  _check_param_shapes(saved["params"], expected, state_dir.as_posix(), cfg)
  sharding = jax.sharding.SingleDeviceSharding(device)
  item = {"params": jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), expected)}
  restore_args = jax.tree_util.tree_map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
      item)
  try:  # partial_restore: every saved key outside `item` (opt_state, step, rng) is skipped
    return handler.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{state_dir}: cannot restore params: {type(e).__name__}: {e}") from e


def load_pretrained(checkpoint: str, *, step: int | None = None,
                    model_cfg: ModelConfig | None = None,
                    device: jax.Device | None = None) -> Pretrained:
  """Restores the params (only) and the run's metadata from a pretraining checkpoint.

  Args:
    checkpoint: a pretraining WORKDIR (its latest step is used), its `checkpoints` directory, or
      a step directory WORKDIR/checkpoints/<step>.
    step: a specific step (with a WORKDIR); default the latest.
    model_cfg: override the ModelConfig stored in the checkpoint's meta (the params must match).
    device: where the params go (default the first local device).

  Raises:
    CheckpointError: missing directory, no checkpoints, unreadable meta/state, or params whose
      keys/shapes do not match the ModelConfig (the mismatching keys are named).
  """
  step_dir, step = resolve_step_dir(checkpoint, step)
  meta_dir = epath.Path(step_dir) / "meta"
  if not meta_dir.is_dir():
    raise CheckpointError(f"{step_dir}: no 'meta' item (not a brainlm pretraining checkpoint?)")
  try:
    meta = dict(ocp.JsonCheckpointHandler().restore(meta_dir))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{meta_dir}: cannot read meta: {type(e).__name__}: {e}") from e
  missing = [k for k in ("config", "model", "scaler") if k not in meta]
  if missing:
    raise CheckpointError(f"{meta_dir}: meta lacks {missing} (has {sorted(meta)})")
  try:
    cfg = model_cfg or ModelConfig.from_config(meta["model"])
    scaler = RobustScaler.from_dict(meta["scaler"])
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{meta_dir}: {e}") from e

  state_dir = epath.Path(step_dir) / "state"
  handler = ocp.PyTreeCheckpointHandler()
  try:
    out = _restore_params(handler, state_dir, cfg, device or jax.local_devices()[0])
  finally:
    handler.close()
  coords = meta.get("coords")
  return Pretrained(
      model_cfg=cfg, params=out["params"], scaler=scaler,
      coords=None if coords is None else np.asarray(coords, np.float32),
      config=dict(meta["config"]), step=step,
      subjects=dict(meta.get("subjects") or {}), path=step_dir)


@functools.lru_cache(maxsize=8)
def _init_fn(cfg: ModelConfig):
  model = build_model(cfg)
  return jax.jit(lambda key: nn.unbox(model.init(key, *_dummy_inputs(cfg))["params"]))


def init_params(cfg: ModelConfig, seed: int = 0) -> Any:
  """Freshly initialised BrainLM(cfg) params, as `train.create_train_state` draws them for
  `seed` (compiled once per ModelConfig)."""
  params_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
  return _init_fn(cfg)(params_rng)


def random_init(pre: Pretrained, seed: int = 0) -> Pretrained:
  """The same network (ModelConfig, scaler, coords) with freshly initialised params, placed
  like `pre.params` (so the encoder is not recompiled for them)."""
  params = init_params(pre.model_cfg, seed)
  placement = jax.tree_util.tree_leaves(pre.params)[0].sharding
  return dataclasses.replace(pre, params=jax.device_put(params, placement), step=0, path="")


# ----------------------------------------------------------------------------------------------
# Windows and embeddings.


@dataclasses.dataclass
class WindowBatch:
  """signal float32 [batch_size, P, W] (zero-padded past `n`); recording, window int [n]."""
  signal: np.ndarray
  n: int
  recording: np.ndarray
  window: np.ndarray


def _signal_of(r: Recording | np.ndarray) -> np.ndarray:
  return r.signal if isinstance(r, Recording) else np.asarray(r)


def iter_windows(recordings: Sequence[Recording | np.ndarray], scaler: RobustScaler | None, *,
                 window: int, stride: int | None = None,
                 batch_size: int = 32) -> Iterator[WindowBatch]:
  """Every window starting at 0, stride, 2*stride, ... (default non-overlapping) of every
  recording in order, each recording scaled whole by `scaler`, in padded batches of a fixed
  size (one compiled shape). Only one recording's scaled copy is held at a time."""
  stride = int(stride or window)
  if batch_size < 1 or stride < 1 or window < 1:
    raise ValueError(f"batch_size ({batch_size}), window ({window}) and stride ({stride}) must "
                     "be >= 1")
  buf_sig, buf_rec, buf_win = [], [], []

  def flush():
    n = len(buf_sig)
    sig = np.zeros((batch_size,) + buf_sig[0].shape, np.float32)
    sig[:n] = np.stack(buf_sig)
    out = WindowBatch(sig, n, np.asarray(buf_rec, np.int64), np.asarray(buf_win, np.int64))
    buf_sig.clear(), buf_rec.clear(), buf_win.clear()
    return out

  for i, r in enumerate(recordings):
    s = _signal_of(r)
    name = r.path if isinstance(r, Recording) else f"recording {i}"
    if s.ndim != 2 or s.shape[0] < window:
      raise ValueError(f"{name}: signal of shape {s.shape} has fewer than window={window} "
                       "timepoints (expected [time, parcels])")
    s = scaler.transform(s, name) if scaler is not None else np.asarray(s, np.float32)
    for j, t in enumerate(range(0, s.shape[0] - window + 1, stride)):
      buf_sig.append(s[t:t + window].T)
      buf_rec.append(i)
      buf_win.append(j)
      if len(buf_sig) == batch_size:
        yield flush()
  if buf_sig:
    yield flush()


@functools.lru_cache(maxsize=8)
def encoder_fn(cfg: ModelConfig):
  """jit-ted (params, signal [B, P, W], coords [P, 3] | None) -> (cls [B, D], mean [B, D]).

  Encodes every token (no masking, no dropout); `mean` averages the non-CLS tokens. One compiled
  function per ModelConfig, shared by the pretrained and the random-init params.
  """
  model = build_model(cfg)

  def fn(params, signal, coords):
    b = signal.shape[0]
    masking = masking_lib.no_masking(b, *token_grid(cfg))
    latent = model.apply({"params": params}, signal, coords, masking, train=False,
                         method=type(model).encode).astype(jnp.float32)
    return latent[:, 0], latent[:, 1:].mean(axis=1)

  return jax.jit(fn)


def check_inputs(pre: Pretrained, recordings: Sequence, window: int | None = None) -> int:
  """Raises ValueError unless `recordings` fit the model (parcels, window). Returns the window."""
  cfg = pre.model_cfg
  window = int(window or cfg.window)
  if window != cfg.window:
    raise ValueError(f"window={window}, but the model was pretrained on windows of {cfg.window} "
                     "timepoints")
  if not len(recordings):
    raise ValueError("embed: no recordings")
  for i, r in enumerate(recordings):
    p = _signal_of(r).shape[-1]
    if p != cfg.num_parcels:
      name = r.path if isinstance(r, Recording) else f"recording {i}"
      raise ValueError(f"{name}: {p} parcels, but the model was pretrained on {cfg.num_parcels}")
  return window


def embed(pre: Pretrained, recordings: Sequence[Recording | np.ndarray], *, batch_size: int = 32,
          window: int | None = None, stride: int | None = None) -> dict[str, np.ndarray]:
  """Encoder embeddings of every window (default non-overlapping), scaled with `pre.scaler`.

  Returns (n = number of windows):
    cls float32 [n, D], mean float32 [n, D] (mean over the P*T non-CLS tokens),
    recording int [n] (index into `recordings`), subject str [n], window int [n] (index of the
    window within its recording).
  """
  window = check_inputs(pre, recordings, window)
  fn = encoder_fn(pre.model_cfg)
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
