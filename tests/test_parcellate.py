"""Parcellation (data_pipelines/parcellate.py, `brainlm-prepare parcellate`) vs nilearn."""

import gzip
import json
import os
import subprocess
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest

from data_pipelines import parcellate as P
from tests.conftest import REPO, SHARED_DATA

NITIME = SHARED_DATA / "nitime_sample" / "fmri1.nii.gz"
A424_DIR = SHARED_DATA / "atlases" / "A424"


def need(path):
  if not path.exists():
    pytest.skip(f"real data not found at {path}")
  return str(path)


def masker(labels, **kwargs):
  from nilearn.maskers import NiftiLabelsMasker  # pylint: disable=import-outside-toplevel
  return NiftiLabelsMasker(labels, **kwargs)


def block_labels(shape, affine, path, block=(4, 4, 6)):
  """A label volume of boxes on a grid: labels 1..n."""
  idx = [np.arange(s) // b for s, b in zip(shape, block)]
  i, j, k = np.meshgrid(*idx, indexing="ij")
  n = [int(x.max()) + 1 for x in idx]
  labels = (i * n[1] * n[2] + j * n[2] + k + 1).astype(np.int16)
  nib.save(nib.Nifti1Image(labels, affine), path)
  return path


def test_nitime_matches_nilearn(tmp_path):
  scan = need(NITIME)
  img = nib.load(scan)
  atlas_path = block_labels(img.shape[:3], img.affine, str(tmp_path / "labels.nii.gz"))
  atlas = P.load_atlas(atlas_path)
  ours, tr = P.parcel_signals(scan, atlas, chunk_volumes=7)  # Chunks not dividing 40.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ref = masker(atlas_path).fit_transform(scan)
  assert ours.shape == ref.shape == (40, 27) and ours.dtype == np.float32
  assert tr == pytest.approx(1.35)
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-3)  # Values ~ 700 (int16 BOLD).

  clean = dict(detrend=True, high_pass=0.01, low_pass=0.2, standardize="zscore_sample")
  ours = P.parcel_signals(scan, atlas, clean=P.CleanOptions(**clean))[0]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ref = masker(atlas_path, t_r=1.35, **clean).fit_transform(scan)
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  assert np.allclose(ours.std(0, ddof=1), 1, atol=1e-4)  # Really standardised.

  # An atlas on a coarser grid (2x voxels) is resampled to the scan's grid (nearest).
  coarse = img.affine.copy()
  coarse[:3, :3] *= 2
  coarse_path = block_labels((5, 5, 9), coarse, str(tmp_path / "coarse.nii.gz"), (2, 2, 3))
  ours = P.parcel_signals(scan, P.load_atlas(coarse_path))[0]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ref = masker(coarse_path).fit_transform(scan)
  assert ours.shape == ref.shape == (40, 27)
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-3)


def test_target_tr_resamples_real_scan(tmp_path):
  """--target-tr: the real nitime scan (TR 1.35 s, 40 volumes) on a 0.9 s time axis, the same as
  resampling its parcel signals; too short after resampling or an unknown TR is a clear skip."""
  from brainlm_jax.data import readers  # pylint: disable=import-outside-toplevel
  scan = need(NITIME)
  img = nib.load(scan)
  atlas = P.load_atlas(block_labels(img.shape[:3], img.affine, str(tmp_path / "labels.nii.gz")))
  plain, _ = P.parcel_signals(scan, atlas)
  ours, tr = P.parcel_signals(scan, atlas, clean=P.CleanOptions(target_tr=0.9))
  assert tr == 0.9 and ours.shape == (60, 27)
  np.testing.assert_allclose(ours, readers.resample_tr(plain, 1.35, 0.9), rtol=1e-6)
  with pytest.raises(readers.RecordingError, match="= 60 timepoints at TR 0.9 s, shorter"):
    P.parcel_signals(scan, atlas, clean=P.CleanOptions(target_tr=0.9), min_timepoints=61)
  P.parcel_signals(scan, atlas, clean=P.CleanOptions(target_tr=0.9), min_timepoints=60)


