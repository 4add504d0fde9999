"""Orbax checkpoints of a run: `WORKDIR/checkpoints/<step>/{state, meta}`.

`state` is the whole TrainState pytree (params, optimizer state, step, RNG), saved sharded and
restored onto any mesh. `meta` is JSON: the run's config, the data position (the input pipeline
is stateless in the step, so the next step *is* the position), the robust-scaling statistics
and the parcel coordinates, so probing and fine-tuning can rebuild the model and its inputs.

Saves are atomic (Orbax writes to a temporary directory and renames it when complete), so an
interrupted save never replaces a good checkpoint, and a non-finite state is refused. A step that
cannot be read back is moved (never deleted) to `WORKDIR/checkpoints_unreadable/` by `set_aside`,
and the run resumes from the newest step that restores (`latest_readable_meta`,
`restore_with_fallback`: the one fallback policy of every training job).

Reading another run's checkpoint (transfer jobs): `resolve_step_dir` finds the step directory,
`read_meta` its metadata and `restore_params` only its `params` (an Orbax partial restore: the
optimizer moments never leave the disk), shape-checked against the network that will use them.

The checkpoints directory is local or in a Cloud Storage bucket (gs://); every path here goes
through `storage` (etils.epath), as Orbax's own do, and a local one is made absolute.
"""

from __future__ import annotations

import json
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from brainlm_jax.training import storage


class CheckpointError(RuntimeError):
  pass


def _all_finite(tree: Any) -> bool:
  leaves = [x for x in jax.tree_util.tree_leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
  if not leaves:
    return True
  return bool(jax.device_get(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))))


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for (state, meta) checkpoints."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = storage.resolve(directory)
    found = storage.scheme(self.directory)
    if found is not None and found not in storage.CHECKPOINT_SCHEMES:
      raise CheckpointError(
          f"{self.directory}: Orbax checkpoints need a local directory or "
          f"{' or '.join(s + '://' for s in storage.CHECKPOINT_SCHEMES)}, not {found}://")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("state", "meta"))
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, ValueError) or storage.is_io_error(e):  # e.g. a bucket not writable
        raise CheckpointError(f"{self.directory}: cannot open the checkpoint directory: "
                              f"{type(e).__name__}: {e}") from e
      raise

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Saves (async by default). Refuses a state holding NaN/inf. Returns whether it saved."""
    if not _all_finite(state.params):
      logging.error("Not saving step %d: parameters hold NaN/inf; keeping checkpoint %s",
                    step, self.latest_step())
      return False
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores `step` into the shapes/shardings of `abstract_state` (ShapeDtypeStructs)."""
    try:
      out = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"Cannot restore checkpoint step {step} from {self.directory}: {type(e).__name__}: "
          f"{e}") from e
    return out.state, dict(out.meta)

  def restore_meta(self, step: int) -> dict:
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out.meta)

  def set_aside(self, step: int, reason: str) -> str:
    """Moves an unreadable step out of the manager's sight (kept for inspection). Returns where."""
    src = storage.join(self.directory, str(step))
    dst_root = storage.join(storage.dirname(self.directory), "checkpoints_unreadable")
    dst = storage.join(dst_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0 and storage.isdir(src):
      storage.makedirs(dst_root)
      storage.move(src, dst)
      storage.write_text(storage.join(dst, "UNREADABLE.json"), json.dumps(
          {"step": step, "from": src, "reason": reason}, indent=1))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"brainlm_set_aside_{step}")
    self.manager.reload()
    logging.error("Checkpoint step %d in %s is unreadable (%s); moved it to %s and falling back "
                  "to the previous checkpoint", step, self.directory, reason.splitlines()[0], dst)
    return dst

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings, for a resharding restore."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------------------------
# The fallback policy of a resuming training job.


def latest_readable_meta(checkpointer: Checkpointer) -> tuple[int | None, dict | None]:
  """The newest step whose metadata reads, with it; unreadable newer steps are set aside."""
  for step in sorted(checkpointer.all_steps(), reverse=True):
    try:
      return step, checkpointer.restore_meta(step)
    except Exception as e:  # pylint: disable=broad-except
      checkpointer.set_aside(step, f"{type(e).__name__}: {e}")
  return None, None


