"""`brainlm-visualize`: figures of a pretrained checkpoint (PNGs + TensorBoard images).

  brainlm-visualize --checkpoint runs/tiny --out runs/tiny/viz
  brainlm-visualize --checkpoint runs/a424/checkpoints/2000 --data /data/a424 --out viz/ \
      --parcels 0,17,PCC --network-labels a424_yeo7.tsv \
      --phenotypes participants.tsv --subject-column participant_id --color-by age

Writes OUT/traces.png (true vs reconstructed), r2_map.png and cls_attention_map.png (glass-brain
markers at the parcel coordinates; a per-parcel bar plot without coordinates),
cls_attention_networks.png (with --network-labels), embeddings_pca.png, training_curves.png
(from the run's metrics.jsonl), OUT/visualize.json / .md and OUT/tensorboard. --split auto: the
run's validation subjects of its data.path, or every recording of --data.
"""

from absl import flags

from brainlm_jax.cli import common

_F = common.define_flags(
    __name__, "checkpoint", "out", "data", "split", "phenotypes", "subject-column",
    "subject-pattern", "mask-ratio", "seed", "step", "batch-size",
    help_text={"out": "Output directory for the PNGs, visualize.json and tensorboard/.",
               "seed": "Seed of the masks (window i's mask: seed, i) and the PCA."})
_PARCELS = flags.DEFINE_string(
    "parcels", None, "Comma list of parcel indices (0-based) or names (from --network-labels) to "
    "trace; default: the best, median and worst reconstructed parcels.")
_NETWORK_LABELS = flags.DEFINE_string(
    "network-labels", None, "CSV/TSV with one `parcel network` row per parcel (e.g. Yeo-7).")
_COLOR_BY = flags.DEFINE_string("color-by", None, "Column of --phenotypes colouring the PCA "
                                "(default: colour by subject).")
_COORDS = flags.DEFINE_string(
    "coords", None, "`label x y z` (MNI mm) per parcel, overriding the checkpoint's coordinates.")
_MAX_WINDOWS = flags.DEFINE_integer("max-windows", 0, "Reconstruct at most this many windows "
                                    "(0: all).")
_TR = flags.DEFINE_float("tr", None, "Repetition time in seconds (trace x-axis in seconds).")
common.underscore_aliases(__name__, "network-labels", "color-by",
                          "max-windows",
                          required=("checkpoint", "out"))


def main(argv):
  common.start(argv)
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")  # nilearn draws through pyplot; never open a window
  from brainlm_jax.transfer.visualize import Visualize  # pylint: disable=import-outside-toplevel
  job = Visualize(parcels=_PARCELS.value, network_labels=_NETWORK_LABELS.value,
                  phenotypes=_F["phenotypes"].value, subject_column=_F["subject-column"].value,
                  color_by=_COLOR_BY.value, coords=_COORDS.value,
                  mask_ratio=_F["mask-ratio"].value, seed=_F["seed"].value,
                  batch_size=_F["batch-size"].value, max_windows=_MAX_WINDOWS.value,
                  tr=_TR.value, data=_F["data"].value, split=_F["split"].value,
                  subject_pattern=_F["subject-pattern"].value)
  common.run_evaluator(job, _F["checkpoint"].value, _F["step"].value, _F["out"].value)


def run():
  common.run_entrypoint(main, "brainlm-visualize", [
      *_F.values(), _PARCELS, _NETWORK_LABELS, _COLOR_BY, _COORDS, _MAX_WINDOWS, _TR])


if __name__ == "__main__":
  run()