def test_mni_scan_with_a424_matches_nilearn(tmp_path):
  atlas_file = need(A424_DIR / "A424+4mm.nii.gz")
  atlas = P.load_atlas(atlas_file, need(A424_DIR / "A424_Coordinates.dat"))
  assert len(atlas.labels) == 424 and atlas.coords.shape == (424, 3)
  np.testing.assert_array_equal(atlas.coords[0], [14, -78, 4])  # Label 1's row.
  rng = np.random.default_rng(0)
  data = (1000 + 10 * rng.standard_normal(atlas.img.shape + (5,))).astype(np.float32)
  scan = str(tmp_path / "sub-01_task-rest_space-MNI152NLin6Asym_bold.nii.gz")
  img = nib.Nifti1Image(data, atlas.img.affine)
  img.header.set_xyzt_units("mm", "msec")
  img.header["pixdim"][4] = 800.0  # TR in ms -> 0.8 s.
  nib.save(img, scan)
  ours, tr = P.parcel_signals(scan, atlas)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ref = masker(atlas_file).fit_transform(scan)
  assert ours.shape == ref.shape == (5, 424) and tr == pytest.approx(0.8)
  np.testing.assert_allclose(ours, ref, rtol=1e-6)

  # A424.nii.gz lacks label 120: its coordinate row is dropped, columns follow the atlas.
  partial = P.load_atlas(need(A424_DIR / "A424.nii.gz"), str(A424_DIR / "A424_Coordinates.dat"))
  assert len(partial.labels) == 423 and 120 not in partial.labels
  np.testing.assert_array_equal(partial.coords[119], atlas.coords[120])


# ------------------------------------------------------------------------------- bad input

GRID = (6, 6, 4)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])


def scan_file(path, volumes=30, seed=0, data=None, affine=AFFINE):
  if data is None:
    data = 100 + np.random.default_rng(seed).standard_normal(GRID + (volumes,)).astype(np.float32)
  img = nib.Nifti1Image(data, affine)
  img.header["pixdim"][4] = 2.0
  os.makedirs(os.path.dirname(path), exist_ok=True)
  nib.save(img, str(path))
  return str(path)


