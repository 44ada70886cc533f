"""FFD-VAE diagnostics against constructed cases: how much anatomy z_dom carries (closed-form extremes)."""

import numpy as np

from diffuseg_jax.metrics import ffd_vae_diagnostics as diag


def _labels(rng, n=40, size=12):
  """Random boxes of two classes: the areas vary image by image."""
  labels = np.zeros((n, size, size), np.int32)
  for i in range(n):
    h, w = rng.integers(1, 8, 2)
    labels[i, :h, :w] = 1
    labels[i, -rng.integers(1, 5):, -3:] = 2
  return labels


def test_area_fractions_by_hand():
  labels = np.array([[[0, 1], [2, 2]], [[1, 1], [1, 0]]])
  np.testing.assert_allclose(diag.area_fractions(labels, 3), [[0.25, 0.5], [0.75, 0.0]])


def test_anatomy_r2_extremes():
  rng = np.random.default_rng(0)
  labels = _labels(rng)
  areas = diag.area_fractions(labels, 3)
  linear = np.concatenate([areas @ rng.normal(size=(2, 4)), rng.normal(size=(40, 2))], axis=1)  # areas in z
  assert diag.anatomy_r2(linear, labels, 3, seed=0) > 0.95
  unrelated = rng.normal(size=(40, 6))
  assert diag.anatomy_r2(unrelated, labels, 3, seed=0) < 0.15
  assert diag.anatomy_r2(linear[:9], labels[:9], 3, seed=0) is None  # too few images to cross-validate
  assert diag.anatomy_r2(linear, np.zeros_like(labels), 3, seed=0) is None  # nothing varies
