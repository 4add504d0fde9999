"""`brainlm-visualize`: figures of a pretrained checkpoint (PNGs + TensorBoard images).

  brainlm-visualize --checkpoint runs/tiny --out runs/tiny/viz
  brainlm-visualize --checkpoint runs/a424/checkpoints/2000 --data /data/a424 --out viz/ \
      --parcels 0,17,PCC --network-labels a424_yeo7.tsv \
      --phenotypes participants.tsv --subject-column participant_id --color-by age

Writes OUT/traces.png (true vs reconstructed), r2_map.png and cls_attention_map.png (glass-brain
markers at the parcel coordinates; a per-parcel bar plot without coordinates),
cls_attention_networks.png (with --network-labels), embeddings_pca.png, training_curves.png
(from the run's metrics.jsonl), OUT/visualize.json and OUT/tensorboard. --data defaults to the
run's data.path, restricted to its validation subjects (see --split).
"""

from absl import app
from absl import flags
from absl import logging

from brainlm_jax.cli import common

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Pretraining WORKDIR (latest checkpoint) or WORKDIR/checkpoints/STEP.")
_OUT = flags.DEFINE_string("out", None, "Output directory for the PNGs, visualize.json and "
                           "tensorboard/.")
_DATA = flags.DEFINE_string(
    "data", None, "Recordings (dir, glob or file); default: the checkpoint's data.path.")
_SPLIT = flags.DEFINE_enum(
    "split", "auto", ["auto", "validation", "train", "all"],
    "Which subjects of the data to use: auto = the run's validation subjects when --data is not "
    "given, else all.")
_PARCELS = flags.DEFINE_string(
    "parcels", None, "Comma list of parcel indices (0-based) or names (from --network-labels) to "
    "trace; default: the best, median and worst reconstructed parcels.")
_NETWORK_LABELS = flags.DEFINE_string(
    "network-labels", None, "CSV/TSV with one `parcel network` row per parcel (e.g. Yeo-7).")
_PHENOTYPES = flags.DEFINE_string("phenotypes", None, "CSV/TSV with one row per subject.")
_SUBJECT_COLUMN = flags.DEFINE_string("subject-column", "participant_id",
                                      "Subject id column of --phenotypes.")
_COLOR_BY = flags.DEFINE_string("color-by", None, "Column of --phenotypes colouring the PCA "
                                "(default: colour by subject).")
_COORDS = flags.DEFINE_string(
    "coords", None, "`label x y z` (MNI mm) per parcel, overriding the checkpoint's coordinates.")
_MASK_RATIO = flags.DEFINE_float("mask-ratio", None, "Mask ratio of the reconstructions "
                                 "(default: the run's masking.ratio).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the masks (and the PCA).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BATCH_SIZE = flags.DEFINE_integer("batch-size", 16, "Windows per model call.")
_MAX_WINDOWS = flags.DEFINE_integer("max-windows", 0, "Reconstruct at most this many windows "
                                    "(0: all).")
_TR = flags.DEFINE_float("tr", None, "Repetition time in seconds (trace x-axis in seconds).")
_FLAGS = (_CHECKPOINT, _OUT, _DATA, _SPLIT, _PARCELS, _NETWORK_LABELS, _PHENOTYPES,
          _SUBJECT_COLUMN, _COLOR_BY, _COORDS, _MASK_RATIO, _SEED, _STEP, _BATCH_SIZE,
          _MAX_WINDOWS, _TR)
for _name in ("network-labels", "subject-column", "color-by", "mask-ratio", "batch-size",
              "max-windows"):
  flags.DEFINE_alias(_name.replace("-", "_"), _name)
flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  common.setup_runtime()
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")  # nilearn draws through pyplot; never open a window
  from brainlm_jax import visualize  # pylint: disable=import-outside-toplevel
  s = visualize.visualize_checkpoint(
      _CHECKPOINT.value, _OUT.value, data=_DATA.value, parcels=_PARCELS.value,
      network_labels=_NETWORK_LABELS.value, phenotypes=_PHENOTYPES.value,
      subject_column=_SUBJECT_COLUMN.value, color_by=_COLOR_BY.value, coords=_COORDS.value,
      mask_ratio=_MASK_RATIO.value, seed=_SEED.value, step=_STEP.value, split=_SPLIT.value,
      batch_size=_BATCH_SIZE.value, max_windows=_MAX_WINDOWS.value, tr=_TR.value)
  print(f"\n{s['checkpoint']['path']} (step {s['checkpoint']['step']}): {s['n_windows']} windows "
        f"of {len(s['subjects'])} subjects, mask ratio {s['mask_ratio']}")
  print(f"  masked reconstruction: pooled R² {s['pooled_r2']:.3f}, MSE {s['pooled_mse']:.3f}")
  r2 = sorted(s["parcels"], key=lambda p: p["r2"])
  print(f"  per-parcel R²: worst {r2[0]['name']} {r2[0]['r2']:.3f}, best {r2[-1]['name']} "
        f"{r2[-1]['r2']:.3f}")
  print(f"  most CLS-attended parcels: {', '.join(s['top_attention'])}")
  print(f"  traced parcels: {', '.join(s['traced'])}")
  for name, path in s["png"].items():
    print(f"  {name:24s} {path}")
  print(f"  tensorboard images       {s['tensorboard']}")
  logging.info("Done.")


def run():
  common.run_entrypoint(main, "brainlm-visualize", _FLAGS)


if __name__ == "__main__":
  run()
