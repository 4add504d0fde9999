"""`brainlm-pretrain`: masked-autoencoder pretraining (resumes from --workdir).

  brainlm-pretrain --config configs/pretrain.py:tiny --workdir runs/tiny [--config.train.num_steps=200]
  brainlm-pretrain --config configs/pretrain.py:tiny --workdir gs://BUCKET/runs/tiny

--workdir is a local directory or a Cloud Storage bucket path (gs://BUCKET/PATH, as MaxText and
big_vision take it; no FUSE mount): checkpoints (Orbax), metrics.jsonl, TensorBoard events,
config.json, data_report.json, normalization.json and the evaluators' reports are written there
through etils.epath / tf.io.gfile, with the machine's Google Cloud credentials, and a job
restarted with the same --workdir resumes from the bucket. The data (--config.data.path) is
read from a local path.

Evaluators listed in the config's `evals` section (e.g. a leave-site-out probe) run on the
current params every `every` steps, writing WORKDIR/evals/NAME/step_N/ and logging their scores.
"""

from absl import flags
from absl import logging
from ml_collections import config_flags

from brainlm_jax.cli import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/pretrain.py:PRESET",
                                          lock_config=True)
_F = common.define_flags(__name__, "workdir")  # local or gs://BUCKET/PATH (its help says so)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  common.start(argv)
  # pylint: disable=import-outside-toplevel
  from brainlm_jax.training import pretrain
  from brainlm_jax.transfer import evaluators
  config, workdir = _CONFIG.value, _F["workdir"].value
  hooks = evaluators.pretraining_hooks(config.get("evals") or {}, workdir)
  last = pretrain.train_and_evaluate(config, workdir, hooks=hooks)
  logging.info("Done. Last metrics: %s", last)


def run():
  common.run_entrypoint(main, "brainlm-pretrain", [_CONFIG, _F["workdir"]])


if __name__ == "__main__":
  run()
