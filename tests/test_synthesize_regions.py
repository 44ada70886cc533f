"""The synthesis stage's host-side parts: region content r(m) (appearance statistics and rendering vs direct numpy
loops), reference images and the mask plan."""

import numpy as np

from diffuseg_jax.stages.synthesize import (
  MASK_PLAN_SALT,
  MIN_CLASS_PIXELS,
  appearance_statistics,
  mask_plan,
  reference_indices,
  render_regions,
)


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


def test_mask_plan_takes_the_first_masks_then_permuted_passes():
  np.testing.assert_array_equal(mask_plan(10, None, seed=0), np.arange(10))  # None: every mask once
  np.testing.assert_array_equal(mask_plan(10, 4, seed=0), np.arange(4))  # as many masks or fewer: unchanged
  np.testing.assert_array_equal(mask_plan(10, 10, seed=0), np.arange(10))
  plan = mask_plan(4, 18, seed=7)
  assert plan.dtype == np.int64 and len(plan) == 18
  np.testing.assert_array_equal(plan[:4], np.arange(4))  # pass 0 in order
  for c in range(1, 4):  # each further pass is a permutation of every mask, seeded by (seed, pass)
    np.testing.assert_array_equal(np.sort(plan[4 * c:4 * c + 4]), np.arange(4))
    np.testing.assert_array_equal(plan[4 * c:4 * c + 4],
                                  np.random.default_rng([7, MASK_PLAN_SALT, c]).permutation(4))
  assert set(plan[16:]) <= set(range(4)) and len(set(plan[16:])) == 2  # a partial last pass: no repeat in it
  np.testing.assert_array_equal(mask_plan(4, 30, seed=7)[:18], plan)  # more masks only append
  assert not np.array_equal(mask_plan(4, 18, seed=8), plan)
  assert sorted(np.bincount(mask_plan(3, 3 * 50 + 1, seed=0))) == [50, 50, 51]  # balanced
  np.testing.assert_array_equal(mask_plan(1, 3, seed=0), [0, 0, 0])
