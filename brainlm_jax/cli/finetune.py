"""`brainlm-finetune`: fine-tune a pretrained encoder on a task (resumes from --workdir).

  brainlm-finetune --config configs/finetune.py:tiny --checkpoint runs/tiny \
      --workdir runs/tiny/ft_subject_id [--config.task.target=forecast]
"""

from absl import flags
from absl import logging
from ml_collections import config_flags

from brainlm_jax.cli import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/finetune.py:PRESET",
                                          lock_config=True)
_F = common.define_flags(__name__, "checkpoint", "workdir", "subject-pattern")
flags.mark_flags_as_required(["config", "checkpoint", "workdir"])


def main(argv):
  common.start(argv)
  from brainlm_jax.transfer import finetune  # pylint: disable=import-outside-toplevel
  results = finetune.finetune(_CONFIG.value, _F["checkpoint"].value, _F["workdir"].value,
                              subject_pattern=_F["subject-pattern"].value)
  if not results.get("finished"):
    logging.warning("Stopped at step %d; run the same command to resume", results["steps"])
    return
  print(f"\n{results['target']} ({results['task']}): {results['scheme']}\n")
  print(finetune.format_table(results))
  logging.info("Wrote %s", ", ".join(results["report"].values()))


def run():
  common.run_entrypoint(main, "brainlm-finetune", [_CONFIG, *_F.values()])


if __name__ == "__main__":
  run()
