"""The training state and how it is made: TrainState, the optimizer, config checks, init.

  validate_config(config, num_devices)        every config problem in one ValueError, before compiling
  model_config(config, num_parcels, coords?)  config.model with the data-dependent fields resolved
  make_optimizer(config.train)                clip -> AdamW (decay on kernels only) on warmup-cosine
  create_train_state(mcfg, tx, mesh, seed)    the state, initialised directly into its shardings
  abstract_params(mcfg) / init_params(mcfg)   the network's params: shapes only / freshly drawn

The state is one pytree (`TrainState`: step, params, opt_state, rng); shardings come from the
logical axes the model names (`sharding.logical_to_shardings`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from brainlm_jax.models import build_model, token_grid
from brainlm_jax.models import masking as masking_lib
from brainlm_jax.models import objectives
from brainlm_jax.models.brainlm import ModelConfig
from brainlm_jax.training import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key; per-step keys are fold_in(rng, step)


# ----------------------------------------------------------------------------------------------
# Config checks (before anything is compiled).


def validate_config(config: ml_collections.ConfigDict, num_devices: int,
                    num_slices: int | None = None) -> None:
  """Raises ValueError with one clear message per problem in the config (`num_slices` TPU
  slices, default: those of this job's devices: the mesh describes one slice, its data axis
  repeated across them, as `sharding.create_mesh` builds it)."""
  if num_slices is None:
    num_slices = sharding.num_slices(jax.devices())
  m, t = config.model, config.train
  num_devices = int(config.mesh.get("num_devices", 0) or 0) or num_devices
  problems = []
  if m.window % m.patch_len:
    problems.append(f"data.window={m.window} is not divisible by model.patch_len={m.patch_len}")
  for hid, heads, name in ((m.hidden_size, m.num_heads, "model.hidden_size/num_heads"),
                           (m.decoder_hidden_size, m.decoder_num_heads,
                            "model.decoder_hidden_size/decoder_num_heads")):
    if hid % heads:
      problems.append(f"{name}: {hid} is not divisible by {heads} heads")
  try:
    dims = dict(zip(sharding.MESH_AXES,
                    sharding.global_mesh_shape(config.mesh, num_devices, num_slices)))
  except ValueError as e:
    problems.append(str(e))
    dims = None
  if dims:
    shards = dims["data"] * dims["fsdp"]
    if t.batch_size % shards:
      problems.append(f"train.batch_size={t.batch_size} does not divide across the data x fsdp "
                      f"axes ({dims['data']} x {dims['fsdp']} = {shards})")
    per = t.batch_size // max(shards, 1)
    if t.grad_accum_steps < 1 or per % t.grad_accum_steps:
      problems.append(f"train.grad_accum_steps={t.grad_accum_steps} must divide the per-shard "
                      f"batch {per}")
    for size, what in ((m.hidden_size, "model.hidden_size"),
                       (m.decoder_hidden_size, "model.decoder_hidden_size")):
      if size % dims["fsdp"]:
        problems.append(f"{what}={size} is not divisible by mesh.fsdp={dims['fsdp']}")
    for n, what in ((m.num_heads, "model.num_heads"), (m.decoder_num_heads,
                                                       "model.decoder_num_heads"),
                    (m.mlp_dim, "model.mlp_dim"), (m.decoder_mlp_dim, "model.decoder_mlp_dim")):
      if n % dims["tensor"]:
        problems.append(f"{what}={n} is not divisible by mesh.tensor={dims['tensor']}")
  if config.masking.mode not in masking_lib.MODES:
    problems.append(f"masking.mode={config.masking.mode!r}; expected one of {masking_lib.MODES}")
  elif not m.window % m.patch_len:
    try:
      masking_lib.num_visible(config.masking.mode, 1, m.window // m.patch_len,
                              config.masking.ratio, config.masking.forecast_patches)
    except ValueError as e:
      problems.append(str(e))
  if dims and t.eval_batch_size % (dims["data"] * dims["fsdp"]):
    problems.append(f"train.eval_batch_size={t.eval_batch_size} does not divide across the data x "
                    f"fsdp axes ({dims['data'] * dims['fsdp']})")
  if t.loss not in ("mse", "mae"):
    problems.append(f"train.loss={t.loss!r}; expected 'mse' or 'mae'")
  if t.get("on_nonfinite", "skip") not in ("skip", "stop"):
    problems.append(f"train.on_nonfinite={t.on_nonfinite!r}; expected 'skip' or 'stop'")
  objective = t.get("objective", "mae")
  if objective not in objectives.OBJECTIVES:
    problems.append(f"train.objective={objective!r}; expected one of {objectives.OBJECTIVES}")
  elif objective == "conn" and t.get("conn_kind", "deviation") not in objectives.CONN_KINDS:
    problems.append(f"train.conn_kind={t.conn_kind!r}; expected one of {objectives.CONN_KINDS}")
  elif objective == "conn" and int(t.get("target_window", 0)) < 3:
    problems.append(f"train.target_window={t.get('target_window', 0)}: the connectivity "
                    "objective needs a target stretch of at least 3 timepoints")
  if objective == "conn" and t.get("conn_kind", "deviation") == "deviation" and (
      t.grad_accum_steps > 1):
    problems.append(f"train.grad_accum_steps={t.grad_accum_steps}: the deviation loss centres "
                    "on its batch's mean, so micro-batches would change the loss, not only the "
                    "memory; use 1 (a smaller train.batch_size, or more devices)")
  if float(t.get("mae_weight", 0.0)) < 0:
    problems.append(f"train.mae_weight={t.mae_weight} must be >= 0")
  elif (objective == "conn" and float(t.get("mae_weight", 0.0)) > 0
        and config.masking.mode != "forecast" and config.masking.ratio == 0):
    problems.append(f"train.mae_weight={t.mae_weight} asks for masked reconstruction, but "
                    "masking.ratio=0 masks nothing: set --config.masking.ratio (e.g. 0.5)")
  if problems:
    raise ValueError("Invalid config:\n  " + "\n  ".join(problems))


def sample_window(config: ml_collections.ConfigDict) -> int:
  """Timepoints of one training / evaluation sample: the model's window, plus the target
  stretch of the connectivity objective (`train.target_window`)."""
  t = config.train
  extra = int(t.get("target_window", 0)) if t.get("objective", "mae") == "conn" else 0
  return int(config.data.window) + extra


def compute_dtype(dtype: str, platform: str | None = None) -> str:
  """model.dtype 'auto' -> 'bfloat16' on accelerators (TPU, GPU: float32 parameters and
  optimizer state, bf16 matmuls and activations), 'float32' on CPU; other values unchanged.
  `platform`: where the step runs (default: JAX's default backend)."""
  if dtype != "auto":
    return dtype
  return "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"


def model_config(config: ml_collections.ConfigDict, num_parcels: int,
                 has_coords: bool, platform: str | None = None) -> ModelConfig:
  """Resolves the data-dependent fields (parcel count, spatial embedding) of config.model, and
  model.dtype 'auto' for `platform` (default: JAX's default backend; see `compute_dtype`)."""
  d = config.model.to_dict()
  d["dtype"] = compute_dtype(d.get("dtype", "float32"), platform)
  if d["num_parcels"] in (-1, 0, None):
    d["num_parcels"] = num_parcels
  elif d["num_parcels"] != num_parcels:
    raise ValueError(f"model.num_parcels={d['num_parcels']} but the data has {num_parcels}")
  if d["spatial"] == "auto":
    d["spatial"] = "xyz" if has_coords else "learned"
  elif d["spatial"] == "xyz" and not has_coords:
    raise ValueError("model.spatial='xyz' needs data.coords (a `label x y z` file)")
  return ModelConfig.from_config(d)


# ----------------------------------------------------------------------------------------------
# Optimizer.


def make_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
  warmup = min(int(t.warmup_steps), max(int(t.num_steps) - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=warmup,
      decay_steps=max(int(t.num_steps), warmup + 1), end_value=t.learning_rate * t.end_lr_ratio)


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices ('kernel') only; not on biases, norms, tokens or tables."""
  def is_kernel(path, _):
    names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    return bool(names) and names[-1] == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(make_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                  mask=_decay_mask))


# ----------------------------------------------------------------------------------------------
# Params and state.


# A raw PRNG key's shape: what `eval_shape` traces init with. A concrete key made here would be
# placed on the current mesh's devices, which compile-only devices (a TPU topology compiled for on
# a CPU machine, tools/tpu.py) refuse.
KEY_SHAPE = jax.ShapeDtypeStruct((2,), jnp.uint32)


def dummy_inputs(cfg: ModelConfig, batch: int = 1):
  """(signal [B, P, W] zeros, coords [P, 3] zeros | None, all tokens visible): for init."""
  signal = jnp.zeros((batch, cfg.num_parcels, cfg.window), jnp.float32)
  coords = jnp.zeros((cfg.num_parcels, 3), jnp.float32) if cfg.spatial == "xyz" else None
  return signal, coords, masking_lib.no_masking(batch, *token_grid(cfg))


def abstract_params_of(model: nn.Module) -> Any:
  """ShapeDtypeStructs of a module's params (any module taking (signal, coords, masking) with a
  `cfg`, e.g. a fine-tuning head); nothing is allocated."""
  variables = jax.eval_shape(lambda k: model.init(k, *dummy_inputs(model.cfg)), KEY_SHAPE)
  return nn.unbox(variables["params"])


def abstract_params(cfg: ModelConfig) -> Any:
  """ShapeDtypeStructs of the cfg.variant network's params (nothing is allocated)."""
  return abstract_params_of(build_model(cfg))


@functools.lru_cache(maxsize=8)
def _init_fn(cfg: ModelConfig):
  model = build_model(cfg)
  return jax.jit(lambda key: nn.unbox(model.init(key, *dummy_inputs(cfg))["params"]))


def init_params(cfg: ModelConfig, seed: int = 0) -> Any:
  """Freshly initialised params of the cfg.variant network, as `create_train_state` draws them
  for `seed` (compiled once per ModelConfig)."""
  params_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
  return _init_fn(cfg)(params_rng)


def _init_state(model: nn.Module, mcfg: ModelConfig, tx: optax.GradientTransformation, rng):
  params_rng, state_rng = jax.random.split(rng)
  params = model.init(params_rng, *dummy_inputs(mcfg))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng)


