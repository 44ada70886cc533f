"""Image-quality metrics on host: Fréchet distance, kernel (Inception) distance, background similarity.

Fréchet distance and KID take feature arrays [N, F] from `metrics.features`; whether they are 'FID'/'KID'
proper depends on the extractor (InceptionV3 pool3 only when local weights are given), so callers should
label results with the extractor's `name`.
"""

from __future__ import annotations

import numpy as np

# Fewer images than this in either set: FD and KID are not reported (callers give None and `too_few`'s
# reason). Both are defined from 2 images on, but from so few they measure the draw, not the distributions.
MIN_IMAGES_PER_SET = 10


def too_few(*set_sizes: int, minimum: int = MIN_IMAGES_PER_SET) -> str | None:
  """None when every set has at least `minimum` images, else the reason a distribution statistic is not given."""
  if min(set_sizes) >= minimum:
    return None
  return f'not computed: needs at least {minimum} images per set, has {" and ".join(map(str, set_sizes))}'


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [F] and unbiased covariance [F, F] (float64) of features [N, F], N >= 2."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f'features must be [N, F] with N >= 2, got {x.shape}')
  return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((s + s.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) between two Gaussians.

  tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))): the inner matrix is symmetric PSD, so a symmetric
  eigen-solver gives real eigenvalues (negative round-off clipped to 0). This needs no epsilon fix and no
  complex arithmetic, unlike sqrtm(S1 S2) on a near-singular product (few samples, many features).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f'mismatched shapes: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}')
  r1 = _sqrt_psd(s1)
  inner = r1 @ s2 @ r1
  eig = np.linalg.eigvalsh((inner + inner.T) / 2)
  tr_covmean = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, num_subsets: int = 10,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
  """KID (Binkowski et al. 2018): unbiased MMD^2 with k(x, y) = (x.y / F + 1)^3, mean and std over subsets.

  Each subset draws `subset_size` rows (clipped to min(N1, N2)) of each feature set without replacement.
  Args: f1 [N1, F], f2 [N2, F]. Returns (mean, std) as floats; lower = closer distributions.
  """
  f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
    raise ValueError(f'features must be [N, F] with equal F, got {f1.shape} and {f2.shape}')
  m = min(subset_size, f1.shape[0], f2.shape[0])
  if m < 2:
    raise ValueError(f'KID needs at least 2 samples per set, got {f1.shape[0]} and {f2.shape[0]}')
  rng = np.random.default_rng(seed)
  scores = []
  for _ in range(num_subsets):
    x = f1[rng.choice(f1.shape[0], m, replace=False)]
    y = f2[rng.choice(f2.shape[0], m, replace=False)]
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    off = m * (m - 1)
    scores.append((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off
                  - 2.0 * kxy.mean())
  return float(np.mean(scores)), float(np.std(scores))


def background_similarity_per_pair(synthetic: np.ndarray, reference: np.ndarray, synth_masks: np.ndarray,
                                   reference_masks: np.ndarray | None = None,
                                   value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
  """Per-pair background difference [N] (float64; NaN where a pair has no background pixel).

  OUR background score, `background_distance_to_reference` in metrics.json (the paper cites mutual background
  similarity, MBS, but does not define it, and pairs images that share anatomy; ours share only z_dom):
  images are mapped from `value_range` to [0, 1]; the background is the pixels outside the foreground
  (label != 0) of both the synthetic mask and, when given, the reference mask; the score is
  100 * mean |synthetic - reference| over those pixels and all channels. 0 = identical backgrounds, 100 =
  opposite extremes; lower = more consistent, as in the paper.

  Args:
    synthetic, reference: float [N, H, W, C] images, pair i = (synthetic[i], reference[i]).
    synth_masks, reference_masks: int [N, H, W] label maps (0 = background); reference_masks may be None.
  """
  a, b = np.asarray(synthetic, np.float64), np.asarray(reference, np.float64)
  if a.shape != b.shape or a.ndim != 4:
    raise ValueError(f'synthetic {a.shape} and reference {b.shape} must both be [N, H, W, C]')
  background = np.asarray(synth_masks) == 0
  if reference_masks is not None:
    background &= np.asarray(reference_masks) == 0
  if background.shape != a.shape[:3]:
    raise ValueError(f'masks {background.shape} must be [N, H, W] = {a.shape[:3]}')
  lo, hi = value_range
  diff = np.abs(a - b).mean(axis=-1) / (hi - lo)  # [N, H, W], the difference on the [0, 1] scale
  count = background.sum(axis=(1, 2))
  total = np.where(background, diff, 0.0).sum(axis=(1, 2))
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(count > 0, 100.0 * total / count, np.nan)


def background_similarity(synthetic: np.ndarray, reference: np.ndarray, synth_masks: np.ndarray,
                          reference_masks: np.ndarray | None = None,
                          value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
  """Mean over pairs of `background_similarity_per_pair` (pairs without background are skipped)."""
  scores = background_similarity_per_pair(synthetic, reference, synth_masks, reference_masks, value_range)
  scores = scores[~np.isnan(scores)]
  if scores.size == 0:
    raise ValueError('background_similarity: no pair has any background pixel')
  return float(scores.mean())


def psnr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Per-image PSNR (dB) of images [N, ...] in [-1, 1], measured on the [0, 1] scale."""
  a = np.clip((x + 1) / 2, 0, 1)
  b = np.clip((y + 1) / 2, 0, 1)
  mse = np.mean((a - b) ** 2, axis=tuple(range(1, a.ndim)))
  return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))


def label_agreement(predicted: np.ndarray, given: np.ndarray, num_classes: int) -> float | None:
  """Mean over foreground classes of the pooled Dice between `predicted` and `given` label maps [N, H, W].

  With `predicted` = the FFD-VAE student's segmentation of the synthetic images and `given` = the labels they
  were synthesised from, this asks whether a target-domain segmenter trained without target labels sees the
  given anatomy where the label puts it: a label-free score of synthetic pairs (no target label is read).
  Classes absent from both are skipped; None when no foreground class is present at all.
  """
  scores = []
  for k in range(1, num_classes):
    a, b = predicted == k, given == k
    total = int(a.sum()) + int(b.sum())
    if total:
      scores.append(2.0 * int((a & b).sum()) / total)
  return float(np.mean(scores)) if scores else None
