"""`brainlm-finetune`: fine-tune a pretrained encoder on a task (resumes from --workdir).

  brainlm-finetune --config configs/finetune.py:tiny --checkpoint runs/tiny \
      --workdir runs/tiny/ft_subject_id [--config.task.target=forecast]
  brainlm-finetune --config configs/finetune.py:abide --cv site \
      --checkpoint runs/abide_s0,runs/abide_s1,runs/abide_s2 --workdir runs/abide_ft_dx \
      --config.task.target=DX_GROUP --config.task.strategies=linear,full,lp-ft
"""

from absl import flags
from absl import logging
from ml_collections import config_flags

from brainlm_jax.cli import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/finetune.py:PRESET",
                                          lock_config=True)
_F = common.define_flags(
    __name__, "checkpoint", "workdir", "subject-pattern",
    help_text={"checkpoint": "Pretraining WORKDIR (its latest checkpoint) or "
               "WORKDIR/checkpoints/STEP; with --cv site|kfold several, comma-separated, runs of "
               "one network (e.g. pretraining seeds), each fine-tuned on the same folds."})
_CV = flags.DEFINE_enum(
    "cv", None, ["holdout", "site", "kfold"],
    "Sets config.data.cv. holdout: one held-out subject fold (or subject-id / forecast); site: "
    "leave one site (or one of data.site_folds groups of sites) out of a cohort folder; kfold: "
    "data.folds folds stratified by label and site, grouped by subject. site and kfold hold "
    "validation sites out of every training fold for early stopping and choices, and compare "
    "task.strategies against random inits, fc, tangent and site (transfer/finetune_cv.py).")
flags.mark_flags_as_required(["config", "checkpoint", "workdir"])


def main(argv):
  common.start(argv)
  # pylint: disable=import-outside-toplevel
  from brainlm_jax.transfer import finetune
  from brainlm_jax.transfer import finetune_cv
  config = _CONFIG.value
  if _CV.value:
    config.data.cv = _CV.value
  checkpoints = [c for c in _F["checkpoint"].value.split(",") if c]
  if config.data.cv in ("site", "kfold"):
    results = finetune_cv.finetune_cv(config, checkpoints, _F["workdir"].value,
                                      subject_pattern=_F["subject-pattern"].value)
    if not results.get("finished"):
      logging.warning("Stopped; run the same command to resume")
      return
    print("\n" + finetune_cv.format_report(results))
    logging.info("Wrote %s", ", ".join(results["report"].values()))
    return
  if len(checkpoints) > 1:
    raise ValueError("several --checkpoint runs are compared under --cv site|kfold; "
                     "--cv holdout fine-tunes one")
  results = finetune.finetune(config, checkpoints[0], _F["workdir"].value,
                              subject_pattern=_F["subject-pattern"].value)
  if not results.get("finished"):
    logging.warning("Stopped at step %d; run the same command to resume", results["steps"])
    return
  print(f"\n{results['target']} ({results['task']}): {results['scheme']}\n")
  print(finetune.format_table(results))
  logging.info("Wrote %s", ", ".join(results["report"].values()))


def run():
  common.run_entrypoint(main, "brainlm-finetune", [_CONFIG, _CV, *_F.values()])


if __name__ == "__main__":
  run()
