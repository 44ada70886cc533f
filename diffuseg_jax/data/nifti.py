"""NIfTI volumes: read into the canonical (RAS+) orientation, validate, write atomically.

Every volume is brought to the closest canonical orientation (`nibabel.as_closest_canonical`) so that
`data.slice_axis` means the same anatomical axis for every file (2 = inferior->superior, i.e. axial slices
for a RAS volume). The original affine and shape are kept so predictions can be written back onto the
original voxel grid (`volumes.reassemble`).

Every problem with a user's file raises `DataError` with one line naming the file.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import nibabel as nib
import numpy as np
from nibabel import orientations

from diffuseg_jax import atomic
from diffuseg_jax.errors import DataError, UserError

NIFTI_SUFFIXES = ('.nii.gz', '.nii')
AFFINE_TOLERANCE = 1e-3  # mm; labels written by other tools often differ from the image in float rounding


@dataclasses.dataclass(frozen=True)
class NiftiVolume:
  """One 3D image in canonical orientation.

  data: float32 [X, Y, Z] (a 2D file becomes [X, Y, 1]); affine: 4x4 canonical voxel->world;
  original_affine / original_shape: as stored in the file; spacing: (3,) voxel size (mm) along the canonical
  axes; to_original: nibabel orientation array [3, 2] that maps the canonical array back to the file's axes.
  """

  data: np.ndarray
  affine: np.ndarray
  original_affine: np.ndarray
  original_shape: tuple[int, ...]
  spacing: np.ndarray
  path: str
  to_original: np.ndarray

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.data.shape)


def is_nifti(path: str | os.PathLike) -> bool:
  return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
  """File name without `.nii.gz` / `.nii`."""
  name = pathlib.Path(path).name
  for suffix in NIFTI_SUFFIXES:
    if name.lower().endswith(suffix):
      return name[: -len(suffix)]
  return pathlib.Path(name).stem


def _load_raw(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], tuple[int, ...]]:
  """-> (array as stored, scaled by scl_slope/inter; affine; zooms; stored shape). DataError if unreadable."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f'{path}: file not found')
  try:
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)  # forces the full (possibly gzip) read: truncation surfaces here
    affine = np.asarray(img.affine, np.float64)
    zooms = tuple(float(z) for z in img.header.get_zooms())
  except MemoryError:
    raise
  except Exception as e:  # nibabel, gzip, zlib and EOF errors all mean the same thing to the user
    raise DataError(f'{path}: cannot read NIfTI (corrupt or truncated?): {type(e).__name__}: {e}') from None
  return data, affine, zooms, tuple(int(s) for s in data.shape)


def _as_3d(data: np.ndarray, path: pathlib.Path) -> np.ndarray:
  """2D -> [X, Y, 1]; trailing singleton dims beyond the third are squeezed; real 4D is rejected."""
  if data.ndim == 2:
    return data[:, :, None]
  if data.ndim < 2:
    raise DataError(f'{path}: expected a 2D or 3D image, got shape {data.shape}')
  if data.ndim > 3:
    if any(s != 1 for s in data.shape[3:]):
      raise DataError(
          f'{path}: expected a 3D volume, got 4D shape {data.shape} (a time series or multi-channel file); '
          'split it into 3D files'
      )
    data = data.reshape(data.shape[:3])
  return data


def _shape3(shape: tuple[int, ...]) -> tuple[int, ...]:
  return (*shape, 1) if len(shape) == 2 else tuple(shape[:3])


def _orientation(affine: np.ndarray, path: pathlib.Path) -> np.ndarray:
  if not np.all(np.isfinite(affine)):
    raise DataError(f'{path}: the header affine has non-finite values')
  ornt = orientations.io_orientation(affine)
  if np.any(np.isnan(ornt)):
    raise DataError(f'{path}: the header affine is degenerate (a voxel axis has zero length)')
  return ornt


