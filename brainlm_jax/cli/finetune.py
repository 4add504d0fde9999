"""`brainlm-finetune`: fine-tune a pretrained encoder on a task (resumes from --workdir).

  brainlm-finetune --config configs/finetune.py:tiny --checkpoint runs/tiny \
      --workdir runs/tiny/ft_subject_id [--config.task.target=forecast]
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from brainlm_jax.cli import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/finetune.py:PRESET",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Pretraining WORKDIR (its latest step) or WORKDIR/checkpoints/STEP.")
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Fine-tuning run directory (checkpoints, metrics, report).")
flags.mark_flags_as_required(["config", "checkpoint", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  common.setup_runtime()
  from brainlm_jax import finetune  # pylint: disable=import-outside-toplevel
  results = finetune.finetune(_CONFIG.value, _CHECKPOINT.value, _WORKDIR.value)
  if not results.get("finished"):
    logging.warning("Stopped at step %d; run the same command to resume", results["steps"])
    return
  print(f"\n{results['target']} ({results['task']}): {results['scheme']}\n")
  print(finetune.format_table(results))
  logging.info("Wrote %s", ", ".join(results["report"].values()))


def run():
  import sys  # pylint: disable=import-outside-toplevel
  common.check_config_overrides(sys.argv)
  app.run(common.main_with_clear_errors(main, "brainlm-finetune"))


if __name__ == "__main__":
  run()