def create_train_state(mcfg: ModelConfig, tx: optax.GradientTransformation, mesh, seed: int,
                       model: nn.Module | None = None):
  """Initialises the state directly into its shardings. Returns (state, state_shardings).

  `model` (default `build_model(mcfg)`) is any module taking (signal, coords, masking), e.g. the
  fine-tuning head."""
  model = model or build_model(mcfg)
  init = functools.partial(_init_state, model, mcfg, tx)
  rng = jax.random.PRNGKey(seed)
  with sharding.use_mesh(mesh):
    abstract = jax.eval_shape(init, rng)
    shardings = sharding.logical_to_shardings(abstract, mesh)
    state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def abstract_train_state(mcfg: ModelConfig, tx: optax.GradientTransformation, mesh,
                         model: nn.Module | None = None):
  """(the TrainState as ShapeDtypeStructs carrying their shardings, the shardings), as
  `create_train_state` would make them, without allocating anything: works on any mesh,
  compile-only TPU devices included (nothing is placed on a device)."""
  model = model or build_model(mcfg)
  with sharding.use_mesh(mesh):
    boxed = jax.eval_shape(functools.partial(_init_state, model, mcfg, tx), KEY_SHAPE)
    shardings = sharding.logical_to_shardings(boxed, mesh)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)
  return abstract, shardings
