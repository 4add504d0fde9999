"""`brainlm-pretrain`: masked-autoencoder pretraining (resumes from --workdir).

  brainlm-pretrain --config configs/pretrain.py:tiny --workdir runs/tiny [--config.train.num_steps=200]
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from brainlm_jax.cli import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/pretrain.py:PRESET",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, logs).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  common.setup_runtime()
  from brainlm_jax import train  # pylint: disable=import-outside-toplevel
  last = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info("Done. Last metrics: %s", last)


def run():
  import sys  # pylint: disable=import-outside-toplevel
  common.check_config_overrides(sys.argv)
  app.run(common.main_with_clear_errors(main, "brainlm-pretrain"))


if __name__ == "__main__":
  run()