def bad_inputs(d):
  """A folder with 2 good scans (two runs of sub-01) and one of each kind of bad scan."""
  scan_file(d / "sub-01" / "sub-01_run-1_bold.nii.gz", seed=1)
  scan_file(d / "sub-01" / "sub-01_run-2_bold.nii.gz", seed=2)
  full = gzip.compress(open(scan_file(d / "tmp.nii", seed=3), "rb").read())
  os.remove(d / "tmp.nii")
  (d / "sub-02_bold.nii.gz").write_bytes(full[:len(full) // 2])  # Truncated.
  nib.save(nib.Nifti1Image(np.ones(GRID, np.float32), AFFINE), str(d / "sub-03_bold.nii.gz"))
  nan = 100 + np.random.default_rng(4).standard_normal(GRID + (30,)).astype(np.float32)
  nan[2, 3, 1, 17] = np.nan
  scan_file(d / "sub-04_bold.nii.gz", data=nan)
  far = AFFINE.copy()
  far[:3, 3] = 500.0
  scan_file(d / "sub-05_bold.nii.gz", affine=far)  # Outside the atlas' field of view.
  flat = 100 + np.random.default_rng(6).standard_normal(GRID + (30,)).astype(np.float32)
  flat[:3, :3, :2] = 0.0  # Parcel 1 (a 3x3x2 box) is constant.
  scan_file(d / "sub-06_bold.nii.gz", data=flat)
  scan_file(d / "sub-07_bold.nii.gz", volumes=10)  # Shorter than the window (20).
  scan_file(d / "zz_copy" / "sub-01" / "sub-01_run-1_bold.nii.gz", seed=1)  # Same subject + name.
  return block_labels(GRID, AFFINE, str(d.parent / "atlas.nii.gz"), (3, 3, 2))


EXPECTED = {
    "sub-02_bold.nii.gz": r"truncated",
    "sub-03_bold.nii.gz": r"3-D image \(6, 6, 4\): expected a 4-D BOLD series",
    "sub-04_bold.nii.gz": r"NaN/inf voxel values inside parcels .*voxel \(2, 3, 1\), volume 17",
    "sub-05_bold.nii.gz": r"cannot be mapped onto this scan: .*(does not contain any|no parcel)",
    "sub-06_bold.nii.gz": (r"1 of 8 parcel\(s\) constant over time \(zero variance; more than "
                           r"max_dead_fraction=0.1\): labels \[1\]"),
    "sub-07_bold.nii.gz": r"10 volumes, shorter than one window \(20 timepoints\)",
    "zz_copy/sub-01/sub-01_run-1_bold.nii.gz": r"same subject \(sub-01\) and scan name as",
}


def test_bad_inputs_skipped_and_resumable(tmp_path):
  import re  # pylint: disable=import-outside-toplevel
  data = tmp_path / "bids"
  data.mkdir()
  atlas = bad_inputs(data)
  out = str(tmp_path / "out")
  records = P.parcellate(str(data), atlas, out, min_timepoints=20, workers=2, chunk_volumes=8)
  by_name = {os.path.relpath(r["path"], data): r for r in records}
  assert len(records) == 9
  for name in ("sub-01/sub-01_run-1_bold.nii.gz", "sub-01/sub-01_run-2_bold.nii.gz"):
    r = by_name[name]
    assert r["status"] == "ok" and r["shape"] == [30, 8] and r["subject"] == "sub-01"
    assert r["tr"] == pytest.approx(2.0)
    np.testing.assert_allclose(np.load(os.path.join(out, r["output"])),
                               P.parcel_signals(r["path"], P.load_atlas(atlas))[0])
  for name, reason in EXPECTED.items():
    r = by_name[name]
    assert r["status"] == "skipped" and re.search(reason, r["reason"]), (name, r["reason"])
  lines = [json.loads(l) for l in open(os.path.join(out, P.MANIFEST))]
  assert sorted(l["path"] for l in lines) == sorted(r["path"] for r in records)
  assert sorted(f for f in os.listdir(out) if f.endswith(".npy")) == [
      "sub-01_run-1_bold.npy", "sub-01_run-2_bold.npy"]

  again = P.parcellate(str(data), atlas, out, min_timepoints=20, workers=1)
  assert [r["status"] for r in again] == [r["status"] for r in records]
  assert sum(bool(r.get("resumed")) for r in again) == 2

  # Up to max_dead_fraction constant parcels are kept (constant, listed by label), not skipped.
  kept = P.parcellate(str(data / "sub-06_bold.nii.gz"), atlas, str(tmp_path / "kept"),
                      max_dead_fraction=0.2, workers=1)
  assert kept[0]["status"] == "ok" and kept[0]["dead_parcels"] == [1]
  signal = np.load(os.path.join(tmp_path / "kept", kept[0]["output"]))
  assert np.ptp(signal[:, 0]) == 0 and np.ptp(signal[:, 1:], axis=0).min() > 0


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "brainlm_jax.cli.prepare", *args], env=env,
                        capture_output=True, text=True, cwd=REPO, timeout=300)


def test_cli_exit_status_and_clear_lines(tmp_path):
  data = tmp_path / "bids"
  data.mkdir()
  atlas = bad_inputs(data)
  proc = _cli("parcellate", f"--inputs={data}", f"--atlas={atlas}", f"--out={tmp_path / 'o'}",
              "--window=20", "--workers=2")
  assert proc.returncode == 3, proc.stderr[-2000:]
  assert "9 scan(s): 2 converted, 0 already done, 7 skipped" in proc.stdout
  for name in EXPECTED:
    assert any(name in l and "skipped" in l for l in proc.stderr.splitlines()), name
  empty = tmp_path / "empty"
  empty.mkdir()
  proc = _cli("parcellate", f"--inputs={empty}", f"--atlas={atlas}", f"--out={tmp_path / 'e'}")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f"brainlm-prepare: error: {empty}: no .nii/.nii.gz files found (searched recursively)")
