"""`brainlm-evaluate`: masked reconstruction / forecasting on held-out subjects vs baselines.

  brainlm-evaluate --checkpoint runs/tiny --out runs/tiny/eval_parcel
  brainlm-evaluate --checkpoint runs/tiny --out runs/tiny/eval_forecast --mode forecast \
      --forecast-patches 2
  brainlm-evaluate --checkpoint runs/tiny/checkpoints/1000 --data /data/other_cohort --out out/

Writes OUT/evaluate.json, OUT/evaluate.md, OUT/traces.png, OUT/parcel_r2.png (+ a glass-brain
map with coordinates, horizon.png for forecasting) and prints the table. Without --data the
checkpoint's validation subjects of its data.path are evaluated; with --data, all recordings.
Masking defaults to the checkpoint's (mode, ratio, forecast patches).
"""

from absl import app
from absl import flags
from absl import logging

from brainlm_jax.cli import common

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Pretraining WORKDIR (latest checkpoint) or WORKDIR/checkpoints/STEP.")
_OUT = flags.DEFINE_string("out", None, "Output directory for evaluate.json / .md / *.png.")
_DATA = flags.DEFINE_string(
    "data", None, "Recordings (dir, glob or file); default: the checkpoint's data.path.")
_SPLIT = flags.DEFINE_enum(
    "split", None, ["validation", "all"],
    "Which recordings: the checkpoint's validation subjects (default without --data) or all "
    "(default with --data).")
_MODE = flags.DEFINE_enum("mode", None, ["parcel", "uniform", "forecast"],
                          "Masking mode (default: the checkpoint's).")
_MASK_RATIO = flags.DEFINE_float("mask-ratio", None,
                                 "Mask ratio for parcel/uniform (default: the checkpoint's).")
_FORECAST_PATCHES = flags.DEFINE_integer(
    "forecast-patches", None, "Masked last patches in forecast mode (default: the checkpoint's).")
_AR_ORDER = flags.DEFINE_integer("ar-order", 5, "Order (timepoints) of the AR forecast baseline.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the masks (window i's mask: seed, i).")
_BATCH_SIZE = flags.DEFINE_integer("batch-size", 16, "Windows per model call.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
for _name in ("mask-ratio", "forecast-patches", "ar-order", "batch-size"):
  flags.DEFINE_alias(_name.replace("-", "_"), _name)
flags.mark_flags_as_required(["checkpoint", "out"])
_FLAGS = (_CHECKPOINT, _OUT, _DATA, _SPLIT, _MODE, _MASK_RATIO, _FORECAST_PATCHES, _AR_ORDER,
          _SEED, _BATCH_SIZE, _STEP)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  common.setup_runtime()
  from brainlm_jax import evaluate  # pylint: disable=import-outside-toplevel
  results = evaluate.evaluate_checkpoint(
      _CHECKPOINT.value, out_dir=_OUT.value, data=_DATA.value, split=_SPLIT.value,
      mode=_MODE.value, ratio=_MASK_RATIO.value, forecast_patches=_FORECAST_PATCHES.value,
      seed=_SEED.value, batch_size=_BATCH_SIZE.value, ar_order=_AR_ORDER.value,
      step=_STEP.value)
  mk = results["masking"]
  print(f"\n{mk['mode']} masking (ratio {mk['ratio']:g}, forecast patches "
        f"{mk['forecast_patches']}): {results['n_windows']} windows of "
        f"{results['n_recordings']} recordings ({results['split']}), "
        f"{results['n_masked_tokens']} masked tokens\n")
  print(evaluate.format_table(results))
  logging.info("Wrote %s", ", ".join(results["report"].values()))


def run():
  common.run_entrypoint(main, "brainlm-evaluate", _FLAGS)


if __name__ == "__main__":
  run()
