"""Parcellation throughput: `data_pipelines.parcellate` vs nilearn's NiftiLabelsMasker, one run.

Writes `--scans` synthetic MNI-space 4-D scans (91x109x91 x `--volumes` float32, .nii.gz; signal
inside the A424 atlas, zeros outside, like a masked BOLD series) into a temp dir, then times on the
same files: ours with all usable cores, ours with 1 worker, and `NiftiLabelsMasker(A424)
.fit_transform` scan by scan; then the real nitime scans (10x10x18x40) with a box parcellation of
their grid. Prints scans/s and ratios, and checks the outputs agree.

  python benchmarks/parcellate.py                    # 4 scans x 200 volumes (~3 GB temp files)
  python benchmarks/parcellate.py --scans 2 --volumes 100
"""

import argparse
import os
import sys
import tempfile
import time
import warnings

import nibabel as nib
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data_pipelines import parcellate as P  # pylint: disable=wrong-import-position

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                    "data")


def _synthetic(directory: str, atlas: P.Atlas, n: int, volumes: int) -> list[str]:
  mask = np.asarray(atlas.img.dataobj) > 0
  paths = []
  for i in range(n):
    rng = np.random.default_rng(i)
    data = np.zeros(mask.shape + (volumes,), np.float32)
    data[mask] = 1000 + 20 * rng.standard_normal((int(mask.sum()), volumes), np.float32)
    path = os.path.join(directory, f"sub-{i:02d}_task-rest_space-MNI152_bold.nii.gz")
    img = nib.Nifti1Image(data, atlas.img.affine)
    img.header["pixdim"][4] = 0.8
    nib.save(img, path)
    paths.append(path)
  return paths


def _nilearn(paths, atlas_path):
  from nilearn.maskers import NiftiLabelsMasker  # pylint: disable=import-outside-toplevel
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return [NiftiLabelsMasker(atlas_path).fit_transform(p) for p in paths]


def _time(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def _compare(name, paths, atlas_path, out_dir, workers):
  ours_all, _ = _time(lambda: P.parcellate(paths, atlas_path, out_dir + "_all", workers=workers))
  ours_one, _ = _time(lambda: P.parcellate(paths, atlas_path, out_dir + "_one", workers=1))
  ref_t, ref = _time(lambda: _nilearn(paths, atlas_path))
  ours = [np.load(os.path.join(out_dir + "_all", P.output_name(p))) for p in paths]
  err = max(float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12)) for a, b in zip(ours, ref))
  n = len(paths)
  print(f"\n{name}: {n} scans, relative max |ours - nilearn| = {err:.1e}")
  print(f"  {'':28s} {'seconds':>8s} {'scans/s':>8s} {'vs nilearn':>10s}")
  for label, t in ((f"ours ({workers} workers)", ours_all), ("ours (1 worker)", ours_one),
                   ("NiftiLabelsMasker", ref_t)):
    print(f"  {label:28s} {t:8.2f} {n / t:8.3f} {ref_t / t:9.2f}x")
  return ref_t / ours_all


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--scans", type=int, default=4)
  parser.add_argument("--volumes", type=int, default=200)
  parser.add_argument("--workers", type=int, default=P.default_workers())
  parser.add_argument("--atlas", default=os.path.join(DATA, "atlases", "A424", "A424+2mm.nii.gz"))
  args = parser.parse_args()
  atlas = P.load_atlas(args.atlas)
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    paths = _synthetic(tmp, atlas, args.scans, args.volumes)
    size = sum(os.path.getsize(p) for p in paths) / 2**20
    print(f"wrote {args.scans} scans {atlas.img.shape} x {args.volumes} float32 ({size:.0f} MiB "
          f"gzipped) in {time.perf_counter() - start:.0f}s; {args.workers} usable cores")
    ratio = _compare("synthetic MNI scans, A424", paths, args.atlas, os.path.join(tmp, "out"),
                     args.workers)
    for p in paths:
      os.remove(p)
    nitime = [os.path.join(DATA, "nitime_sample", f"fmri{i}.nii.gz") for i in (1, 2)]
    if all(os.path.isfile(p) for p in nitime):
      img = nib.load(nitime[0])
      i, j, k = np.meshgrid(*(np.arange(s) // b for s, b in zip(img.shape[:3], (4, 4, 6))),
                            indexing="ij")
      boxes = os.path.join(tmp, "boxes.nii.gz")
      nib.save(nib.Nifti1Image((i * 9 + j * 3 + k + 1).astype(np.int16), img.affine), boxes)
      _compare("real nitime scans (10x10x18x40), 27 boxes", nitime, boxes,
               os.path.join(tmp, "nitime"), args.workers)
  print(f"\nsynthetic MNI ratio (ours, all workers / NiftiLabelsMasker): {ratio:.2f}x "
        f"(goal >= 3x: {'met' if ratio >= 3 else 'NOT met'})")


if __name__ == "__main__":
  main()
