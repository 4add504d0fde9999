"""`brainlm-probe`: linear probes of a pretrained encoder vs random-init and FC baselines.

  brainlm-probe --checkpoint runs/tiny --target subject-id --out runs/tiny/probe_subject_id
  brainlm-probe --checkpoint runs/tiny/checkpoints/1500 --target age --out out/ \
      --phenotypes participants.tsv --subject-column participant_id [--task regression]

Writes OUT/probe.json, OUT/probe.md and OUT/probe.png, and prints the table. --data defaults to
the pretraining run's data.path (stored in the checkpoint).
"""

from absl import app
from absl import flags
from absl import logging

from brainlm_jax.cli import common

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Pretraining WORKDIR (latest checkpoint) or WORKDIR/checkpoints/STEP.")
_TARGET = flags.DEFINE_string(
    "target", None, "subject-id | site | a column of --phenotypes.")
_OUT = flags.DEFINE_string("out", None, "Output directory for probe.json / .md / .png.")
_DATA = flags.DEFINE_string(
    "data", None, "Recordings (dir, glob or file); default: the checkpoint's data.path.")
_PHENOTYPES = flags.DEFINE_string("phenotypes", None, "CSV/TSV with one row per subject.")
_SUBJECT_COLUMN = flags.DEFINE_string("subject-column", "participant_id",
                                      "Subject id column of --phenotypes.")
_TASK = flags.DEFINE_enum("task", "auto", ["auto", "regression", "classification"],
                          "auto: classification for non-numeric or <= 10 distinct integers.")
_FOLDS = flags.DEFINE_integer("folds", 5, "Outer cross-validation folds (split by subject).")
_BATCH_SIZE = flags.DEFINE_integer("batch-size", 32, "Windows per encoder call.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the folds and of the random-init encoder.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_FISHER_Z = flags.DEFINE_bool("fisher-z", True, "Fisher z-transform the FC features.")
for _name in ("subject-column", "batch-size", "fisher-z"):
  flags.DEFINE_alias(_name.replace("-", "_"), _name)
flags.mark_flags_as_required(["checkpoint", "target", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  common.setup_runtime()
  from brainlm_jax import probe  # pylint: disable=import-outside-toplevel
  results = probe.probe_checkpoint(
      _CHECKPOINT.value, target=_TARGET.value, out_dir=_OUT.value, data=_DATA.value,
      phenotypes=_PHENOTYPES.value, subject_column=_SUBJECT_COLUMN.value, task=_TASK.value,
      folds=_FOLDS.value, batch_size=_BATCH_SIZE.value, seed=_SEED.value, step=_STEP.value,
      fisher_z=_FISHER_Z.value)
  print(f"\n{results['target']} ({results['task']}): {results['n_subjects']} subjects, "
        f"{results['scheme']}\n")
  print(probe.format_table(results))
  logging.info("Wrote %s", ", ".join(results["report"].values()))


def run():
  common.run_entrypoint(main, "brainlm-probe", (
      _CHECKPOINT, _TARGET, _OUT, _DATA, _PHENOTYPES, _SUBJECT_COLUMN, _TASK, _FOLDS, _BATCH_SIZE,
      _SEED, _STEP, _FISHER_Z))


if __name__ == "__main__":
  run()
