"""Orbax checkpoints of a run: `WORKDIR/checkpoints/<step>/{state, meta}`.

`state` is the whole TrainState pytree (params, optimizer state, step, RNG), saved sharded and
restored onto any mesh. `meta` is JSON: the run's config, the data position (the input pipeline
is stateless in the step, so the next step *is* the position), the robust-scaling statistics
and the parcel coordinates, so probing and fine-tuning can rebuild the model and its inputs.

Saves are atomic (Orbax writes to a temporary directory and renames it when complete), so an
interrupted save never replaces a good checkpoint, and a non-finite state is refused. A step that
cannot be read back is moved (never deleted) to `WORKDIR/checkpoints_unreadable/` by `set_aside`,
and the run resumes from the newest step that restores.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


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
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

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
    src = os.path.join(self.directory, str(step))
    dst_root = os.path.join(os.path.dirname(self.directory), "checkpoints_unreadable")
    dst = os.path.join(dst_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0 and os.path.isdir(src):
      os.makedirs(dst_root, exist_ok=True)
      shutil.move(src, dst)
      with open(os.path.join(dst, "UNREADABLE.json"), "w", encoding="utf-8") as f:
        json.dump({"step": step, "from": src, "reason": reason}, f, indent=1)
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
