"""Small on-disk fixtures for the data tests: NIfTI volumes with realistic headers, PNGs, folder trees.

Plain helpers (not pytest fixtures) so any test can build exactly the files it needs in `tmp_path`.
"""

from __future__ import annotations

import json
import pathlib

import nibabel as nib
import numpy as np
from PIL import Image

from diffuseg_jax.config_files import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]

# A non-RAS, oblique-free affine with anisotropic voxels (0.75 x 0.75 in plane, 10 mm slices): voxel axis 0
# runs superior (the 10 mm axis, stored first), axis 1 runs to the patient's left (x decreasing), axis 2
# runs posterior (y decreasing). Canonical RAS = transpose (1, 2, 0) of the stored array, with axes 0 and 1
# flipped; canonical spacing (0.75, 0.75, 10).
PERMUTED_LPS_AFFINE = np.array([
    [0.0, -0.75, 0.0, 40.0],
    [0.0, 0.0, -0.75, 30.0],
    [10.0, 0.0, 0.0, -50.0],
    [0.0, 0.0, 0.0, 1.0],
])


def to_canonical_by_hand(stored: np.ndarray) -> np.ndarray:
  """Canonical (RAS) array of a volume stored with PERMUTED_LPS_AFFINE, derived by hand (see above)."""
  return np.transpose(stored, (1, 2, 0))[::-1, ::-1, :]


def default_config():
  """configs/default.py's get_config()."""
  return load_config('default')


def data_config(**overrides):
  config = default_config().data
  for key, value in overrides.items():
    config[key] = value
  return config


def write_volume(path, data: np.ndarray, affine: np.ndarray = PERMUTED_LPS_AFFINE, dtype=None):
  """Writes a NIfTI file the way scanners/tools do (qform and sform set, zooms from the affine)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  data = np.asarray(data if dtype is None else np.asarray(data).astype(dtype))
  img = nib.Nifti1Image(data, affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  img.header.set_xyzt_units('mm')
  nib.save(img, str(path))
  return path


def write_image(path, array: np.ndarray) -> pathlib.Path:
  """uint8/uint16 [H, W] or [H, W, 3] -> image file (format from the extension)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(array)).save(path)
  return path


def random_volume(rng: np.random.Generator, shape, dtype=np.int16) -> np.ndarray:
  """MR-like intensities: a smooth bright blob plus noise and a few very bright outlier voxels."""
  grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing='ij'))
  vol = 800.0 * np.exp(-2.0 * np.sum(grid**2, axis=0)) + rng.normal(100.0, 20.0, shape)
  vol.flat[rng.choice(vol.size, 3, replace=False)] = 5000.0
  return vol.astype(dtype)


def blob_labels(shape, values=(1, 2)) -> np.ndarray:
  """Two nested boxes with raw label `values`, leaving the first and last slices of axis 0 empty."""
  label = np.zeros(shape, np.int16)
  s = [max(1, n // 4) for n in shape]
  label[1:-1, s[1] : shape[1] - s[1], s[2] : shape[2] - s[2]] = values[0]
  label[1:-1, s[1] + 1 : shape[1] - s[1] - 1, s[2] + 1 : shape[2] - s[2] - 1] = values[1]
  return label


def write_labels_json(root, classes: dict[int, str]) -> pathlib.Path:
  path = pathlib.Path(root) / 'labels.json'
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({str(k): v for k, v in classes.items()}))
  return path


def make_png_tree(root, rng: np.random.Generator, mask_values=(0, 128, 255)) -> pathlib.Path:
  """Folder layout with gray source/test PNGs of mixed sizes (+ masks) and RGB target PNGs."""
  root = pathlib.Path(root)
  sizes = {'a': (12, 10), 'b': (16, 16)}
  for split in ('source', 'test'):
    for name, (h, w) in sizes.items():
      image = rng.integers(0, 256, (h, w), dtype=np.uint8)
      write_image(root / split / 'images' / f'{split}_{name}.png', image)
      mask = np.full((h, w), mask_values[0], np.uint8)
      mask[2:8, 2:6] = mask_values[1]
      mask[3:5, 3:5] = mask_values[2]
      write_image(root / split / 'labels' / f'{split}_{name}.png', mask)
  for name in ('t1', 't2', 't3'):
    write_image(root / 'target' / 'images' / f'{name}.png', rng.integers(0, 256, (14, 14, 3), dtype=np.uint8))
  return root


def make_nifti_tree(root, rng: np.random.Generator, shape=(4, 8, 6)) -> pathlib.Path:
  """Folder layout of 3D NIfTI volumes (stored shape `shape`, PERMUTED_LPS_AFFINE) with raw labels 0/1/2."""
  root = pathlib.Path(root)
  for split, names in (('source', ('s1', 's2')), ('target', ('t1',)), ('test', ('x1', 'x2'))):
    for name in names:
      write_volume(root / split / 'images' / f'{name}.nii.gz', random_volume(rng, shape))
      if split != 'target':
        write_volume(root / split / 'labels' / f'{name}.nii.gz', blob_labels(shape), dtype=np.uint8)
  return root
