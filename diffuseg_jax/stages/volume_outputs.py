"""Test-set predictions as NIfTI files on each test image's ORIGINAL voxel grid, for medical volumes.

  <workdir>/predictions/<strategy>/<case name>.nii.gz

Each case's 2D slice predictions (model resolution) are put back with `volumes.reassemble` (undo the
resize, restack the slices, undo the canonical reorientation), so the file has the original image's shape
and is written with its original affine: it overlays the image in any viewer and can be scored by other
tools. Labels are the dataset's RAW values (e.g. MSCMRseg 500/600/200, MM-WHS 500/.../850) where the loader
recorded them (`VolumeInfo.extra['label_values']`), class indices otherwise. Slices a loader dropped
(`data.empty_slices='drop'`) come back as background. 2D data (natural images, retina) gets no files here.
"""

from __future__ import annotations

import os

import numpy as np

from diffuseg_jax.data import nifti, volumes
from diffuseg_jax.data.types import Split


def has_volumes(ctx) -> bool:
  """Predictions are written back only for physical (mm) volumes with known slice positions."""
  test = ctx.data.test
  return ctx.data.spacing_unit == 'mm' and bool(test.volumes) and test.slice_index is not None


def predictions_dir(ctx, strategy: str) -> str:
  return ctx.path('predictions', strategy)


def to_raw_values(pred: np.ndarray, label_values) -> np.ndarray:
  """Class indices -> the dataset's raw label values (`label_values[k]` for class k); unchanged if None."""
  if label_values is None:
    return pred
  return np.asarray(label_values, np.int64)[pred]


def _label_dtype(values: np.ndarray) -> np.dtype:
  lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
  if lo >= 0 and hi <= 255:
    return np.dtype(np.uint8)
  return np.dtype(np.int16) if -32768 <= lo and hi <= 32767 else np.dtype(np.int32)


def case_volumes(test: Split, pred: np.ndarray):
  """Yields (VolumeInfo, label array on the original grid, raw values) per test case.

  pred: int [N, H, W] class indices for the N test slices, in `test` order.
  """
  pred = np.asarray(pred)
  if pred.shape != test.images.shape[:3]:
    raise ValueError(f'predictions {pred.shape} do not match the test slices {test.images.shape[:3]}')
  for case_id in sorted(test.volumes):
    rows = test.case_ids == case_id
    info = test.volumes[case_id]
    grid = volumes.reassemble(pred[rows].astype(np.int32), test.slice_index[rows], info)
    yield info, to_raw_values(grid, info.extra.get('label_values'))


def write_predictions(ctx, strategy: str, pred: np.ndarray) -> list[str]:
  """Writes one strategy's test predictions (int [N, H, W] class indices) -> the files written.

  Nothing for 2D data (`has_volumes` False) or on processes other than 0. Each file is written atomically
  (`nifti.write_nifti`), so a killed run never leaves a half-written prediction.
  """
  if not ctx.is_main_process or not has_volumes(ctx):
    return []
  out_dir = predictions_dir(ctx, strategy)
  written = []
  for info, labels in case_volumes(ctx.data.test, pred):
    path = os.path.join(out_dir, f'{info.name}.nii.gz')
    nifti.write_nifti(path, labels, info.affine, dtype=_label_dtype(labels))
    written.append(path)
  return written
