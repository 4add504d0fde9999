"""Opening a pretraining run for a transfer job: its network, params, scaler, coordinates, split,
and the recordings the job should use.

  pre = load_pretrained(WORKDIR | WORKDIR/checkpoints/<step>)   params only, no optimizer
  rand = random_init(pre, seed)                                  same network, untrained
  sel = select_recordings(pre, data=None, split="auto")          the job's recordings

Only the `params` subtree of the saved TrainState is read (an Orbax partial restore:
`checkpoint.restore_params`), onto one device: what embedding extraction needs.

Splits (one vocabulary for every transfer CLI, `--split`):
  all         every recording of the data
  train       the recordings of the run's training subjects
  validation  the recordings of the run's validation (held-out) subjects
  auto        the job's default: `validation` for jobs that score the pretraining objective
              (evaluate, visualize) on the run's own data, else `all` (with --data, or for jobs
              that cross-validate by subject: probe, finetune)
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import jax
import numpy as np

from brainlm_jax.data import datasets
from brainlm_jax.data.readers import Recording
from brainlm_jax.data.scaling import RobustScaler
from brainlm_jax.models.brainlm import ModelConfig
from brainlm_jax.training import checkpoint as ckpt_lib
from brainlm_jax.training.checkpoint import CheckpointError
from brainlm_jax.training.state import abstract_params, init_params

__all__ = ["Evaluator", "Pretrained", "SPLITS", "Selection", "check_inputs", "from_meta",
           "load_pretrained", "random_init", "select_recordings"]

SPLITS = ("auto", "all", "train", "validation")


@dataclasses.dataclass
class Pretrained:
  """What a transfer job needs from a pretraining run.

  model_cfg: the network's ModelConfig.   params: its params pytree (on one device).
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

  @property
  def data_config(self) -> dict:
    return dict(self.config.get("data", {}))


def from_meta(meta: dict, params: Any, step: int, path: str = "", *,
              model_cfg: ModelConfig | None = None) -> Pretrained:
  """A Pretrained from a checkpoint's `meta` (config, model, scaler, coords, subjects) and its
  params (e.g. a training run's current params)."""
  try:
    cfg = model_cfg or ModelConfig.from_config(meta["model"])
    scaler = RobustScaler.from_dict(meta["scaler"])
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{path or 'checkpoint'} meta: {e}") from e
  coords = meta.get("coords")
  return Pretrained(
      model_cfg=cfg, params=params, scaler=scaler,
      coords=None if coords is None else np.asarray(coords, np.float32),
      config=dict(meta["config"]), step=int(step), subjects=dict(meta.get("subjects") or {}),
      path=path)


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
  step_dir, step = ckpt_lib.resolve_step_dir(checkpoint, step)
  meta = ckpt_lib.read_meta(step_dir)
  pre = from_meta(meta, None, step, step_dir, model_cfg=model_cfg)
  cfg = pre.model_cfg
  pre.params = ckpt_lib.restore_params(
      step_dir, abstract_params(cfg), device or jax.local_devices()[0],
      describe=f"variant={cfg.variant}, hidden_size={cfg.hidden_size}, num_layers="
               f"{cfg.num_layers}, num_parcels={cfg.num_parcels}, ...")
  return pre


def random_init(pre: Pretrained, seed: int = 0) -> Pretrained:
  """The same network (ModelConfig, scaler, coords) with freshly initialised params, placed
  like `pre.params` (so its functions are not recompiled for them)."""
  params = init_params(pre.model_cfg, seed)
  placement = jax.tree_util.tree_leaves(pre.params)[0].sharding
  return dataclasses.replace(pre, params=jax.device_put(params, placement), step=0, path="")


def check_inputs(pre: Pretrained, recordings: Sequence, window: int | None = None) -> int:
  """Raises ValueError unless `recordings` fit the model (parcels, window). Returns the window."""
  cfg = pre.model_cfg
  window = int(window or cfg.window)
  if window != cfg.window:
    raise ValueError(f"window={window}, but the model was pretrained on windows of {cfg.window} "
                     "timepoints")
  if not len(recordings):
    raise ValueError("no recordings")
  for i, r in enumerate(recordings):
    p = (r.signal if isinstance(r, Recording) else np.asarray(r)).shape[-1]
    if p != cfg.num_parcels:
      name = r.path if isinstance(r, Recording) else f"recording {i}"
      raise ValueError(f"{name}: {p} parcels, but the model was pretrained on {cfg.num_parcels}")
  return window


