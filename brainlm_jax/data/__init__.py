"""Recordings in, batches out.

  readers.py         one recording file (formats, orientation, validation), coordinates, TR resampling
  datasets.py        discovery, subject ids, short-window filter, TFDS detection, splits
  run_data.py        what a pretraining run reads: its splits, scaler and coordinates (prepare_data)
  scaling.py         RobustScaler (NumPy; no TensorFlow)
  windows.py         deterministic evaluation windows (NumPy)
  input_pipeline.py  random training windows and masks (tf.data)
  tfds_source.py     a prepared `brainlm_fmri` TFDS dataset read back as recordings

Only input_pipeline.py and tfds_source.py import TensorFlow (lazily where possible).
"""
