"""`brainlm-probe`: linear probes of a pretrained encoder vs random-init and FC baselines.

  brainlm-probe --checkpoint runs/tiny --target subject-id --out runs/tiny/probe_subject_id
  brainlm-probe --checkpoint runs/tiny/checkpoints/1500 --target age --out out/ \
      --phenotypes participants.tsv --subject-column participant_id [--task regression]
  brainlm-probe --checkpoint runs/abide --data ../shared/data/abide_cc200 --target DX_GROUP \
      --cv site --out runs/abide/probe_dx     # a cohort folder: labels, sites, TRs beside it

Writes OUT/probe.json, OUT/probe.md and OUT/probe.png, and prints the table. --data defaults to
the pretraining run's data.path (stored in the checkpoint); --split auto means all of it.
"""

from absl import flags

from brainlm_jax.cli import common

_F = common.define_flags(__name__, "checkpoint", "out", "data", "split", "phenotypes",
                         "subject-column", "batch-size", "seed", "step", batch_size=32,
                         help_text={"out": "Output directory for probe.json / .md / .png.",
                                    "seed": "Seed of the folds and of the random-init encoder."})
_TARGET = flags.DEFINE_string("target", None, "subject-id | site | a column of --phenotypes.")
_TASK = flags.DEFINE_enum("task", "auto", ["auto", "regression", "classification"],
                          "auto: classification for non-numeric or <= 10 distinct integers.")
_FOLDS = flags.DEFINE_integer("folds", 5, "Outer cross-validation folds (split by subject).")
_CV = flags.DEFINE_enum("cv", "subject", ["subject", "site", "kfold"],
                        "subject: folds split by subject; site: leave one site out; kfold: "
                        "--folds folds stratified by label and site, grouped by subject. site "
                        "and kfold add the cohort baselines (tangent FC, site only, model+FC).")
_FISHER_Z = flags.DEFINE_bool("fisher-z", True, "Fisher z-transform the FC features.")
common.underscore_aliases(__name__, "fisher-z",
                          required=("checkpoint", "target", "out"))


def main(argv):
  common.start(argv)
  from brainlm_jax.transfer.probe import Probe  # pylint: disable=import-outside-toplevel
  job = Probe(_TARGET.value, phenotypes=_F["phenotypes"].value,
              subject_column=_F["subject-column"].value, task=_TASK.value, folds=_FOLDS.value,
              batch_size=_F["batch-size"].value, seed=_F["seed"].value,
              fisher_z=_FISHER_Z.value, cv=_CV.value, data=_F["data"].value,
              split=_F["split"].value)
  common.run_evaluator(job, _F["checkpoint"].value, _F["step"].value, _F["out"].value)


def run():
  common.run_entrypoint(main, "brainlm-probe", [_F["checkpoint"], _TARGET, _F["out"], *_F.values(),
                                                _TASK, _FOLDS, _CV, _FISHER_Z])


if __name__ == "__main__":
  run()
