"""Writing synthetic image/label pairs as NIfTI, exporting them as an nnU-Net v2 raw dataset, and writing test
predictions back onto the original volumes.

A synthetic folder has the same shape as one split of the folder dataset (`data/folder.py`):
`<out_dir>/images/<name>.nii.gz` (float32 intensities in [0, 1]) and `<out_dir>/labels/<name>.nii.gz`
(class indices 0..K-1), so it can be reused directly as the source of another run. A 2D slice is stored as
a [H, W, 1] volume (a C-channel slice as [H, W, 1, C]) whose affine carries the pixel spacing (mm) of the
slice along (H, W); the third axis has a nominal 1 mm.

nnU-Net v2 layout (`export_nnunet`):
  Dataset{ID:03d}_{name}/imagesTr/{case}_{channel:04d}.nii.gz   one file per channel
  Dataset{ID:03d}_{name}/labelsTr/{case}.nii.gz
  Dataset{ID:03d}_{name}/dataset.json   channel_names, labels {name: index} (background 0), numTraining,
                                        file_ending ".nii.gz"

Predictions on the original grid (`write_volume_predictions`): `<out_dir>/<case name>.nii.gz` per test
volume. Each case's 2D slice predictions (model resolution) are put back with `volumes.reassemble` (undo the
resize, restack the slices, undo the canonical reorientation), so the file has the original image's shape and
is written with its original affine: it overlays the image in any viewer and can be scored by other tools.
Labels are the dataset's RAW values (e.g. MSCMRseg 500/600/200, MM-WHS 500/.../850) where the loader recorded
them (`VolumeInfo.extra['label_values']`), class indices otherwise. Slices a loader dropped
(`data.empty_slices='drop'`) come back as background. 2D data (natural images, retina) gets no files.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np

from diffuseg_jax import atomic
from diffuseg_jax.data import folder, imageio, nifti, transforms, volumes
from diffuseg_jax.data.types import DomainData, Split
from diffuseg_jax.errors import ConfigError, DataError, UserError

_SAFE_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*$')


def _check_names(names: Sequence[str], what: str) -> None:
  for name in names:
    if not _SAFE_NAME.match(str(name)):
      raise ConfigError(f'{what} {name!r} must be letters, digits, "_", "-" or "." (no path separators)')
  if len(set(names)) != len(names):
    raise ConfigError(f'{what}s must be unique')


def slice_affine(spacing: Sequence[float]) -> np.ndarray:
  """Voxel->world (mm) affine of a [H, W, 1] slice with pixel size `spacing` = (along H, along W)."""
  return np.diag([float(spacing[0]), float(spacing[1]), 1.0, 1.0])


def _label_dtype(labels: np.ndarray) -> np.dtype:
  return np.dtype(np.uint8) if labels.size == 0 or int(labels.max()) <= 255 else np.dtype(np.int16)


def write_synthetic_nifti(
    out_dir: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray,
    spacing: np.ndarray,
    names: Sequence[str],
) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """Writes N synthetic pairs (each file atomically) -> [(image path, label path)] in `names` order.

  images: float [N, H, W, C] in [-1, 1]; labels: int [N, H, W] class indices; spacing: [N, 2] pixel size
  along (H, W); names: N file stems.
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  spacing = np.asarray(spacing, np.float64)
  n = images.shape[0]
  if images.ndim != 4 or labels.shape != images.shape[:3] or spacing.shape != (n, 2) or len(names) != n:
    raise ValueError(
        f'expected images [N, H, W, C], labels [N, H, W], spacing [N, 2], N names; got {images.shape}, '
        f'{labels.shape}, {spacing.shape}, {len(names)}'
    )
  _check_names(list(names), 'case name')
  out_dir = pathlib.Path(out_dir)
  unit = transforms.from_unit_range(images)
  written = []
  for i, name in enumerate(names):
    affine = slice_affine(spacing[i])
    image = unit[i][:, :, None, 0] if unit.shape[-1] == 1 else unit[i][:, :, None, :]
    image_path = nifti.write_nifti(out_dir / 'images' / f'{name}.nii.gz', image, affine, dtype=np.float32)
    label = labels[i][:, :, None]
    label_path = nifti.write_nifti(
        out_dir / 'labels' / f'{name}.nii.gz', label, affine, dtype=_label_dtype(label))
    written.append((image_path, label_path))
  return written


def _cases_from_arrays(synthetic: Mapping) -> list[tuple[str, list[np.ndarray], np.ndarray, np.ndarray]]:
  """{'images' [N, H, W, C] in [-1, 1], 'labels', 'spacing' [N, 2], 'names'} -> per case
  (name, [H, W, 1] per channel, label [H, W, 1], affine)."""
  images = transforms.from_unit_range(np.asarray(synthetic['images']))
  labels = np.asarray(synthetic['labels'])
  spacing = np.asarray(synthetic.get('spacing', np.ones((images.shape[0], 2))), np.float64)
  names = list(synthetic['names'])
  if images.ndim != 4 or labels.shape != images.shape[:3] or len(names) != images.shape[0]:
    raise ValueError(f'expected images [N, H, W, C], labels [N, H, W], N names; got {images.shape}, '
                     f'{labels.shape}, {len(names)}')
  return [
      (name, [images[i, :, :, c][:, :, None] for c in range(images.shape[-1])], labels[i][:, :, None],
       slice_affine(spacing[i]))
      for i, name in enumerate(names)
  ]


