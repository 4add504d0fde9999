"""`brainlm-prepare`: NIfTI scans -> parcel time series -> the `brainlm_fmri` TFDS dataset.

  brainlm-prepare parcellate --inputs 'bids/derivatives/*/func/*_bold.nii.gz' \
      --atlas A424+2mm.nii.gz --coords A424_Coordinates.dat --out parcels/ [--detrend] \
      [--high-pass=0.01 --low-pass=0.1] [--confounds=trans_x,trans_y,csf] [--workers=N]
  brainlm-prepare build --source parcels/ --out tfds/ [--builder-config a424] [--beam]

parcellate exit status: 0 every scan converted (or already done), 3 some scan skipped (listed on
stderr and in OUT/manifest.jsonl), 1 nothing could run (bad atlas, no input).
"""

from absl import app
from absl import flags

from brainlm_jax.cli import common

SKIPPED_EXIT = 3

_INPUTS = flags.DEFINE_multi_string("inputs", None, "parcellate: scans (dir, glob or file).")
_ATLAS = flags.DEFINE_string("atlas", None, "parcellate: integer label atlas (NIfTI).")
_COORDS = flags.DEFINE_string("coords", None, "Parcel coordinates (`label x y z` rows).")
_OUT = flags.DEFINE_string("out", None, "Output folder: parcellate's .npy + manifest.jsonl; "
                           "build's TFDS data_dir.")
_WINDOW = flags.DEFINE_integer(
    "window", 0, "parcellate: skip scans with fewer timepoints than this (default 0: keep every "
    "scan; the training window is chosen at training time, configs: data.window).")
_MAX_DEAD = flags.DEFINE_float(
    "max-dead-fraction", None, "Constant (zero-variance) parcels are kept, marked missing "
    "downstream, up to this share of the parcels (default 0.1); scans/recordings with more are "
    "skipped.")
_WORKERS = flags.DEFINE_integer("workers", None, "parcellate: processes (default: all cores).")
_CHUNK = flags.DEFINE_integer("chunk-volumes", 16, "parcellate: volumes read at a time.")
_DETREND = flags.DEFINE_bool("detrend", False, "parcellate: remove linear trends.")
_STANDARDIZE = flags.DEFINE_enum("standardize", None, ["zscore_sample", "psc"],
                                 "parcellate: standardize each parcel's signal.")
_LOW_PASS = flags.DEFINE_float("low-pass", None, "parcellate: low-pass cutoff (Hz).")
_HIGH_PASS = flags.DEFINE_float("high-pass", None, "parcellate: high-pass cutoff (Hz).")
_CONFOUNDS = flags.DEFINE_list("confounds", [], "parcellate: columns of the fMRIPrep "
                               "*_desc-confounds_timeseries.tsv beside each scan to regress out.")
_TR = flags.DEFINE_float("tr", None, "Repetition time (s) overriding the scans' headers.")
_TARGET_TR = flags.DEFINE_float(
    "target-tr", None, "Resample every series to this repetition time (s) so that scans of "
    "different TRs share one time axis (parcellate: after cleaning; build: sets the config's "
    "target_tr). Needs each scan's TR (header, manifest or --tr).")
_SOURCE = flags.DEFINE_string("source", None, "build: folder of parcellated recordings.")
_BUILDER_CONFIG = flags.DEFINE_string(
    "builder-config", None, "build: TFDS builder config name (a424, hcp_aal94, ...), or a JSON "
    "object of BrainLMConfig fields, e.g. '{\"name\": \"x\", \"num_parcels\": 94}'; default: a "
    "config named after --source that takes the parcel count from the data.")
_PHENOTYPES = flags.DEFINE_string("phenotypes", None, "build: participants.tsv-style table.")
_BEAM = flags.DEFINE_bool("beam", False, "build: generate with Apache Beam (DirectRunner unless "
                          "--beam_options names another runner).")
_BEAM_OPTIONS = flags.DEFINE_list("beam-options", [], "build: Beam pipeline options, e.g. "
                                  "runner=DirectRunner,direct_num_workers=2.")
_FILE_FORMAT = flags.DEFINE_enum("file-format", "array_record", ["array_record", "tfrecord"],
                                 "build: file format.")
