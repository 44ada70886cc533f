"""Generated cross-domain settings for the quality benchmark (benchmarks/quality.py), written in the folder
layout (diffuseg_jax/data/folder.py) with a labels.json, so the pipeline reads them like anyone's data.

Every setting is a pair of domains that share the anatomy generator and differ in how it is imaged (contrast,
texture, noise, illumination), as a new scanner or sequence does. Images are 8-bit grayscale, labels 0..K-1.

  multiclass     an anatomy-like phantom: a body with an organ, a vessel-like tube and a small lesion
                 (4 classes) on a smooth textured background. Source: CT-like contrast with fine noise;
                 target: an MR-like contrast (the organ darker than the body, the lesion bright), a smooth
                 bias field and coarser texture.
  dense_tissue   brain-like tissue classes that cover most of the image: CSF, grey and white matter (4
                 classes with the background), deformed by a smooth random warp. Source: T1-like (CSF dark,
                 WM bright); target: PD/T2-like (CSF bright, WM darkest), so anything drawn outside the mask
                 that looks like tissue is a wrong label.
  thin_vessels   curvilinear, branching vessels 1-3 px wide (2 classes). Source: bright vessels on a dark,
                 finely noisy background; target: dark vessels on a bright background with a radial
                 illumination falloff and coarse texture (fundus-like).

`write_setting(name, root, counts, size, seed)` writes <root>/{source,target,val,test}/{images,labels}/ (target
labels only for the oracle) and returns the number of classes. Deterministic in (name, counts, size, seed).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from PIL import Image
from scipy import ndimage

SETTINGS = ('multiclass', 'dense_tissue', 'thin_vessels')
CLASS_NAMES = {
    'multiclass': ('background', 'body', 'organ', 'lesion'),
    'dense_tissue': ('background', 'csf', 'grey_matter', 'white_matter'),
    'thin_vessels': ('background', 'vessel'),
}
# Mean intensity per class in [0, 1] for (source, target): the contrast each domain images the anatomy with.
CONTRAST = {
    'multiclass': ((0.08, 0.45, 0.70, 0.25), (0.15, 0.55, 0.30, 0.90)),
    'dense_tissue': ((0.05, 0.20, 0.55, 0.85), (0.05, 0.90, 0.60, 0.40)),
    'thin_vessels': ((0.15, 0.80), (0.75, 0.30)),
}


def smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
  """Gaussian-filtered white noise with zero mean and unit std: a texture or bias field with correlation
  length sigma. The mean is removed before scaling: a wide filter leaves an almost constant field, and scaling
  its offset by 1 / std would turn a bias field into a huge gain (or an all-black image)."""
  field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode='wrap')
  field = field - field.mean()
  return field / max(field.std(), 1e-8)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  y, x = np.mgrid[0:size, 0:size].astype(np.float64)
  return (y + 0.5) / size * 2 - 1, (x + 0.5) / size * 2 - 1  # [-1, 1]


def _ellipse(y, x, cy, cx, ry, rx, angle) -> np.ndarray:
  c, s = np.cos(angle), np.sin(angle)
  u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
  return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def multiclass_labels(rng: np.random.Generator, size: int) -> np.ndarray:
  y, x = _grid(size)
  label = np.zeros((size, size), np.uint8)
  body = _ellipse(y, x, rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1), rng.uniform(0.6, 0.8), rng.uniform(0.6, 0.85),
                  rng.uniform(0, np.pi))
  label[body] = 1
  organ = _ellipse(y, x, rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0.18, 0.35),
                   rng.uniform(0.12, 0.3), rng.uniform(0, np.pi)) & body
  label[organ] = 2
  t = np.linspace(0, 1, 4 * size)  # a tube: a smooth curve with a width of a few pixels
  cy = rng.uniform(-0.5, 0.5) + 0.3 * np.sin(2 * np.pi * (t * rng.uniform(0.5, 1.5) + rng.uniform()))
  cx = -0.7 + 1.4 * t
  width = rng.uniform(1.5, 3.0) / size * 2
  tube = np.zeros((size, size), bool)
  for py, px in zip(cy, cx, strict=True):
    tube |= (y - py) ** 2 + (x - px) ** 2 <= width**2
  label[tube & body & ~organ] = 3  # the tube shares the lesion class: small, thin, bright in the target
  lesion = _ellipse(y, x, rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), rng.uniform(0.06, 0.12),
                    rng.uniform(0.06, 0.12), 0.0) & body
  label[lesion] = 3
  return label


def dense_tissue_labels(rng: np.random.Generator, size: int) -> np.ndarray:
  """Concentric head-like layers (CSF rim, GM ribbon, WM core) with a smooth random warp and sulci-like folds."""
  y, x = _grid(size)
  warp = 0.12
  dy = warp * smooth_noise(rng, size, size / 8)
  dx = warp * smooth_noise(rng, size, size / 8)
  yy, xx = y + dy, x + dx
  angle = np.arctan2(yy, xx)
  folds = 0.06 * np.sin(angle * rng.integers(5, 9) + rng.uniform(0, 2 * np.pi))
  r = np.sqrt((yy / rng.uniform(0.95, 1.05)) ** 2 + (xx / rng.uniform(0.88, 1.0)) ** 2)
  label = np.zeros((size, size), np.uint8)
  label[r <= 1.0] = 1  # CSF
  label[r <= 0.88 + folds] = 2  # grey matter, folded
  label[r <= 0.62 + folds] = 3  # white matter
  ventricles = (np.abs(xx) < 0.08 + 0.04 * rng.uniform()) & (np.abs(yy) < 0.25) & (r <= 0.5)
  label[ventricles] = 1  # CSF inside the white matter, as ventricles
  return label


def thin_vessel_labels(rng: np.random.Generator, size: int) -> np.ndarray:
  """Branching random-walk vessels, 1-3 px wide, leaving a disc near the centre in all directions (wider near
  the disc, narrower after each branching), like retinal vessels."""
  label = np.zeros((size, size), np.uint8)
  cy, cx = rng.uniform(0.35, 0.65, 2) * size
  roots = rng.integers(4, 7)
  stack = [(cy, cx, a, 3) for a in np.linspace(0, 2 * np.pi, roots, endpoint=False) + rng.uniform(0, 1)]
  drawn = 0
  while stack and drawn < 24:
    py, px, heading, width = stack.pop()
    drawn += 1
    for step in range(size):
      heading += rng.normal(0, 0.12)
      py, px = py + np.sin(heading), px + np.cos(heading)
      if not (0 <= py < size and 0 <= px < size):
        break
      lo = (width - 1) // 2
      iy, ix = int(py) - lo, int(px) - lo
      label[max(iy, 0):iy + width, max(ix, 0):ix + width] = 1
      if step > 3 and width > 1 and rng.uniform() < 0.06:
        stack.append((py, px, heading + rng.choice([-1, 1]) * rng.uniform(0.4, 0.9), width - 1))
        width -= 1 if rng.uniform() < 0.5 else 0
  return label


LABELS = {'multiclass': multiclass_labels, 'dense_tissue': dense_tissue_labels, 'thin_vessels': thin_vessel_labels}


def render(name: str, label: np.ndarray, domain: int, rng: np.random.Generator) -> np.ndarray:
  """The image of `label` in domain 0 (source) or 1 (target): uint8 [H, W]."""
  size = label.shape[0]
  means = np.asarray(CONTRAST[name][domain])
  image = means[label].astype(np.float64)
  if domain == 0:  # fine noise, a little texture
    image += 0.05 * smooth_noise(rng, size, 0.7) + 0.03 * smooth_noise(rng, size, 2.0)
  else:  # coarser texture, a smooth multiplicative bias field, its own noise level
    image += 0.07 * smooth_noise(rng, size, 1.5) + 0.04 * rng.standard_normal((size, size))
    image *= 1.0 + 0.2 * smooth_noise(rng, size, size / 4)
    if name == 'thin_vessels':
      y, x = _grid(size)
      image *= 1.0 - 0.35 * (y**2 + x**2)  # illumination falling off to the rim
  image = ndimage.gaussian_filter(image, 0.5 if domain == 0 else 0.8)
  return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def write_setting(name: str, root: pathlib.Path, counts: dict[str, int], size: int, seed: int) -> int:
  """Writes the setting's folder dataset under `root`; returns its number of classes. counts: rows per split
  of {'source', 'target', 'val', 'test'}. The target split's labels are written for the oracle only."""
  if name not in SETTINGS:
    raise ValueError(f'unknown setting {name!r}; choose from {SETTINGS}')
  root = pathlib.Path(root)
  for split_index, split in enumerate(('source', 'target', 'val', 'test')):
    rng = np.random.default_rng([seed, SETTINGS.index(name), split_index])
    domain = 0 if split == 'source' else 1
    for i in range(counts[split]):
      label = LABELS[name](rng, size)
      image = render(name, label, domain, rng)
      for kind, array in (('images', image), ('labels', label)):
        folder = root / split / kind
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / f'{split}{i:04d}.png')
  names = CLASS_NAMES[name]
  (root / 'labels.json').write_text(json.dumps({str(k): v for k, v in enumerate(names)}, indent=1) + '\n')
  return len(names)
