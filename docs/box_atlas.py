"""A toy label atlas on a scan's own grid: cubes of SIZE^3 voxels, labelled 1, 2, ...

  python docs/box_atlas.py --scan ../shared/data/nitime_sample/fmri1.nii.gz --size 3 \
      --out runs/tutorial/box_atlas.nii.gz

For the tutorial only (docs/tutorial.md): the bundled nitime scans are a 10x10x18 partial-brain
patch, not in MNI space, so a real atlas (A424) does not overlap them. Boxes at the grid's edge
are smaller when SIZE does not divide the grid.
"""

import os

from absl import app
from absl import flags
import nibabel as nib
import numpy as np

_SCAN = flags.DEFINE_string("scan", None, "NIfTI whose grid (first 3 axes, affine) to use.")
_SIZE = flags.DEFINE_integer("size", 3, "Box edge in voxels.")
_OUT = flags.DEFINE_string("out", None, "Output label volume (.nii.gz).")
flags.mark_flags_as_required(["scan", "out"])


def box_labels(shape: tuple[int, int, int], size: int) -> np.ndarray:
  """int32 [X, Y, Z] labels 1..n: voxel (i, j, k) is in box (i // size, j // size, k // size)."""
  if size < 1:
    raise ValueError(f"--size must be >= 1, got {size}")
  grid = np.meshgrid(*[np.arange(n) // size for n in shape], indexing="ij")
  counts = [-(-n // size) for n in shape]  # boxes per axis (ceil)
  return (1 + np.ravel_multi_index(grid, counts)).astype(np.int32)


def main(argv):
  del argv
  scan = nib.load(_SCAN.value)
  labels = box_labels(scan.shape[:3], _SIZE.value)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  nib.save(nib.Nifti1Image(labels, scan.affine), _OUT.value)
  print(f"{_OUT.value}: {labels.max()} boxes of <= {_SIZE.value}^3 voxels on the "
        f"{'x'.join(map(str, labels.shape))} grid of {_SCAN.value}")


if __name__ == "__main__":
  app.run(main)