common.underscore_aliases(__name__, "chunk-volumes", "max-dead-fraction", "low-pass", "high-pass", "target-tr",
                          "builder-config", "beam-options", "file-format")
flags.DEFINE_alias("data-dir", "out")  # TFDS's name for build's output folder
flags.DEFINE_alias("data_dir", "out")


def _parcellate() -> int:
  for flag in (_INPUTS, _ATLAS, _OUT):
    if not flag.value:
      raise app.UsageError(f"parcellate needs --{flag.name}")
  from data_pipelines import parcellate  # pylint: disable=import-outside-toplevel
  clean = parcellate.CleanOptions(
      detrend=_DETREND.value, standardize=_STANDARDIZE.value or False, low_pass=_LOW_PASS.value,
      high_pass=_HIGH_PASS.value, confounds=tuple(_CONFOUNDS.value), tr=_TR.value,
      target_tr=_TARGET_TR.value)
  records = parcellate.parcellate(
      _INPUTS.value, _ATLAS.value, _OUT.value, coords=_COORDS.value, clean=clean,
      min_timepoints=max(1, _WINDOW.value), workers=_WORKERS.value, chunk_volumes=_CHUNK.value,
      max_dead_fraction=parcellate.MAX_DEAD_FRACTION if _MAX_DEAD.value is None
      else _MAX_DEAD.value)
  skipped = [r for r in records if r["status"] != "ok"]  # (each logged on stderr as it happened)
  print(f"{parcellate.summarize(records)}; manifest: {_OUT.value}/{parcellate.MANIFEST}")
  return SKIPPED_EXIT if skipped else 0


def _build() -> int:
  for flag in (_SOURCE, _OUT):
    if not flag.value:
      raise app.UsageError(f"build needs --{flag.name}")
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from data_pipelines.brainlm_fmri import Builder, build_config  # pylint: disable=import-outside-toplevel
  config = build_config(_BUILDER_CONFIG.value, source=_SOURCE.value, coords=_COORDS.value,
                        phenotypes=_PHENOTYPES.value, tr=_TR.value, target_tr=_TARGET_TR.value,
                        max_dead_fraction=_MAX_DEAD.value)
  if _BUILDER_CONFIG.value is None:
    print(f"builder config {config.name}: named after --source, parcel count from the data "
          "(--builder-config names another)")
  download = {"manual_dir": _SOURCE.value}
  if _BEAM.value or _BEAM_OPTIONS.value:
    import apache_beam as beam  # pylint: disable=import-outside-toplevel
    options = [f"--{o}" for o in _BEAM_OPTIONS.value] or ["--runner=DirectRunner"]
    download["beam_options"] = beam.options.pipeline_options.PipelineOptions(flags=options)
  builder = Builder(config=config, data_dir=_OUT.value, file_format=_FILE_FORMAT.value)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(**download))
  meta = builder.info.metadata
  for split, info in builder.info.splits.items():
    subjects = meta["subjects"][split]
    print(f"{split}: {info.num_examples} examples, {len(subjects)} subjects "
          f"({', '.join(subjects[:3])}{', ...' if len(subjects) > 3 else ''})")
  print(f"{meta['num_parcels']} parcels; scaler over {len(meta['subjects']['train'])} training "
        f"subjects; written to {builder.data_dir}")
  return 0


def main(argv):
  if len(argv) != 2 or argv[1] not in ("parcellate", "build"):
    raise app.UsageError("usage: brainlm-prepare {parcellate|build} --FLAGS (see --help)")
  if argv[1] == "build":
    common.setup_runtime()  # TensorFlow (TFDS) off the accelerators, quiet library logs.
    return _build()
  return _parcellate()


def run():
  common.run_entrypoint(main, "brainlm-prepare", (
      _INPUTS, _ATLAS, _COORDS, _OUT, _WINDOW, _MAX_DEAD, _WORKERS, _CHUNK, _DETREND, _STANDARDIZE, _LOW_PASS,
      _HIGH_PASS, _CONFOUNDS, _TR, _TARGET_TR, _SOURCE, _BUILDER_CONFIG, _PHENOTYPES, _BEAM, _BEAM_OPTIONS,
      _FILE_FORMAT))


if __name__ == "__main__":
  run()