@dataclasses.dataclass
class Selection:
  """The recordings a job uses: recordings, skipped files ({path, reason}), the data they came
  from, the split actually applied ('all' | 'train' | 'validation')."""
  recordings: list
  skipped: list
  data: str
  split: str

  @property
  def subjects(self) -> list[str]:
    return datasets.subjects_of(self.recordings)

  def describe(self, pre: Pretrained) -> dict:
    """Provenance for a report: checkpoint, data, split, counts, overlap with pretraining."""
    subjects = set(self.subjects)
    return {"checkpoint": {"path": pre.path, "step": pre.step}, "data": self.data,
            "split": self.split, "n_recordings": len(self.recordings),
            "subjects": sorted(subjects), "skipped_recordings": self.skipped,
            "pretraining_overlap": {
                "probe_subjects": len(subjects),
                "train": len(subjects & set(pre.subjects.get("train", []))),
                "validation": len(subjects & set(pre.subjects.get("validation", [])))}}


def select_recordings(pre: Pretrained, data: str | None = None, split: str = "auto", *,
                      auto: str = "all", subject_pattern: str | None = None) -> Selection:
  """The recordings of `data` (default: the run's data.path) that `split` names (see the module
  docstring); `auto` is what split='auto' means on the run's own data; `subject_pattern` (a
  regex whose first group is the subject id) defaults to the run's data.subject_pattern."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; expected one of {SPLITS}")
  data_cfg = pre.data_config
  source = "--data" if data else f"the checkpoint's data.path ({pre.path})"
  path = data or data_cfg.get("path")
  if not path:
    raise ValueError(f"no --data given and the checkpoint {pre.path} stores no data.path")
  if isinstance(path, str) and not os.path.exists(path) and not any(c in path for c in "*?["):
    raise FileNotFoundError(f"{path}: data not found (from {source}; pass --data DIR)")
  if split == "auto":
    split = "all" if data else auto
  cfg = pre.model_cfg
  try:
    recs, skipped = datasets.load_recordings(
        path, window=cfg.window, num_parcels=cfg.num_parcels,
        subject_pattern=(subject_pattern or data_cfg.get("subject_pattern")
                         or datasets.DEFAULT_SUBJECT_PATTERN),
        **datasets.recording_options(data_cfg))
  except ValueError as e:  # every file rejected: say what the checkpoint needs
    raise ValueError(f"{path}: no recording fits the checkpoint {pre.path} (pretrained on "
                     f"{cfg.num_parcels} parcels, windows of {cfg.window} timepoints); {e}") from e
  if split != "all":
    wanted = set(pre.subjects.get(split, []))
    if not wanted:
      raise ValueError(f"{pre.path}: the checkpoint lists no {split} subjects; use --split all")
    recs = [r for r in recs if r.subject in wanted]
    if not recs:
      raise ValueError(f"{path}: none of the checkpoint's {split} subjects {sorted(wanted)[:5]} "
                       "is there; use --split all for another cohort")
  return Selection(recs, skipped, str(path), split)


class Evaluator:
  """A transfer job over a pretrained run, selectable by name (`transfer.evaluators`): it is
  configured once (`__init__`: its options, checked there, before any model work), then `run`
  on a `Pretrained` run writes its report into an output directory and returns the results.

  Subclasses set `name`, `auto_split` (what --split auto means on the run's own data) and
  implement `run`; `summary` gives the scalars logged when a pretraining config lists the
  evaluator (`config.evals`), `describe` the lines a CLI prints.
  """
  name = ""
  auto_split = "all"

  def __init__(self, *, data: str | None = None, split: str = "auto",
               subject_pattern: str | None = None):
    if split not in SPLITS:
      raise ValueError(f"split={split!r}; expected one of {SPLITS}")
    try:
      re.compile(subject_pattern or "")
    except re.error as e:
      raise ValueError(f"subject pattern {subject_pattern!r} is not a regex: {e}") from None
    self.data, self.split, self.subject_pattern = data, split, subject_pattern

  def select(self, pre: Pretrained) -> Selection:
    """The recordings this job reads (its --data / --split / --subject-pattern)."""
    return select_recordings(pre, self.data, self.split, auto=self.auto_split,
                             subject_pattern=self.subject_pattern)

  def run(self, pre: Pretrained, out_dir: str) -> dict:
    raise NotImplementedError

  def summary(self, results: dict) -> dict[str, float]:  # pylint: disable=unused-argument
    return {}

  def describe(self, results: dict) -> str:  # pylint: disable=unused-argument
    return ""
