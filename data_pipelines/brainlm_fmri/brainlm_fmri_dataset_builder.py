"""TFDS builder `brainlm_fmri`: parcellated fMRI recordings, split by subject, with scaling stats.

Input (``--manual_dir``, the SOURCE folder, searched recursively): parcellated recordings in any
format `brainlm_jax.data.readers` reads -- the ``.npy`` written by ``brainlm-prepare parcellate``
(its ``manifest.jsonl`` then supplies subjects and TRs, its ``coordinates.dat`` the coordinates)
or e.g. the HCP ``.mat`` files. Optional ``participants.tsv`` (BIDS) in SOURCE, or the config's
``phenotypes``, gives per-subject phenotype columns (and ``site``). Without either, SOURCE may
be a cohort folder (`brainlm_jax.data.cohort`: e.g. ABIDE's phenotype table, whose id column
starts the file names, and a site -> TR table beside the recordings): each recording's subject
(the table's subject column, e.g. SUB_ID, else its id), site, TR and phenotype row then come
from it, missing codes (``-9999``, empty) left out. Lists of names beside the recordings (e.g.
``region_names.txt``) are not recordings and are left out.

  tfds build data_pipelines/brainlm_fmri --manual_dir=SOURCE --data_dir=DATA --config=a424
  tfds build data_pipelines/brainlm_fmri --manual_dir=../shared/data/hcp_rest_aal94 \
      --data_dir=DATA --config='{"name": "hcp", "num_parcels": 94, "tr": 0.72}'

One example per recording (``stride == 0``: whole variable-length recordings, what the trainer
reads) or per window (``stride > 0``: ``window`` timepoints every ``stride``). Features: ``signal``
float32 ``[time, parcels]`` (raw, unscaled), ``coordinates`` float32 ``[parcels, 3]`` (``[0, 3]``
when unknown), ``subject``, ``site``, ``path``, ``phenotypes`` (JSON object of the subject's
phenotype row), ``tr`` (seconds, 0 if unknown), ``start`` (first timepoint).

Splits are by subject (a subject is in exactly one of train/validation/test, chosen by a hash of
``(seed, subject)`` as `brainlm_jax.data.datasets.split_by_subject`). The per-parcel robust-scaling
statistics (`brainlm_jax.data.scaling.RobustScaler` over the training subjects, at most
``scaler_max_subjects`` of them) are stored in ``info.metadata['scaler']``; read them back with
`brainlm_jax.data.tfds_source.load_split`.

With a Beam runner (``tfds build ... --beam_pipeline_options=runner=DirectRunner``, or
``brainlm-prepare build --beam``) the examples are read and encoded by Beam workers; without one,
in this process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from brainlm_jax.data import cohort as cohort_lib
from brainlm_jax.data import datasets, phenotypes as phenotypes_lib, readers
from brainlm_jax.data.readers import Recording, RecordingError
from brainlm_jax.data.scaling import RobustScaler

MANIFEST = "manifest.jsonl"
COORDINATES = "coordinates.dat"
PARTICIPANTS = "participants.tsv"
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class BrainLMConfig(tfds.core.BuilderConfig):
  """What to build (pass as ``--config='{"name": ..., FIELD: VALUE}'`` to ``tfds build``).

  Attributes:
    atlas: atlas name (documentation only).
    num_parcels: required parcel count (0: the most common one).
    window: minimum timepoints of a recording (default 1: every recording; a training window
      is chosen at training time); the window length when ``stride > 0``.
    stride: 0 = one example per whole recording; > 0 = windows every ``stride`` timepoints.
    tr: TR (s) of recordings whose TR is not in the manifest (0: unknown).
    target_tr: resample every recording to this TR (s) first (0: keep each one's own TR); a
      recording of unknown TR is then skipped.
    coords: ``label x y z`` file (default: SOURCE/coordinates.dat when present).
    phenotypes: CSV/TSV, one row per subject (default: SOURCE/participants.tsv when present).
    subject_column: its subject column (a ``sub-`` prefix is ignored when matching).
    site_column: its site column (default site: the recording's parent folder name).
    val_fraction, test_fraction: of subjects.
    max_dead_fraction: recordings with up to this share of constant ("dead") parcels are kept
      (the parcels marked missing downstream); more, and the recording is skipped.
    seed: of the subject split.
    center_recordings: RobustScaler option (median-centre each recording first).
    scale_recordings: RobustScaler option (divide each recording by its own per-parcel IQR
      first; for sources in different units).
    scaler_max_subjects: training subjects the scaling statistics are computed on (hash order).
  """

  atlas: str = ""
  num_parcels: int = 0
  window: int = 1
  stride: int = 0
  tr: float = 0.0
  target_tr: float = 0.0
  coords: str = ""
  phenotypes: str = ""
  subject_column: str = "participant_id"
  site_column: str = "site"
  val_fraction: float = 0.15
  test_fraction: float = 0.15
  seed: int = 0
  max_dead_fraction: float = datasets.MAX_DEAD_FRACTION
  center_recordings: bool = True
  scale_recordings: bool = False
  scaler_max_subjects: int = 1000


@dataclasses.dataclass(frozen=True)
class _Item:
  """One input recording, before reading it."""

  path: str
  subject: str
  site: str
  tr: float
  phenotypes: str  # JSON


def _list_items(source: str, config: BrainLMConfig, phenotypes,
                cohort: cohort_lib.Cohort | None = None) -> list[_Item]:
  """Input recordings: the ok rows of SOURCE/manifest.jsonl, else every supported file (but a
  cohort's tables). With a `cohort`, subject, site, TR and phenotypes are its."""
  manifest = os.path.join(source, MANIFEST)
  if os.path.isfile(manifest):
    with open(manifest, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f if line.strip()]
    entries = [(os.path.join(source, r["output"]), r["subject"], r.get("tr"))
               for r in rows if r.get("status") == "ok"]
  else:
    paths = _recording_paths(source, cohort)
    named = {p: cohort.subject(p) for p in paths} if cohort else {}
    by_pattern = [p for p in paths if not named.get(p)]  # a cohort table's ids stay
    named.update(zip(by_pattern, datasets.subjects_from_names(
        by_pattern, [datasets.subject_of(p) for p in by_pattern],
        datasets.DEFAULT_SUBJECT_PATTERN)))
    entries = [(p, named[p], None) for p in paths]
  items = []
  for path, subject, tr in entries:
    row = phenotypes.get(phenotypes_lib.norm_subject(subject), {})
    site = row.get(config.site_column)
    if cohort is not None:
      row, site, tr = cohort.row(path), cohort.site(path), tr or cohort.tr(path)
    site = site or os.path.basename(os.path.dirname(os.path.abspath(path)))
    items.append(_Item(path, subject, site, float(tr or config.tr or 0.0),
                       json.dumps(row, sort_keys=True)))
  return items


def _recording_paths(source: str, cohort: cohort_lib.Cohort | None = None) -> list[str]:
  """The recording files below SOURCE: neither a `cohort`'s tables nor lists of names."""
  paths = datasets.drop_name_lists(datasets.resolve_paths(source, readers.SUPPORTED_EXTENSIONS))
  tables = {os.path.abspath(t) for t in (cohort.phenotypes, cohort.tr_table) if t} if cohort else ()
  return [p for p in paths if os.path.abspath(p) not in tables]


def _split(items: list[_Item], config: BrainLMConfig) -> dict[str, list[_Item]]:
  """train/validation/test by subject (the hash order of `datasets.split_by_subject`)."""
  stubs = [Recording(i.path, i.subject, np.zeros((0, 0), np.float32)) for i in items]
  n = len({i.subject for i in items})
  n_test = int(round(config.test_fraction * n)) if config.test_fraction > 0 else 0
  n_val = int(round(config.val_fraction * n)) if config.val_fraction > 0 else 0
  if n_test + n_val >= n:
    raise ValueError(f"{n} subject(s) cannot give {n_val} validation + {n_test} test subjects "
                     "and keep one for training")
  rest, test = datasets.split_by_subject(stubs, num_val_subjects=n_test, seed=config.seed + 1)
  train, val = datasets.split_by_subject(rest, num_val_subjects=n_val, seed=config.seed)
  by_path = {i.path: i for i in items}
  return {name: [by_path[r.path] for r in part]
          for name, part in zip(SPLITS, (train, val, test))}


def _read(item: _Item, num_parcels: int, config: BrainLMConfig) -> np.ndarray:
  """float32 [time, parcels] (at `target_tr` when set; up to `max_dead_fraction` constant
  parcels kept); RecordingError if unusable."""
  signal = readers.load_at_tr(item.path, num_parcels=num_parcels or None, tr=item.tr,
                              target_tr=config.target_tr,
                              max_dead_fraction=config.max_dead_fraction)
  window = config.window
  if signal.shape[0] < window:
    raise RecordingError(
        item.path, f"{signal.shape[0]} timepoints, shorter than window={window}")
  return signal


def _examples(item: _Item, config: BrainLMConfig, num_parcels: int, coords: np.ndarray):
  """Yields ``(key, example)`` of one recording (nothing, logged, if it is unusable)."""
  try:
    signal = _read(item, num_parcels, config)
  except RecordingError as e:
    logging.warning("Skipping recording %s", e)
    return
  starts = (range(0, signal.shape[0] - config.window + 1, config.stride) if config.stride
            else [0])
  for start in starts:
    part = signal[start:start + config.window] if config.stride else signal
    yield f"{item.path}:{start}", {
        "signal": part, "coordinates": coords, "subject": item.subject, "site": item.site,
        "path": item.path, "phenotypes": item.phenotypes,
        "tr": np.float32(config.target_tr or item.tr), "start": np.int32(start)}


def _check_parcel_count(items: list[_Item], config: BrainLMConfig, source: str) -> None:
  """Raises a one-line ValueError (the count found, the count expected, the option to pass) when
  every readable recording of `items` has one parcel count that `config` does not expect."""
  if not config.num_parcels:
    return
  counts = set()
  for item in items:
    try:
      counts.add(readers.load_signal(item.path, max_dead=sys.maxsize).shape[1])
    except RecordingError:
      continue
  if len(counts) != 1 or config.num_parcels in counts:
    return
  (found,) = counts
  spec = json.dumps({"name": source_config_name(source), "num_parcels": found})
  raise ValueError(f"every recording of {source} has {found} parcels, but the builder config "
                   f"{config.name!r} expects num_parcels={config.num_parcels}: pass "
                   f"--builder-config '{spec}' (tfds build: --config), or leave "
                   "--builder-config out to take the parcel count from the data")


def _fit_scaler(items: list[_Item], config: BrainLMConfig,
                source: str) -> tuple[dict, int, list[dict]]:
  """RobustScaler state over (at most scaler_max_subjects) training subjects (of SOURCE),
  parcel count."""

  subjects = sorted({i.subject for i in items},
                    key=lambda s: hashlib.sha256(f"{config.seed}:{s}".encode()).hexdigest())
  chosen = set(subjects[:config.scaler_max_subjects])
  signals, skipped = [], []
  for item in items:
    if item.subject in chosen:
      try:
        signals.append(Recording(path=item.path, subject=item.subject,
                                            signal=_read(item, config.num_parcels, config)))
      except RecordingError as e:
        skipped.append({"path": item.path, "reason": str(e)})
  if not signals:
    _check_parcel_count(items, config, source)
    raise ValueError(f"no usable training recording ({len(skipped)} skipped: "
                     f"{[s['reason'] for s in skipped][:3]})")
  counts = np.bincount([s.num_parcels for s in signals])
  num_parcels = config.num_parcels or int(np.argmax(counts))
  signals = [s for s in signals if s.num_parcels == num_parcels]
  scaler = RobustScaler().fit(signals, center_recordings=config.center_recordings,
                                             scale_recordings=config.scale_recordings)
  return scaler.to_dict(), num_parcels, skipped


class Builder(tfds.core.GeneratorBasedBuilder):
  """Parcellated fMRI recordings split by subject; robust-scaling stats in the metadata."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Whole recordings or windows; subject splits; RobustScaler stats."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass --manual_dir=SOURCE: a folder of parcellated recordings (e.g. the OUT of "
      "`brainlm-prepare parcellate`, or .mat/.npy/.csv files), optionally with participants.tsv.")
  BUILDER_CONFIGS = [
      BrainLMConfig(name="a424", atlas="A424", num_parcels=424, window=200,
                    description="A424 parcels, whole recordings (>= 200 timepoints)."),
      BrainLMConfig(name="a424_w200_s100", atlas="A424", num_parcels=424, window=200, stride=100,
                    description="A424 parcels, windows of 200 timepoints every 100."),
      BrainLMConfig(name="hcp_aal94", atlas="AAL2 (94 regions)", num_parcels=94, window=200,
                    tr=0.72, description="The bundled HCP REST1 .mat files: 94 regions, TR 0.72."),
  ]

  def __init__(self, *, file_format=None, **kwargs):
    # ArrayRecord by default (random access: `as_data_source`); --file_format=tfrecord also works.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    parcels = self.builder_config.num_parcels or None
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            # num_parcels=0 (the data's count): two unknown dimensions, stored as raw bytes
            "signal": tfds.features.Tensor(shape=(None, parcels), dtype=np.float32,
                                           encoding="none" if parcels else "bytes"),
            "coordinates": tfds.features.Tensor(shape=(None, 3), dtype=np.float32),
            "subject": tfds.features.Text(),
            "site": tfds.features.Text(),
            "path": tfds.features.Text(),
            "phenotypes": tfds.features.Text(),
            "tr": tfds.features.Scalar(dtype=np.float32),
            "start": tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=None,
        metadata=tfds.core.MetadataDict(),
        homepage="https://github.com/vandijklab/BrainLM",
    )

  def _generate_splits(self, dl_manager, download_config):
    self._beam = (download_config.beam_runner is not None
                  or download_config.beam_options is not None)
    return super()._generate_splits(dl_manager, download_config)

  def _split_generators(self, dl_manager):
    config = self.builder_config
    source = os.fspath(dl_manager.manual_dir)
    if not os.path.isdir(source):
      raise FileNotFoundError(f"{source}: --manual_dir (the recordings folder) not found")
    coords_path = config.coords or os.path.join(source, COORDINATES)
    coords = (readers.load_coordinates(coords_path) if os.path.isfile(coords_path)
              else np.zeros((0, 3), np.float32))
    pheno_path = config.phenotypes or os.path.join(source, PARTICIPANTS)
    phenotypes = (phenotypes_lib.read_rows(pheno_path, config.subject_column) if os.path.isfile(pheno_path)
                  else {})
    cohort = None
    if not phenotypes and not os.path.isfile(os.path.join(source, MANIFEST)):
      cohort = cohort_lib.detect(
          source, datasets.resolve_paths(source, readers.SUPPORTED_EXTENSIONS))
    items = _list_items(source, config, phenotypes, cohort)
    for line in cohort.describe([i.path for i in items]) if cohort else ():
      logging.info("brainlm_fmri: cohort %s: %s", source, line)
    if not items:
      raise FileNotFoundError(f"{source}: no recordings")
    splits = _split(items, config)
    scaler, num_parcels, skipped = _fit_scaler(splits["train"], config, source)
    if len(coords) and len(coords) != num_parcels:
      raise ValueError(f"{coords_path}: {len(coords)} coordinate rows for {num_parcels} parcels")
    columns = sorted({k for row in phenotypes.values() for k in row} if not cohort else
                     {k for i in items for k in json.loads(i.phenotypes)})
    pheno_path = cohort.phenotypes if cohort else (pheno_path if phenotypes else None)
    self.info.metadata.update({
        "scaler": scaler, "num_parcels": num_parcels,
        "coordinates": coords.tolist() if len(coords) else None,
        "coordinates_file": coords_path if len(coords) else None,
        "phenotype_columns": columns, "phenotypes_file": pheno_path,
        "tr_table": cohort.tr_table if cohort else None,
        "subjects": {k: sorted({i.subject for i in v}) for k, v in splits.items()},
        "source": os.path.abspath(source), "scaler_skipped": skipped,
        "window": config.window, "stride": config.stride,
    })
    logging.info("brainlm_fmri: %s", {k: f"{len(v)} recordings / "
                                      f"{len({i.subject for i in v})} subjects"
                                      for k, v in splits.items()})
    return {name: self._generate_examples(part, num_parcels, coords)
            for name, part in splits.items() if part}

  def _generate_examples(self, items, num_parcels, coords):
    config = self.builder_config
    if getattr(self, "_beam", False):
      import apache_beam as beam  # pylint: disable=import-outside-toplevel
      return (beam.Create(items)
              | beam.FlatMap(_examples, config=config, num_parcels=num_parcels, coords=coords))
    return (ex for item in items for ex in _examples(item, config, num_parcels, coords))


def source_config_name(source: str) -> str:
  """A valid TFDS config name from the SOURCE folder's name: ``../abide_cc200/`` ->
  ``abide_cc200`` (lower case, runs of other characters -> ``_``, starting with a letter)."""
  name = os.path.basename(os.path.abspath(os.fspath(source))).lower()
  name = re.sub(r"[^a-z0-9]+", "_", name).strip("_")
  return name if name[:1].isalpha() else f"data_{name}".rstrip("_")


def build_config(spec: str | None, *, source: str = "", **overrides) -> BrainLMConfig:
  """A built-in config's name, or a JSON object of `BrainLMConfig` fields; `overrides` (those
  not None) replace fields. A variant of a built-in config gets a name of its own
  (``hcp_aal94_<hash of the changed fields>``): TFDS refuses a custom config named like a
  built-in one. Without a `spec`: a config named after the `source` folder
  (`source_config_name`) that takes the parcel count from the data and every recording.

  Raises:
    ValueError: unknown name, bad JSON or unknown field.
  """
  if spec is None:
    config = BrainLMConfig(name=source_config_name(source),
                           description="Parcel count from the data, every recording.")
  elif spec.lstrip().startswith("{"):
    try:
      config = BrainLMConfig(**json.loads(spec))
    except (json.JSONDecodeError, TypeError) as e:
      raise ValueError(f"--config {spec!r}: {e}") from e
  else:
    known = {c.name: c for c in Builder.BUILDER_CONFIGS}
    if spec not in known:
      raise ValueError(f"--config {spec!r}: unknown config (known: {', '.join(known)}, or JSON)")
    config = known[spec]
  overrides = {k: v for k, v in overrides.items() if v is not None}
  if overrides:
    config = dataclasses.replace(config, **overrides)
  builtin = {c.name: c for c in Builder.BUILDER_CONFIGS}.get(config.name)
  if builtin is not None and builtin != config:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(BrainLMConfig)
              if getattr(config, f.name) != getattr(builtin, f.name)}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    config = dataclasses.replace(config, name=f"{config.name}_{digest[:8]}")
    logging.info("Builder config %s (%s with %s)", config.name, builtin.name, fields)
  return config
