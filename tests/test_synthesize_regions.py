"""Region content r(m) of the synthesis stage: appearance statistics and rendering vs direct numpy loops."""

import numpy as np

from diffuseg_jax.stages.synthesize import MIN_CLASS_PIXELS, appearance_statistics, reference_indices, render_regions


def test_appearance_statistics_match_per_image_loops():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (5, 6, 6, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (5, 6, 6))
  labels[2] = 0  # image 2 has only background: classes 1, 2 fall back to the global statistics
  labels[3, :, :] = 0
  labels[3, 0, :MIN_CLASS_PIXELS - 1] = 1  # too few pixels of class 1 in image 3
  stats = appearance_statistics(images, labels, 3)
  for k in range(3):
    pix = images[labels == k]
    np.testing.assert_allclose(stats['mean'][k], pix.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats['std'][k], pix.std(0), rtol=1e-4, atol=1e-5)
    for i in range(5):
      sel = images[i][labels[i] == k]
      if len(sel) >= MIN_CLASS_PIXELS:
        np.testing.assert_allclose(stats['image_mean'][i, k], sel.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats['image_std'][i, k], sel.std(0), rtol=1e-4, atol=1e-5)
      else:
        np.testing.assert_allclose(stats['image_mean'][i, k], stats['mean'][k], rtol=1e-6)
  np.testing.assert_allclose(stats['pseudo_label_fraction'], np.bincount(labels.ravel(), minlength=3) / labels.size)


def test_render_regions_uses_the_reference_statistics_and_label_mode():
  app = {'image_mean': np.stack([np.full((2, 3), 0.1), np.array([[0.2, 0.3, 0.4], [-0.5, -0.6, -0.7]])]),
         'image_std': np.zeros((2, 2, 3))}
  masks = np.array([[[0, 1], [1, 1]], [[1, 0], [0, 0]]])
  out = render_regions(masks, 'rendered', app, 2, 3, np.random.default_rng(0), np.array([1, 0]))
  np.testing.assert_allclose(out[0, 0, 1], [-0.5, -0.6, -0.7])
  np.testing.assert_allclose(out[0, 0, 0], [0.2, 0.3, 0.4])
  np.testing.assert_allclose(out[1], 0.1)
  lab = render_regions(np.array([[[0, 1, 2]]]), 'label', None, 3, 1, np.random.default_rng(0))
  np.testing.assert_allclose(lab[0, 0, :, 0], [-1.0, 0.0, 1.0])


def test_reference_choice_is_fixed_by_seed_and_index():
  a = reference_indices(100, 7, seed=3)
  np.testing.assert_array_equal(a[:40], reference_indices(40, 7, seed=3))  # independent of the mask count
  assert a.min() >= 0 and a.max() < 7 and not np.array_equal(a, reference_indices(100, 7, seed=4))
