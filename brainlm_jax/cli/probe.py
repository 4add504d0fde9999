"""`brainlm-probe`: linear probes of a pretrained encoder vs random-init and FC baselines.

  brainlm-probe --checkpoint runs/tiny --target subject-id --out runs/tiny/probe_subject_id
  brainlm-probe --checkpoint runs/tiny/checkpoints/1500 --target age --out out/ \
      --phenotypes participants.tsv --subject-column participant_id [--task regression]
  brainlm-probe --checkpoint runs/abide --data ../shared/data/abide_cc200 --target DX_GROUP \
      --cv site --out runs/abide/probe_dx     # a cohort folder: labels, sites, TRs beside it
  brainlm-probe --checkpoint runs/hcp_s0,runs/hcp_s1,runs/hcp_s2 --target subject-id \
      --data ../shared/data/hcp100_dk68 --cv session --out runs/hcp/probe_days  # across days

Writes OUT/probe.json, OUT/probe.md and OUT/probe.png, and prints the table. --data defaults to
the pretraining run's data.path (stored in the checkpoint); --split auto means all of it.
"""

from absl import flags

from brainlm_jax.cli import common

_F = common.define_flags(__name__, "checkpoint", "out", "data", "split", "phenotypes",
                         "subject-column", "subject-pattern", "batch-size", "seed", "step",
                         batch_size=32,
                         help_text={"out": "Output directory for probe.json / .md / .png.",
                                    "checkpoint": "Pretraining WORKDIR (its latest checkpoint) or "
                                    "WORKDIR/checkpoints/STEP; several, comma-separated, for "
                                    "runs of one network (e.g. pretraining seeds): their rows "
                                    "sit beside the first's (`@2`, `@3`, ...), on the same "
                                    "folds, with paired tests over all of them.",
                                    "seed": "Seed of the folds and of the random-init encoder."})
_TARGET = flags.DEFINE_string("target", None, "subject-id | site | a column of --phenotypes.")
_TASK = flags.DEFINE_enum("task", "auto", ["auto", "regression", "classification"],
                          "auto: classification for non-numeric or <= 10 distinct integers.")
_FOLDS = flags.DEFINE_integer("folds", 5, "Outer cross-validation folds (split by subject).")
_CV = flags.DEFINE_enum("cv", "subject", ["subject", "site", "kfold", "session"],
                        "subject: folds split by subject (subject-id: halves of each "
                        "recording); site: leave one site out; kfold: --folds folds stratified "
                        "by label and site, grouped by subject (site and kfold add the cohort "
                        "baselines: tangent FC, site only, model+FC); session: subject-id "
                        "across sessions (a window of one session's scan against every "
                        "subject's scans of the other; sessions from --session-column).")
_SESSION_COLUMN = flags.DEFINE_string(
    "session-column", "session", "--cv session: the column of the cohort table beside the "
    "recordings that names each scan's session (e.g. the day).")
_READINGS = flags.DEFINE_list(
    "readings", None, "What to read of every encoder (pretrained and random-init): of cls, "
    "mean, patches-fc, tokens-fc, tokens-pca, masked-cls, masked-mean, masked-tokens-fc, "
    "masked-tokens-pca, parcels, layers (transfer/features.py; docs/probing.md). Default: "
    "cls,mean,patches-fc,tokens-fc,masked-mean for --cv subject; cls,mean,patches-fc,tokens-fc,"
    "tokens-pca,masked-cls,masked-mean,masked-tokens-fc otherwise.")
_RANDOM_SEEDS = flags.DEFINE_integer(
    "random-seeds", 3, "Random-init encoders read beside the pretrained one: seeds --seed, "
    "--seed + 1, ... (the inits pretraining runs of those seeds start from).")
_MASK_DRAWS = flags.DEFINE_integer(
    "mask-draws", 2, "Masks per window of the masked-* readings (the run's masking).")
_FISHER_Z = flags.DEFINE_bool("fisher-z", True, "Fisher z-transform the FC features.")
common.underscore_aliases(__name__, "fisher-z", "session-column", "random-seeds", "mask-draws",
                          required=("checkpoint", "target", "out"))


def main(argv):
  common.start(argv)
  from brainlm_jax.transfer.probe import Probe  # pylint: disable=import-outside-toplevel
  first, *others = [c for c in _F["checkpoint"].value.split(",") if c]
  job = Probe(_TARGET.value, phenotypes=_F["phenotypes"].value,
              subject_column=_F["subject-column"].value, task=_TASK.value, folds=_FOLDS.value,
              batch_size=_F["batch-size"].value, seed=_F["seed"].value,
              fisher_z=_FISHER_Z.value, cv=_CV.value, session_column=_SESSION_COLUMN.value,
              readings=_READINGS.value, random_seeds=_RANDOM_SEEDS.value,
              mask_draws=_MASK_DRAWS.value, others=others, data=_F["data"].value,
              split=_F["split"].value, subject_pattern=_F["subject-pattern"].value)
  common.run_evaluator(job, first, _F["step"].value, _F["out"].value)


def run():
  common.run_entrypoint(main, "brainlm-probe", [_F["checkpoint"], _TARGET, _F["out"], *_F.values(),
                                                _TASK, _FOLDS, _CV, _SESSION_COLUMN, _READINGS,
                                                _RANDOM_SEEDS, _MASK_DRAWS, _FISHER_Z])


if __name__ == "__main__":
  run()
