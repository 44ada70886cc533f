"""Volumes <-> 2D slices: intensity normalisation, label mapping, slicing, subject splits, reassembly.

Every dataset loader reduces its files to a `Split` through `build_split`, which reads each case (a NIfTI
volume or a 2D raster image), normalises it, slices it along `data.slice_axis` of the canonical volume,
resizes every slice to `image_size` x `image_size` and records the geometry (`VolumeInfo`) needed by
`reassemble` to put slice predictions back onto the original file's voxel grid.

Empty-slice policy (`data.empty_slices`): 'keep' keeps every slice; 'drop' drops slices whose label is all
background (only where labels exist: unlabelled cases keep every slice); 'drop_source' drops them in the
source split only, so that test volumes stay whole for 3D metrics. The target split is never filtered (its
labels, where present, are oracle-only). Dropped slices come back as background in `reassemble`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np
from nibabel import orientations

from diffuseg_jax.data import imageio, nifti, transforms
from diffuseg_jax.data.types import Split, VolumeInfo
from diffuseg_jax.errors import ConfigError, DataError

EMPTY_SLICE_POLICIES = ('keep', 'drop', 'drop_source')
# More distinct values than any mask of the supported datasets has (MM-WHS: 8): without a declared label map,
# a label file with more is a lossy or interpolated image, not a mask.
MAX_MASK_VALUES = 32


@dataclasses.dataclass(frozen=True)
class CaseFiles:
  """One subject/image: its image file and (optional) label file; `name` becomes `VolumeInfo.name`."""

  name: str
  image_path: str | os.PathLike
  label_path: str | os.PathLike | None = None


def normalise_intensity(vol: np.ndarray, percentiles: Sequence[float] | None = (0.5, 99.5)) -> np.ndarray:
  """Robust [0, 1] scaling: clip to the given intensity percentiles of the whole volume, then scale.

  MR intensities have no absolute unit and a few very bright voxels; clipping at robust percentiles makes
  volumes from different scanners comparable. A constant volume gives zeros. `percentiles` None: min-max.
  """
  vol = np.asarray(vol, np.float32)
  if vol.size == 0:
    return vol
  lo, hi = (float(vol.min()), float(vol.max())) if percentiles is None else (
      float(v) for v in np.percentile(vol, tuple(percentiles)))
  if not hi > lo:
    return np.zeros_like(vol)
  return np.clip((vol - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def map_labels(
    raw: np.ndarray, value_to_index: Mapping[int, int], path: str | os.PathLike = ''
) -> np.ndarray:
  """Raw label values -> int32 class indices; DataError (naming `path`) for a value not in the mapping."""
  raw = np.asarray(raw)
  values, inverse = np.unique(raw, return_inverse=True)
  unexpected = [int(v) for v in values if int(v) not in value_to_index]
  if unexpected:
    shown = ', '.join(str(v) for v in unexpected[:10]) + (', ...' if len(unexpected) > 10 else '')
    raise DataError(f'{path}: unexpected label values {shown} (expected one of '
                    f'{sorted(int(k) for k in value_to_index)}){imageio.lossy_note(path)}')
  lut = np.array([value_to_index[int(v)] for v in values], np.int32)
  return lut[inverse].reshape(raw.shape)


def values_found(label: np.ndarray) -> np.ndarray:
  """The distinct values of a raw label array, sorted (a count for small non-negative ints: no sort of a
  whole CT volume)."""
  label = np.asarray(label)
  if label.size and np.issubdtype(label.dtype, np.integer) and 0 <= label.min() and label.max() < 1 << 16:
    return np.flatnonzero(np.bincount(label.ravel()))
  return np.unique(label)


def check_mask_values(values: np.ndarray, path: str | os.PathLike) -> None:
  """DataError for a label file (read without a label map) whose values are not a mask's: more distinct values
  than a mask plausibly has, or a JPEG with more than two (its compression adds values at every edge)."""
  lossy = imageio.lossy_note(path)
  if len(values) > MAX_MASK_VALUES or (lossy and len(values) > 2):
    shown = ', '.join(str(int(v)) for v in values[:4]) + (f', ..., {int(values[-1])}' if len(values) > 4 else '')
    why = lossy or f'; a mask holds a few class values (at most {MAX_MASK_VALUES} without labels.json)'
    raise DataError(f'{path}: {len(values)} distinct label values ({shown}){why}')


def raw_label_values(value_to_index: Mapping[int, int] | None) -> tuple[int, ...] | None:
  """Class index -> the raw label value to write it back as: the FIRST raw value (in the mapping's order)
  mapped to each index, so a loader puts its preferred value first where several map to one class (MM-WHS
  421 -> LA after 420). None when there is no mapping or an index in 0..K-1 has no raw value."""
  if not value_to_index:
    return None
  out: dict[int, int] = {}
  for raw, index in value_to_index.items():
    out.setdefault(int(index), int(raw))
  if sorted(out) != list(range(len(out))):
    return None
  return tuple(out[k] for k in range(len(out)))


def _size2(image_size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(image_size, int | np.integer):
    return int(image_size), int(image_size)
  h, w = image_size
  return int(h), int(w)


def volume_to_slices(
    image: np.ndarray,
    label: np.ndarray | None,
    *,
    slice_axis: int,
    image_size: int | Sequence[int],
    percentiles: Sequence[float] | None,
    empty_slices: str = 'keep',
    label_map: Mapping[int, int] | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    name: str = '',
) -> dict[str, np.ndarray | None]:
  """One volume -> its 2D slices at the model resolution.

  image: [X, Y, Z] float, or [X, Y, Z, C] channels-last (a 2D RGB image is [H, W, 1, 3] with slice_axis=2).
  label: [X, Y, Z] int raw values (mapped with `label_map` if given) or class indices, or None.
  percentiles: robust normalisation of the whole volume (`normalise_intensity`); None: the image is already
    in [0, 1] (raster images) and is only clipped.
  empty_slices: 'keep' | 'drop' (see the module docstring). spacing: voxel size along X, Y, Z.
  Returns dict(images float32 [S, H, W, C] in [-1, 1], labels int32 [S, H, W] | None, slice_index int32 [S],
  spacing float32 [S, 2] = size of the RESIZED in-plane pixels along (H, W), in the units of `spacing`).
  """
  if empty_slices not in ('keep', 'drop'):
    raise ConfigError(f"config.data.empty_slices={empty_slices!r} is not 'keep' or 'drop' here")
  image = np.asarray(image, np.float32)
  if image.ndim == 3:
    image = image[..., None]
  if image.ndim != 4:
    raise ValueError(f'image must be [X, Y, Z] or [X, Y, Z, C], got {image.shape}')
  if not 0 <= slice_axis <= 2:
    raise ConfigError(f'config.data.slice_axis={slice_axis} must be 0, 1 or 2')
  if label is not None and tuple(label.shape) != image.shape[:3]:
    raise DataError(f'{name}: label shape {tuple(label.shape)} != image shape {image.shape[:3]}')
  size = _size2(image_size)
  if percentiles is None:
    image = np.clip(image, 0.0, 1.0)
  else:
    image = normalise_intensity(image, percentiles)
  if label is not None:
    label = map_labels(label, label_map, name) if label_map is not None else np.asarray(label, np.int32)

  image_s = np.moveaxis(image, slice_axis, 0)  # [S, a, b, C]
  label_s = None if label is None else np.moveaxis(label, slice_axis, 0)  # [S, a, b]
  keep = np.arange(image_s.shape[0])
  if empty_slices == 'drop' and label_s is not None:
    keep = keep[np.any(label_s != 0, axis=(1, 2))]
  in_plane = [a for a in range(3) if a != slice_axis]
  shape_ab = np.array([image.shape[a] for a in in_plane], np.float64)
  spacing_ab = np.array([spacing[a] for a in in_plane], np.float64) * shape_ab / np.array(size, np.float64)

  images = np.stack([transforms.resize_image(image_s[i], size) for i in keep]) if keep.size else (
      np.zeros((0, *size, image.shape[-1]), np.float32))
  labels = None
  if label_s is not None:
    labels = np.stack([transforms.resize_labels(label_s[i], size) for i in keep]).astype(np.int32) if (
        keep.size) else np.zeros((0, *size), np.int32)
  return dict(
      images=transforms.to_unit_range(np.clip(images, 0.0, 1.0)),
      labels=labels,
      slice_index=keep.astype(np.int32),
      spacing=np.tile(spacing_ab.astype(np.float32), (keep.size, 1)),
  )


def subject_split(
    case_names: Sequence[str], fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0
) -> dict[str, list[str]]:
  """Seeded split of subjects (never slices) into train / val / test.

  Counts are the fractions of the number of subjects, rounded by largest remainder; every split with a
  non-zero fraction then gets at least one subject, taken from the largest split. Small N: with fewer
  subjects than non-zero splits, subjects go to train first, then test, then val (1 subject: train only;
  2 subjects: train + test). The result does not depend on the order of `case_names`.
  """
  names = sorted(case_names)
  if len(set(names)) != len(names):
    raise DataError(f'duplicate case names: {sorted({n for n in names if names.count(n) > 1})}')
  frac = np.asarray(fractions, np.float64)
  if frac.shape != (3,) or np.any(frac < 0) or frac.sum() <= 0:
    raise ConfigError(f'config.data.split_fractions={tuple(fractions)} must be three non-negative fractions')
  frac = frac / frac.sum()
  n = len(names)
  order = np.random.default_rng(seed).permutation(n)
  nonzero = [i for i in range(3) if frac[i] > 0]
  if n < len(nonzero):
    counts = np.zeros(3, int)
    for i in [i for i in (0, 2, 1) if frac[i] > 0][:n]:
      counts[i] = 1
  else:
    exact = frac * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind='stable')[: n - counts.sum()]:
      counts[i] += 1
    for i in nonzero:
      if counts[i] == 0:
        counts[int(np.argmax(counts))] -= 1
        counts[i] = 1
  bounds = np.cumsum(counts)
  shuffled = [names[j] for j in order]
  return dict(
      train=sorted(shuffled[: bounds[0]]),
      val=sorted(shuffled[bounds[0] : bounds[1]]),
      test=sorted(shuffled[bounds[1] : bounds[2]]),
  )


def empty_slice_policy(setting: str, split_name: str) -> str:
  """`data.empty_slices` ('keep' | 'drop' | 'drop_source') -> the policy ('keep' | 'drop') for the split named
  `split_name` ('source', 'target', 'test', 'val'); see the module docstring."""
  if setting not in EMPTY_SLICE_POLICIES:
    raise ConfigError(f'config.data.empty_slices={setting!r} is not one of {EMPTY_SLICE_POLICIES}')
  if split_name == 'target':
    return 'keep'  # target labels are oracle-only: they must not decide which target slices DiffuSeg sees
  if setting == 'drop_source':
    return 'drop' if split_name == 'source' else 'keep'
  return setting


def _read_case(case: CaseFiles, percentiles) -> tuple[np.ndarray, np.ndarray | None, dict]:
  """-> (image [X, Y, Z, C], raw label [X, Y, Z] | None, geometry) for a NIfTI or raster case."""
  if nifti.is_nifti(case.image_path):
    vol = nifti.read_image(case.image_path)
    label = None
    if case.label_path is not None:
      if not nifti.is_nifti(case.label_path):
        raise DataError(f'{case.label_path}: the label of NIfTI image {case.image_path} must be NIfTI too')
      label = nifti.read_label(case.label_path, vol)
    geometry = dict(
        shape=vol.shape, affine=vol.original_affine, spacing=tuple(float(s) for s in vol.spacing),
        extra=dict(to_original=vol.to_original, original_shape=vol.original_shape,
                   canonical_affine=vol.affine, path=str(case.image_path)),
        percentiles=percentiles,
    )
    return vol.data[..., None], label, geometry
  if imageio.is_raster(case.image_path):
    img = imageio.read_image_2d(case.image_path)  # [H, W, C]
    label = None
    if case.label_path is not None:
      if not imageio.is_raster(case.label_path):
        raise DataError(f'{case.label_path}: the label of {case.image_path} must be a PNG/JPG/TIF/GIF/BMP')
      label = imageio.read_mask_2d(case.label_path)
      if label.shape != img.shape[:2]:
        raise DataError(f'{case.label_path}: mask shape {label.shape} differs from image {img.shape[:2]}')
      label = label[:, :, None]
    h, w = img.shape[:2]
    geometry = dict(
        shape=(h, w, 1), affine=np.eye(4), spacing=(1.0, 1.0, 1.0),
        extra=dict(to_original=np.array([[0, 1], [1, 1], [2, 1]], np.float64), original_shape=(h, w),
                   canonical_affine=np.eye(4), path=str(case.image_path)),
        percentiles=None,
    )
    return img[:, :, None, :], label, geometry
  raise DataError(f'{case.image_path}: unsupported file type (expected .nii[.gz]/.png/.jpg/.tif/.gif/.bmp)')


def build_split(
    cases: Sequence[CaseFiles],
    *,
    data_config,
    label_map: Mapping[int, int] | None,
    case_id_offset: int = 0,
    channels: int | None = None,
    empty_slices: str | None = None,
) -> Split:
  """Reads, normalises and slices `cases` into one `Split` (case ids case_id_offset, +1, ...).

  Uses data_config.{image_size, slice_axis, percentiles, empty_slices, max_cases}. NIfTI volumes are sliced
  along `slice_axis` of the canonical volume; a 2D raster image is one slice (axis 2 of [H, W, 1]) and is
  not percentile-normalised; any volume with a singleton axis is sliced along it.
  label_map: raw value -> class index (None keeps the raw values).
  channels: common channel count (`transforms.harmonise_channels`); None: the largest among the cases.
  empty_slices: 'keep' or 'drop' for this split; None resolves `data_config.empty_slices` as for a
  non-source split. max_cases caps the number of cases (the first ones, in the given order).
  VolumeInfo per case: shape = canonical shape, affine = the file's original affine, spacing = canonical
  voxel size; extra = {to_original: orientation [3, 2] canonical -> file axes, original_shape,
  canonical_affine, path, label_path, label_values (`raw_label_values(label_map)`: raw value per class
  index, to write predictions in the dataset's own label values; None without a label_map),
  raw_values_found ({raw value in the label file: its class index}, None without a label)}.
  """
  policy = empty_slice_policy(data_config.empty_slices, 'other') if empty_slices is None else empty_slices
  if data_config.max_cases is not None:
    cases = list(cases)[: int(data_config.max_cases)]
  if not cases:
    raise DataError('no cases to load (empty split)')
  if data_config.slice_axis not in (0, 1, 2):
    raise ConfigError(f'config.data.slice_axis={data_config.slice_axis!r} must be 0, 1 or 2')
  percentiles = (0.0, 100.0) if data_config.percentiles is None else tuple(data_config.percentiles)
  parts, volumes = [], {}
  label_values = raw_label_values(label_map)
  for k, case in enumerate(cases):
    image, label, geo = _read_case(case, percentiles)
    found = None
    if label is not None:  # raw value -> class index, for the data summary and checks (preflight.py)
      raw = values_found(label)
      if label_map is None:
        check_mask_values(raw, case.label_path)
      found = {int(v): int(label_map.get(int(v), -1)) if label_map is not None else int(v) for v in raw}
    slice_axis = int(data_config.slice_axis)
    singleton = [a for a in range(3) if image.shape[a] == 1]
    if singleton and image.shape[slice_axis] != 1:
      slice_axis = singleton[-1]  # a 2D image / one-slice volume is one slice, whatever data.slice_axis says
    out = volume_to_slices(
        image, label, slice_axis=slice_axis, image_size=data_config.image_size,
        percentiles=geo['percentiles'], empty_slices=policy, label_map=label_map,
        spacing=geo['spacing'], name=str(case.label_path or case.image_path),
    )
    case_id = case_id_offset + k
    out['case_ids'] = np.full(out['slice_index'].shape, case_id, np.int32)
    parts.append(out)
    extra = dict(geo['extra'], label_path=None if case.label_path is None else str(case.label_path),
                 label_values=label_values, raw_values_found=found)
    volumes[case_id] = VolumeInfo(
        name=case.name, shape=tuple(int(s) for s in geo['shape']), affine=np.asarray(geo['affine']),
        slice_axis=slice_axis, spacing=tuple(geo['spacing']), extra=extra,
    )
  c = channels or max(p['images'].shape[-1] for p in parts)
  labelled = [p['labels'] is not None for p in parts]
  if any(labelled) and not all(labelled):
    missing = [cases[i].name for i, ok in enumerate(labelled) if not ok][:5]
    raise DataError(f'some cases have labels and others do not (unlabelled: {missing})')
  return Split(
      images=np.concatenate([transforms.harmonise_channels(p['images'], c) for p in parts]),
      labels=np.concatenate([p['labels'] for p in parts]) if all(labelled) else None,
      case_ids=np.concatenate([p['case_ids'] for p in parts]),
      spacing=np.concatenate([p['spacing'] for p in parts]).reshape(-1, 2),
      slice_index=np.concatenate([p['slice_index'] for p in parts]),
      volumes=volumes,
  )


def harmonise_split(split: Split, channels: int) -> Split:
  """The same split with `channels` image channels (`transforms.harmonise_channels`)."""
  return dataclasses.replace(split, images=transforms.harmonise_channels(split.images, channels))


def reassemble(slice_preds: np.ndarray, slice_index: np.ndarray, info: VolumeInfo) -> np.ndarray:
  """Slice predictions of ONE case -> label array on the original file's voxel grid.

  slice_preds: int [S, H, W] at the model resolution; slice_index: [S] slice positions in the canonical
  volume. Undoes the in-plane resize (nearest), stacks along `info.slice_axis` (missing/dropped slices = 0)
  and undoes the canonical reorientation, so that the result written with `info.affine` overlays the
  original image. Returns an array of `info.extra['original_shape']` (the canonical shape if absent).
  """
  slice_preds = np.asarray(slice_preds)
  slice_index = np.asarray(slice_index)
  if slice_preds.shape[0] != slice_index.shape[0]:
    raise ValueError(f'{slice_preds.shape[0]} predictions for {slice_index.shape[0]} slice indices')
  shape = tuple(info.shape)
  axis = info.slice_axis
  in_plane = tuple(shape[a] for a in range(3) if a != axis)
  canonical = np.zeros((shape[axis], *in_plane), slice_preds.dtype)
  for pred, idx in zip(slice_preds, slice_index, strict=True):
    canonical[int(idx)] = transforms.resize_labels(pred, in_plane)
  canonical = np.moveaxis(canonical, 0, axis)
  to_original = info.extra.get('to_original')
  if to_original is not None:
    canonical = orientations.apply_orientation(canonical, np.asarray(to_original))
  original_shape = info.extra.get('original_shape', shape)
  return np.ascontiguousarray(canonical).reshape(original_shape)
