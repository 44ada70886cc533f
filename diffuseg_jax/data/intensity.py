"""Random intensity curves: one domain's images shown in many contrasts, so what is learned from them transfers.

A segmenter (or the FFD-VAE teacher) trained on source images learns the source's contrast: which class is
bright, which is dark. A target from another scanner or sequence may order the classes differently (T1 against
T2 / PD brain MRI, bright vessels on dark against dark on bright). Remapping each training image through a
random smooth intensity curve, sometimes decreasing, and adding noise of a random level, makes intensity
order a nuisance the network cannot rely on, so it has to use shape and texture, which the domains share.

The curve is drawn per image and channel (a colour image gets a random colour mapping): a piecewise-linear
map of [0, 1] through `points` knots at sorted random positions with sorted random values (so increasing),
reversed with probability 1/2. With `curves='any'`, half of the curves instead take the knot values in a random
order: non-monotone maps, which can also reorder classes that are neither darkest nor brightest (T1 against
T2 / PD tissue: the background stays dark while CSF, grey and white matter reverse). With `curves='classes'`
(for labelled images only: the teacher's source), half of the remapped images take no curve but a random
intensity per labelled class, as label-driven synthesis of brain MRI does: every class gets its own uniform
value in [0, 1] per channel, the texture around each class's mean is kept (scaled by one random gain in [1/2, 2]),
and the step between classes is smoothed over EDGE_SIGMA px, so any order of any number of classes appears,
also orders a curve of POINTS knots cannot reach (four classes whose middle two swap while the outer two stay).
With `curves='per_class'` every image takes per-class values (no curve, no image left in its own contrast), as
label-driven synthesis trains contrast-agnostic segmenters: with a share of images in the source's own order or
in orders a curve gives, a network learns that order as a shortcut and misses a target that reorders classes a
curve cannot (benchmarks/QUALITY.md). Its K values are K evenly spaced levels in a random order, each jittered
within the middle half of its bin ((order + 0.25 + 0.5 u) / K), so any two classes differ by at least 0.5 / K:
uniform values would often draw two classes alike, and a 1-px vessel imaged at its background's intensity
teaches nothing but noise. Other families are applied with probability
`prob`, else the image keeps its intensities. With `bias_blur` (the teacher's `vae.augment_source_bias_blur`),
the curve is followed by the two other ways scanners differ besides contrast: a smooth multiplicative bias
field (exp of a bilinearly upsampled BIAS_GRID x BIAS_GRID Gaussian grid whose std is drawn in [0, BIAS_STD],
on the [0, 1] intensities) and a Gaussian blur of a std drawn in [0, BLUR_SIGMA] pixels; these draws come
after all the others, so the curves and the noise draw what they drew without them. Then Gaussian noise with a
std drawn uniformly in [0, `noise_std`] (in the [-1, 1] image scale), clipped to [-1, 1]. Host-side numpy on
one record: `pipeline.train_iterator(..., intensity=True)` runs it per record with its own seeded stream, so it
is deterministic and resumable like the flips.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

POINTS = 4  # knots of the curve, the two ends included
PROB = 0.8  # the rest of the images keep their own contrast
NOISE_STD = 0.1  # largest additive noise std, [-1, 1] scale
BIAS_GRID = 4  # control points per side of the bias field
BIAS_STD = 0.3  # largest std of the log bias field: gains of about exp(+-0.6) at two std
BLUR_SIGMA = 1.0  # largest blur std, pixels
CURVES = ('monotone', 'any', 'classes', 'per_class')  # increasing or reversed | also non-monotone | also
# per-class values for half of the remapped images | per-class values for every image
BY_LABEL = ('classes', 'per_class')  # the families that read each image's label map
EDGE_SIGMA = 0.5  # px: the per-class offsets are smoothed over a blurred edge, not stepped at the label border
GAIN_RANGE = (0.5, 2.0)  # the per-class remap scales the texture around each class's mean by a gain in this range


def check_curves(curves: str) -> None:
  """A ValueError naming the families if `curves` is not one of CURVES."""
  if curves not in CURVES:
    raise ValueError(f'intensity curves {curves!r} is not one of {", ".join(CURVES)}')


def random_curve(rng: np.random.Generator, points: int = POINTS,
                 curves: str = 'monotone') -> tuple[np.ndarray, np.ndarray]:
  """(xs, ys), float64 [points] each: knots of a monotone map of [0, 1] onto a random sub-range, increasing
  or (with probability 1/2) decreasing. xs run from 0 to 1; ys span at least half of [0, 1]. curves='any':
  with probability 1/2 the ys are then put in a random order (a non-monotone map over the same range); the
  two extra draws are made whatever the outcome. 'monotone' draws exactly what it always drew; 'classes' and
  'per_class' draw what 'any' draws."""
  check_curves(curves)
  inner = np.sort(rng.uniform(0.0, 1.0, points - 2))
  xs = np.concatenate([[0.0], inner, [1.0]])
  low = rng.uniform(0.0, 0.5)
  high = rng.uniform(low + 0.5, 1.0)  # keep at least half the range: no image washed out to flat grey
  ys = low + (high - low) * np.sort(np.concatenate([[0.0], rng.uniform(0.0, 1.0, points - 2), [1.0]]))
  if rng.random() < 0.5:
    ys = ys[::-1].copy()
  if curves != 'monotone':
    shuffle, order = rng.random() < 0.5, rng.permutation(points)
    if shuffle:
      ys = ys[order]
  return xs, ys


def apply_curve(image: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
  """float32 image in [-1, 1] -> the same shape, each intensity mapped through the curve (xs, ys) on [0, 1]."""
  unit = (np.clip(image, -1.0, 1.0) + 1.0) * 0.5
  return (np.interp(unit, xs, ys) * 2.0 - 1.0).astype(np.float32)


def class_remap(unit: np.ndarray, label: np.ndarray, values: np.ndarray, gain: float,
                edge_sigma: float = EDGE_SIGMA) -> np.ndarray:
  """float [H, W] in [0, 1], int label [H, W], values [K] (one per class 0..K-1) -> float32 [H, W] in [0, 1]:
  each class k's pixels moved from their mean to values[k], the deviations from that mean times `gain`, i.e.
  gain * unit + (values - gain * mean)[label], the second term Gaussian-smoothed over edge_sigma px so that a
  pixel of a blurred border is not pushed to one side's value. Classes absent from the image are left out."""
  unit = np.asarray(unit, np.float64)
  counts = np.bincount(label.ravel(), minlength=len(values))[:len(values)]
  sums = np.bincount(label.ravel(), weights=unit.ravel(), minlength=len(values))[:len(values)]
  means = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
  offset = (np.asarray(values, np.float64) - gain * means)[label]
  if edge_sigma > 0:
    offset = ndimage.gaussian_filter(offset, edge_sigma, mode='nearest')
  return np.clip(gain * unit + offset, 0.0, 1.0).astype(np.float32)


