"""2D raster images and masks (PNG, JPEG, TIFF, GIF, BMP): read, validate, write atomically.

Images are returned as float32 [H, W, C] in [0, 1] with C = 1 (grayscale) or 3 (colour): 8-bit files are
divided by 255, 16-bit by 65535, 32-bit integer files by their type's maximum; floating-point TIFFs are kept
if already inside [0, 1] and min-max scaled otherwise. Alpha is dropped; palette images become RGB (or
grayscale when the palette is gray). Multi-frame files (GIF/TIFF) use their first frame.

Masks keep their raw integer values (mapping to class indices happens later, `volumes.map_labels`).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffuseg_jax import atomic
from diffuseg_jax.errors import DataError, UserError

RASTER_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.gif', '.bmp')
LOSSY_SUFFIXES = ('.jpg', '.jpeg')  # compression changes pixel values: a 0/255 JPEG mask reads as dozens of values


def is_raster(path: str | os.PathLike) -> bool:
  return pathlib.Path(path).suffix.lower() in RASTER_SUFFIXES


def lossy_note(path: str | os.PathLike) -> str:
  """For an error about a mask's values: '' or why a JPEG mask has values nobody drew."""
  if pathlib.Path(path).suffix.lower() in LOSSY_SUFFIXES:
    return '; JPEG is lossy and adds values at every edge: save label masks as PNG'
  return ''


def _open(path: pathlib.Path) -> Image.Image:
  if not path.is_file():
    raise DataError(f'{path}: file not found')
  try:
    img = Image.open(path)
    img.seek(0)
    img.load()
  except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
    raise DataError(f'{path}: cannot read image (corrupt or unsupported?): {e}') from None
  return img


def _same_channels(rgb: np.ndarray) -> bool:
  return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]))


def read_image_2d(path: str | os.PathLike) -> np.ndarray:
  """-> float32 [H, W, C] in [0, 1], C in {1, 3}; see the module docstring for the scaling rules."""
  path = pathlib.Path(path)
  img = _open(path)
  mode = img.mode
  if mode == 'P':
    img = img.convert('RGBA' if 'transparency' in img.info else 'RGB')
    mode = img.mode
  if mode in ('1', 'L', 'LA'):
    arr = np.asarray(img.convert('L'), np.float32)[..., None] / 255.0
  elif mode in ('RGB', 'RGBA', 'CMYK', 'YCbCr', 'LAB', 'HSV', 'RGBX'):
    arr = np.asarray(img.convert('RGB'), np.float32) / 255.0
  elif mode.startswith('I;16'):
    arr = np.asarray(img).astype(np.float32)[..., None] / 65535.0
  elif mode == 'I':
    raw = np.asarray(img)
    # Pillow reads some 16-bit files as 32-bit 'I'; scale by the smallest type that holds the values.
    top = 65535.0 if raw.min() >= 0 and raw.max() <= 65535 else float(np.iinfo(np.int32).max)
    arr = np.clip(raw.astype(np.float64) / top, 0.0, 1.0).astype(np.float32)[..., None]
  elif mode == 'F':
    raw = np.asarray(img, np.float32)
    if not np.all(np.isfinite(raw)):
      raise DataError(f'{path}: image has NaN or infinite pixels')
    lo, hi = float(raw.min()), float(raw.max())
    if lo >= 0.0 and hi <= 1.0:
      arr = raw[..., None]
    else:
      arr = ((raw - lo) / (hi - lo) if hi > lo else np.zeros_like(raw))[..., None]
  else:
    raise DataError(f'{path}: unsupported image mode {mode!r}')
  if arr.shape[-1] == 3 and _same_channels(arr):
    arr = arr[..., :1]
  return np.ascontiguousarray(arr, np.float32)


def read_mask_2d(path: str | os.PathLike) -> np.ndarray:
  """-> int32 [H, W] raw mask values.

  Colour masks must be gray (identical R, G, B channels), otherwise DataError. Palette masks whose palette
  is gray give the gray values; other palette masks give their palette indices (the usual way class masks
  are stored as palette PNGs).
  """
  path = pathlib.Path(path)
  img = _open(path)
  if img.mode == 'P':
    rgb = np.asarray(img.convert('RGB'))
    return (rgb[..., 0] if _same_channels(rgb) else np.asarray(img)).astype(np.int32)
  if img.mode in ('RGB', 'RGBA', 'RGBX', 'LA'):
    arr = np.asarray(img)
    if img.mode == 'LA':
      return arr[..., 0].astype(np.int32)
    if not _same_channels(arr[..., :3]):
      raise DataError(
          f'{path}: colour mask (R, G, B differ); label masks must be single-channel class values'
      )
    return arr[..., 0].astype(np.int32)
  if img.mode == 'F':
    arr = np.asarray(img)
    if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
      raise DataError(f'{path}: mask values must be integers')
    return arr.astype(np.int32)
  arr = np.asarray(img)
  if arr.ndim != 2:
    raise DataError(f'{path}: expected a single-channel mask, got shape {arr.shape} (mode {img.mode})')
  return arr.astype(np.int32)


def _to_pil_array(array: np.ndarray) -> np.ndarray:
  """Floats in [0, 1] -> uint8; integers kept as uint8 / uint16 when they fit."""
  array = np.asarray(array)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
    raise ValueError(f'write_png expects [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {array.shape}')
  if array.dtype == np.bool_:
    return array.astype(np.uint8)
  if np.issubdtype(array.dtype, np.floating):
    return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
  lo, hi = int(array.min(initial=0)), int(array.max(initial=0))
  if lo < 0 or hi > 65535:
    raise ValueError(f'integer PNG values must lie in [0, 65535], got [{lo}, {hi}]')
  if hi <= 255:
    return array.astype(np.uint8)
  if array.ndim == 3:
    raise ValueError('16-bit PNGs must be single-channel')
  return array.astype(np.uint16)


def write_png(path: str | os.PathLike, array: np.ndarray) -> pathlib.Path:
  """Writes [H, W] / [H, W, C] to a PNG atomically (temp file in the same folder, then rename).

  float arrays are taken to be in [0, 1] (8-bit output); integer arrays (masks) are written unchanged, as
  8-bit when every value fits and as 16-bit otherwise.
  """
  path = pathlib.Path(path)
  img = Image.fromarray(_to_pil_array(array))
  try:
    with atomic.atomic_path(str(path)) as tmp:
      img.save(tmp, format='PNG')
  except OSError as e:
    raise UserError(f'{path}: cannot write ({e.strerror or e})') from None
  return path