def _cases_from_dir(synthetic_dir: pathlib.Path):
  """Yields (name, channels, label, affine) from an `images/` + `labels/` folder (NIfTI or raster)."""
  for case in folder.split_cases(synthetic_dir, labels_required=True):
    if nifti.is_nifti(case.image_path):
      try:
        img = nib.load(str(case.image_path))
        data = np.asarray(img.dataobj, np.float32)
        label_img = nib.load(str(case.label_path))
        label = np.asarray(label_img.dataobj)
      except Exception as e:  # noqa: BLE001 - any read failure of a user file is a DataError
        raise DataError(f'{case.image_path}: cannot read ({type(e).__name__}: {e})') from None
      affine = np.asarray(img.affine, np.float64)
      if data.ndim == 2:
        data = data[:, :, None]
      channels = [data] if data.ndim == 3 else [data[..., c] for c in range(data.shape[-1])]
      label = label.reshape(channels[0].shape)
    else:
      image = imageio.read_image_2d(case.image_path)
      channels = [image[:, :, c][:, :, None] for c in range(image.shape[-1])]
      label = imageio.read_mask_2d(case.label_path)[:, :, None]
      affine = slice_affine((1.0, 1.0))
    yield case.name, channels, label, affine


def export_nnunet(
    synthetic: str | os.PathLike | Mapping,
    out_root: str | os.PathLike,
    dataset_id: int,
    dataset_name: str,
    class_names: Sequence[str],
    channel_names: Sequence[str],
) -> pathlib.Path:
  """Exports synthetic pairs as an nnU-Net v2 raw dataset -> the `Dataset{ID:03d}_{name}` folder.

  synthetic: a folder written by `write_synthetic_nifti` (or PNG `images/` + `labels/` pairs whose masks hold
  class indices), or a mapping {'images' [N, H, W, C] in [-1, 1], 'labels' [N, H, W], 'spacing' [N, 2],
  'names' [N]}. class_names[0] is the background (exported under nnU-Net's required name 'background');
  channel_names has one entry per image channel. Files of earlier exports that are not part of this one
  are removed, so numTraining always matches the folder.
  """
  if not 1 <= int(dataset_id) <= 999:
    raise ConfigError(f'nnU-Net dataset id {dataset_id} must be in 1..999')
  _check_names([dataset_name], 'dataset name')
  if len(class_names) < 2 or len(set(class_names)) != len(class_names):
    raise ConfigError(f'class_names {list(class_names)} must be >= 2 unique names (index 0 = background)')
  if 'background' in list(class_names)[1:]:
    raise ConfigError(f"class_names {list(class_names)}: 'background' must be class 0")
  root = pathlib.Path(out_root) / f'Dataset{int(dataset_id):03d}_{dataset_name}'
  try:
    (root / 'imagesTr').mkdir(parents=True, exist_ok=True)
    (root / 'labelsTr').mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f'{root}: cannot create the export folder ({e.strerror or e})') from None

  if isinstance(synthetic, Mapping):
    cases = _cases_from_arrays(synthetic)
  else:
    synthetic = pathlib.Path(synthetic)
    if not synthetic.is_dir():
      raise DataError(f'{synthetic}: synthetic data folder not found')
    cases = _cases_from_dir(synthetic)

  num_classes = len(class_names)
  written: set[str] = set()
  names = []
  for name, channels, label, affine in cases:
    _check_names([name], 'case name')
    if len(channels) != len(channel_names):
      raise ConfigError(
          f'case {name} has {len(channels)} channels but {len(channel_names)} channel_names were given')
    label = np.asarray(label)
    bad = np.unique(label[(label < 0) | (label >= num_classes)])
    if bad.size:
      raise DataError(f'{name}: label values {bad[:5].tolist()} are not class indices 0..{num_classes - 1}')
    for c, channel in enumerate(channels):
      path = root / 'imagesTr' / f'{name}_{c:04d}.nii.gz'
      nifti.write_nifti(path, channel, affine, dtype=np.float32)
      written.add(str(path))
    path = nifti.write_nifti(root / 'labelsTr' / f'{name}.nii.gz', label, affine, dtype=_label_dtype(label))
    written.add(str(path))
    names.append(name)
  if not names:
    raise DataError(f'{synthetic}: no synthetic cases to export')
  if len(set(names)) != len(names):
    raise DataError(f'{synthetic}: duplicate case names')
  for sub in ('imagesTr', 'labelsTr'):
    for stale in (root / sub).glob('*.nii.gz'):
      if str(stale) not in written:
        stale.unlink()

  labels = {'background': 0}
  labels.update({str(n): i for i, n in enumerate(class_names) if i > 0})
  atomic.write_json(str(root / 'dataset.json'), dict(
      channel_names={str(c): str(n) for c, n in enumerate(channel_names)},
      labels=labels,
      numTraining=len(names),
      file_ending='.nii.gz',
      name=dataset_name,
  ))
  return root


def has_volumes(data: DomainData) -> bool:
  """Physical (mm) test volumes with known slice positions: scored in 3D, predictions written back."""
  test = data.test
  return data.spacing_unit == 'mm' and bool(test.volumes) and test.slice_index is not None


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
  """Yields (VolumeInfo, label array on the original grid in raw values) per test case.

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


def write_volume_predictions(data: DomainData, pred: np.ndarray, out_dir: str) -> list[str]:
  """Writes test predictions (int [N, H, W] class indices) as one NIfTI per case -> the files written.

  Nothing for data without volumes (`has_volumes` False). Each file is written atomically
  (`nifti.write_nifti`), so a killed run never leaves a half-written prediction.
  """
  if not has_volumes(data):
    return []
  written = []
  for info, labels in case_volumes(data.test, pred):
    path = os.path.join(out_dir, f'{info.name}.nii.gz')
    nifti.write_nifti(path, labels, info.affine, dtype=_label_dtype(labels))
    written.append(path)
  return written