def restore_with_fallback(checkpointer: Checkpointer, step: int, abstract: Any, fresh: Any) -> Any:
  """Restores `step`, or else the newest older step that restores (a step that does not is set
  aside); `fresh` when none does."""
  for s in [x for x in sorted(checkpointer.all_steps(), reverse=True) if x <= step]:
    try:
      state, _ = checkpointer.restore(s, abstract)
    except CheckpointError as e:
      checkpointer.set_aside(s, str(e))
      continue
    logging.info("Resumed from %s at step %d", checkpointer.directory, s)
    return state
  logging.error("No readable checkpoint left in %s; starting from step 0", checkpointer.directory)
  return fresh


# ----------------------------------------------------------------------------------------------
# Reading another run's checkpoint: metadata and params only.


def _is_step_dir(path: str) -> bool:
  return storage.basename(path).isdigit() and storage.isdir(storage.join(path, "state"))


def _steps_in(directory: str) -> list[int]:
  """Finished steps in a checkpoints directory (Orbax renames a step dir into place when done)."""
  return sorted(int(n) for n in storage.listdir(directory)
                if n.isdigit() and storage.isdir(storage.join(directory, n, "state")))


def resolve_step_dir(checkpoint: str, step: int | None = None) -> tuple[str, int]:
  """WORKDIR, WORKDIR/checkpoints or WORKDIR/checkpoints/<step> (local or gs://) -> (step dir,
  step)."""
  path = storage.resolve(checkpoint)
  if not storage.exists(path):
    raise CheckpointError(f"{path}: no such checkpoint directory (pass a pretraining --workdir "
                          "or one of its checkpoints/<step> directories)")
  if not storage.isdir(path):
    raise CheckpointError(f"{path}: not a directory (expected a pretraining workdir or a "
                          "checkpoints/<step> directory)")
  if _is_step_dir(path):
    found = int(storage.basename(path))
    if step is not None and int(step) != found:
      raise CheckpointError(f"{path} is the checkpoint of step {found}, but step={step} was asked")
    return path, found
  root = storage.join(path, "checkpoints") if storage.isdir(
      storage.join(path, "checkpoints")) else path
  steps = _steps_in(root)
  if not steps:
    raise CheckpointError(f"{path}: no checkpoints found (expected {root}/<step>/state; has "
                          "pretraining saved one yet?)")
  if step is None:
    return storage.join(root, str(steps[-1])), steps[-1]
  if int(step) not in steps:
    raise CheckpointError(f"{root}: no checkpoint for step {step}; available steps: {steps}")
  return storage.join(root, str(int(step))), int(step)


def read_meta(step_dir: str, required: tuple[str, ...] = ("config", "model", "scaler")) -> dict:
  """The JSON `meta` item of a step directory; CheckpointError naming what is missing."""
  meta_dir = epath.Path(step_dir) / "meta"
  if not meta_dir.is_dir():
    raise CheckpointError(f"{step_dir}: no 'meta' item (not a brainlm pretraining checkpoint?)")
  try:
    meta = dict(ocp.JsonCheckpointHandler().restore(meta_dir))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{meta_dir}: cannot read meta: {type(e).__name__}: {e}") from e
  missing = [k for k in required if k not in meta]
  if missing:
    raise CheckpointError(f"{meta_dir}: meta lacks {missing} (has {sorted(meta)})")
  return meta


def _flat(tree: Any) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def _check_param_shapes(saved: Any, expected: Any, where: str, describe: str) -> None:
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
        f"{where}: the saved params do not match the ModelConfig ({describe}); "
        f"{len(problems)} mismatching key(s):\n  " + "\n  ".join(shown))


def restore_params(step_dir: str, expected: Any, device: jax.Device, describe: str = "") -> Any:
  """Only the `params` subtree of a step's saved state, onto `device`, checked against the
  `expected` abstract params (ShapeDtypeStructs): a mismatch names every differing key."""
  state_dir = epath.Path(step_dir) / "state"
  handler = ocp.PyTreeCheckpointHandler()
  try:
    try:
      saved = handler.metadata(state_dir).tree
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"{state_dir}: cannot read checkpoint metadata: "
                            f"{type(e).__name__}: {e}") from e
    if "params" not in saved:
      raise CheckpointError(f"{state_dir}: no 'params' in the saved state (has {sorted(saved)})")
    _check_param_shapes(saved["params"], expected, state_dir.as_posix(), describe)
    sharding = jax.sharding.SingleDeviceSharding(device)
    item = {"params": jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), expected)}
    restore_args = jax.tree_util.tree_map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
        item)
    try:  # partial_restore: every saved key outside `item` (opt_state, step, rng) is skipped
      return handler.restore(state_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))["params"]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"{state_dir}: cannot restore params: {type(e).__name__}: {e}") from e
  finally:
    handler.close()