def read_image(path: str | os.PathLike) -> NiftiVolume:
  """Reads a 2D/3D NIfTI image into float32 canonical (RAS+) orientation; see `NiftiVolume`."""
  path = pathlib.Path(path)
  raw, affine, zooms, original_shape = _load_raw(path)
  data = _as_3d(raw, path)
  if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
    raise DataError(f'{path}: unsupported voxel type {data.dtype}')
  data = data.astype(np.float32)
  if not np.all(np.isfinite(data)):
    raise DataError(f'{path}: {int(np.sum(~np.isfinite(data)))} voxels are NaN or infinite')
  ornt = _orientation(affine, path)
  canonical = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
  # Spacing from the header zooms (a 2D file has none for its third axis: 1.0), permuted to canonical axes.
  zooms3 = np.ones(3)
  zooms3[: min(3, len(zooms))] = zooms[:3]
  spacing = np.empty(3)
  spacing[ornt[:, 0].astype(int)] = zooms3
  to_original = orientations.ornt_transform(orientations.axcodes2ornt(('R', 'A', 'S')), ornt)
  return NiftiVolume(
      data=np.asarray(canonical.dataobj, np.float32),
      affine=np.asarray(canonical.affine, np.float64),
      original_affine=affine,
      original_shape=original_shape,
      spacing=spacing.astype(np.float32),
      path=str(path),
      to_original=to_original,
  )


def _describe_affine(affine: np.ndarray) -> str:
  """Short form for error messages: voxel sizes along the file axes and the origin (mm)."""
  sizes = np.round(np.linalg.norm(affine[:3, :3], axis=0), 4).tolist()
  return f'voxel {sizes}, origin {np.round(affine[:3, 3], 3).tolist()}'


def read_label(path: str | os.PathLike, reference: NiftiVolume) -> np.ndarray:
  """Reads a label volume onto `reference`'s canonical grid -> int32 [X, Y, Z] of raw label values.

  The label file must have the image's stored shape and (within 1e-3) its affine; values must be integers.
  """
  path = pathlib.Path(path)
  raw, affine, _, shape = _load_raw(path)
  data = _as_3d(raw, path)
  if data.shape != _shape3(reference.original_shape):
    raise DataError(
        f'{path}: label shape {shape} differs from image {pathlib.Path(reference.path).name} '
        f'shape {reference.original_shape}'
    )
  if not np.allclose(affine, reference.original_affine, rtol=0.0, atol=AFFINE_TOLERANCE):
    diff = float(np.max(np.abs(affine - reference.original_affine)))
    raise DataError(
        f'{path}: label affine differs from image {pathlib.Path(reference.path).name} by up to {diff:.4g} '
        f'(label: {_describe_affine(affine)}; image: {_describe_affine(reference.original_affine)})'
    )
  if np.issubdtype(data.dtype, np.floating):
    if not np.all(np.isfinite(data)):
      raise DataError(f'{path}: label volume has NaN or infinite values')
    if not np.array_equal(data, np.round(data)):
      bad = np.unique(data[data != np.round(data)])[:5]
      raise DataError(f'{path}: label values must be integers, found {bad.tolist()}')
  elif not np.issubdtype(data.dtype, np.integer) and data.dtype != np.bool_:
    raise DataError(f'{path}: unsupported label voxel type {data.dtype}')
  ornt = orientations.io_orientation(reference.original_affine)
  canonical = orientations.apply_orientation(data, ornt)
  return np.ascontiguousarray(canonical).astype(np.int32)


def _nifti_dtype(array: np.ndarray, dtype) -> np.dtype:
  if dtype is not None:
    return np.dtype(dtype)
  if array.dtype == np.bool_:
    return np.dtype(np.uint8)
  if array.dtype == np.int64:
    return np.dtype(np.int32)
  if np.issubdtype(array.dtype, np.floating):
    return np.dtype(np.float32)
  return array.dtype


def write_nifti(
    path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, *, dtype=None
) -> pathlib.Path:
  """Writes `array` with `affine` (as both qform and sform) to `path`, atomically.

  The file is written to a temporary name in the same folder and renamed into place, so a reader (or a
  resumed run) never sees a half-written file. `dtype` None: the array's own (bool -> uint8, int64 -> int32,
  float -> float32). Missing parent folders are created; an unwritable folder raises UserError.
  """
  path = pathlib.Path(path)
  array = np.asarray(array)
  if not is_nifti(path):
    raise UserError(f'{path}: NIfTI output must end in .nii or .nii.gz')
  img = nib.Nifti1Image(array.astype(_nifti_dtype(array, dtype)), np.asarray(affine, np.float64))
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  img.header.set_xyzt_units('mm')
  try:
    with atomic.atomic_path(str(path)) as tmp:
      nib.save(img, tmp)
  except OSError as e:
    raise UserError(f'{path}: cannot write ({e.strerror or e})') from None
  return path
