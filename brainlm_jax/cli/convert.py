"""`brainlm-convert`: BrainLM's released Hugging Face weights -> a brainlm_jax checkpoint.

  brainlm-convert --hf-dir brainlm/old_13M --out runs/brainlm_13m \
      --coords ../shared/data/atlases/A424/A424_Coordinates.dat
  brainlm-convert --hf-dir brainlm/vitmae_111M --out runs/brainlm_111m --coords A424.dat \
      [--scaler-data DIR] [--num-parcels 424 --window 200 --value-scale 5.6430855]

Reads config.json and model.safetensors | pytorch_model.bin; writes OUT/checkpoints/0/{state,
meta} (what brainlm-probe --checkpoint OUT reads) and OUT/convert_report.json; prints every HF
tensor the network does not use. See docs/convert.md for each family's input preparation.
"""

from absl import flags

from brainlm_jax.cli import common

_HF_DIR = flags.DEFINE_string("hf-dir", None, "Hugging Face model directory (config.json + "
                              "model.safetensors or pytorch_model.bin).")
_OUT = flags.DEFINE_string("out", None, "Output workdir (checkpoints/0 and convert_report.json).")
_COORDS = flags.DEFINE_string("coords", None, "Parcel coordinates (`label x y z` rows, the "
                              "model's parcel order), e.g. A424_Coordinates.dat.")
_SCALER_DATA = flags.DEFINE_string(
    "scaler-data", None, "Recordings to fit the per-parcel robust scaling on (median/IQR, no "
    "per-recording centring, as BrainLM); default: identity (inputs already scaled). Also "
    "stored as the checkpoint's data.path (brainlm-probe's default --data).")
_NUM_PARCELS = flags.DEFINE_integer("num-parcels", None, "vit_mae only: parcels (default 424).")
_WINDOW = flags.DEFINE_integer("window", None, "vit_mae only: timepoints per window (default 200).")
_VALUE_SCALE = flags.DEFINE_float("value-scale", None,
                                  "vit_mae only: signal divisor (default 5.6430855).")
common.underscore_aliases(__name__, "hf-dir", "scaler-data", "num-parcels",
                          "value-scale",
                          required=("hf-dir", "out", "coords"))


def main(argv):
  common.start(argv)
  # pylint: disable=import-outside-toplevel
  from brainlm_jax.data.readers import load_coordinates
  from brainlm_jax.tools import convert
  coords = load_coordinates(_COORDS.value)
  overrides = {"num_parcels": _NUM_PARCELS.value, "window": _WINDOW.value,
               "value_scale": _VALUE_SCALE.value}
  report = convert.convert(_HF_DIR.value, _OUT.value, coords=coords, coords_path=_COORDS.value,
                           scaler_data=_SCALER_DATA.value,
                           vitmae_overrides=overrides)
  print(f"{report['model_type']} -> variant {report['variant']}: {report['num_mapped']} params "
        f"({report['num_params']:,} values) from {report['num_hf_tensors']} HF tensors in "
        f"{', '.join(report['weights'])}; token grid {report['token_grid']}")
  for key in report["zero_filled"]:
    print(f"  zero-filled (qkv_bias=false): {key}")
  for key, why in report["unused"].items():
    print(f"  unused: {key} ({why})")
  print(f"Wrote {report['checkpoint']} and {_OUT.value}/convert_report.json")


def run():
  common.run_entrypoint(main, "brainlm-convert", (_HF_DIR, _OUT, _COORDS, _SCALER_DATA, _NUM_PARCELS,
                                                  _WINDOW, _VALUE_SCALE))


if __name__ == "__main__":
  run()
