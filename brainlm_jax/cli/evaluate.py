"""`brainlm-evaluate`: masked reconstruction / forecasting on held-out subjects vs baselines.

  brainlm-evaluate --checkpoint runs/tiny --out runs/tiny/eval_parcel
  brainlm-evaluate --checkpoint runs/tiny --out runs/tiny/eval_forecast --mode forecast \
      --forecast-patches 2
  brainlm-evaluate --checkpoint runs/tiny/checkpoints/1000 --data /data/other_cohort --out out/

Writes OUT/evaluate.json, OUT/evaluate.md, OUT/traces.png, OUT/parcel_r2.png (+ a glass-brain
map with coordinates, horizon.png for forecasting) and prints the table. --split auto: the
checkpoint's validation subjects of its data.path, or every recording of --data. Masking
defaults to the checkpoint's (mode, ratio, forecast patches).
"""

from absl import flags

from brainlm_jax.cli import common

_F = common.define_flags(
    __name__, "checkpoint", "out", "data", "split", "subject-pattern", "mask-ratio", "seed",
    "batch-size", "step",
    help_text={"out": "Output directory for evaluate.json / .md / *.png.",
               "seed": "Seed of the masks (window i's mask: seed, i)."})
_MODE = flags.DEFINE_enum("mode", None, ["parcel", "uniform", "forecast"],
                          "Masking mode (default: the checkpoint's).")
_FORECAST_PATCHES = flags.DEFINE_integer(
    "forecast-patches", None, "Masked last patches in forecast mode (default: the checkpoint's).")
_AR_ORDER = flags.DEFINE_integer("ar-order", 5, "Order (timepoints) of the AR forecast baseline.")
common.underscore_aliases(__name__, "forecast-patches", "ar-order",
                          required=("checkpoint", "out"))


def main(argv):
  common.start(argv)
  from brainlm_jax.transfer.evaluate import Evaluate  # pylint: disable=import-outside-toplevel
  job = Evaluate(mode=_MODE.value, ratio=_F["mask-ratio"].value,
                 forecast_patches=_FORECAST_PATCHES.value, seed=_F["seed"].value,
                 batch_size=_F["batch-size"].value, ar_order=_AR_ORDER.value,
                 data=_F["data"].value, split=_F["split"].value,
                 subject_pattern=_F["subject-pattern"].value)
  common.run_evaluator(job, _F["checkpoint"].value, _F["step"].value, _F["out"].value)


def run():
  common.run_entrypoint(main, "brainlm-evaluate", [*_F.values(), _MODE, _FORECAST_PATCHES,
                                                   _AR_ORDER])


if __name__ == "__main__":
  run()