def bias_field(shape: tuple[int, int], std: float, rng: np.random.Generator, grid: int = BIAS_GRID) -> np.ndarray:
  """float32 [H, W] > 0: exp of a grid x grid field of N(0, std^2) values, bilinearly interpolated over the image
  (corners on the corner pixels): a gain that varies smoothly across the image, as a coil's does."""
  coarse = rng.standard_normal((grid, grid)) * std
  rows, cols = (_linear_weights(n, grid) for n in shape)  # bilinear = linear along rows, then along columns
  return np.exp(rows @ coarse @ cols.T).astype(np.float32)


def _linear_weights(n: int, grid: int) -> np.ndarray:
  """float64 [n, grid]: row i holds the weights that linearly interpolate `grid` knots, spread from the first
  to the last of n samples, at sample i."""
  return np.stack([np.interp(np.linspace(0.0, grid - 1.0, n), np.arange(grid), knot) for knot in np.eye(grid)],
                  axis=1)


def spaced_class_values(uniform: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """float64 [C, K] in [0, 1] -> float64 [C, K]: per channel, K levels in a random order (one permutation drawn
  per channel), level k at (k + 0.25 + 0.5 u) / K for the given uniform draws u, so two classes of a channel
  differ by at least 0.5 / K."""
  uniform = np.asarray(uniform, np.float64)
  k = uniform.shape[1]
  order = np.stack([rng.permutation(k) for _ in range(uniform.shape[0])])
  return (order + 0.25 + 0.5 * uniform) / k


def augment_intensity(image: np.ndarray, rng: np.random.Generator, *, prob: float = PROB,
                      noise_std: float = NOISE_STD, points: int = POINTS, curves: str = 'monotone',
                      bias_blur: bool = False, label: np.ndarray | None = None) -> np.ndarray:
  """float32 [H, W, C] in [-1, 1] -> float32 [H, W, C] in [-1, 1]: a random curve of family `curves` per
  channel (with probability `prob`; with 'classes', half of those images a random value per class of `label`,
  int [H, W], instead; with 'per_class', every image that value per class, whatever `prob`), with `bias_blur`
  a random bias field and blur (module docstring), then Gaussian noise of a random std in [0, noise_std]. For a
  given label, draws the same number of random values whatever happens, so the stream does not depend on the
  outcome; the families draw what they drew before 'classes' existed."""
  image = np.asarray(image, np.float32)
  channels = image.shape[-1]
  maps = [random_curve(rng, points, curves) for _ in range(channels)]
  remap = rng.random() < prob
  sigma = rng.uniform(0.0, noise_std)
  noise = rng.standard_normal(image.shape).astype(np.float32)
  if bias_blur:
    field = bias_field(image.shape[:2], rng.uniform(0.0, BIAS_STD), rng)
    blur = rng.uniform(0.0, BLUR_SIGMA)
  by_class = False
  if curves in BY_LABEL:
    if label is None:
      raise ValueError(f"intensity curves {curves!r} need the image's label map")
    label = np.asarray(label)
    by_class = rng.random() < 0.5 or curves == 'per_class'
    remap = remap or curves == 'per_class'
    values = rng.uniform(0.0, 1.0, (channels, int(label.max()) + 1))
    if curves == 'per_class':
      values = spaced_class_values(values, rng)
    gain_k = float(np.exp(rng.uniform(*np.log(GAIN_RANGE))))
  out = image
  if remap and by_class:
    unit = (np.clip(image, -1.0, 1.0) + 1.0) * 0.5
    out = np.stack([class_remap(unit[..., c], label, values[c], gain_k) * 2.0 - 1.0 for c in range(channels)],
                   axis=-1).astype(np.float32)
  elif remap:
    out = np.stack([apply_curve(image[..., c], *maps[c]) for c in range(channels)], axis=-1)
  if bias_blur:
    unit = np.clip((out + 1.0) * 0.5 * field[..., None], 0.0, 1.0)
    unit = ndimage.gaussian_filter(unit, sigma=(blur, blur, 0.0), mode='nearest')
    out = (unit * 2.0 - 1.0).astype(np.float32)
  return np.clip(out + sigma * noise, -1.0, 1.0).astype(np.float32)
