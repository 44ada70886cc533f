"""Tests for the random intensity curves (diffuseg_jax/data/intensity.py) and their place in the input pipeline."""

import itertools
import json

import numpy as np
import pytest

from diffuseg_jax.data import intensity, pipeline


def test_apply_curve_against_hand_values():
  image = np.array([[-1.0, -0.5], [0.0, 1.0]], np.float32)[..., None]
  xs = np.array([0.0, 0.5, 1.0])
  identity = intensity.apply_curve(image, xs, xs)
  np.testing.assert_allclose(identity, image, atol=1e-7)
  inverted = intensity.apply_curve(image, xs, xs[::-1].copy())
  np.testing.assert_allclose(inverted, -image, atol=1e-7)
  # knots (0, 0.2), (0.5, 0.9), (1, 1): unit 0.25 -> 0.2 + 0.5 * 0.7 = 0.55 -> 0.1 on the [-1, 1] scale
  bent = intensity.apply_curve(image, xs, np.array([0.2, 0.9, 1.0]))
  np.testing.assert_allclose(bent[..., 0], [[-0.6, 0.1], [0.8, 1.0]], atol=1e-6)


def test_curves_are_monotone_cover_half_the_range_and_go_both_ways():
  rng = np.random.default_rng(0)
  directions = []
  for _ in range(400):
    xs, ys = intensity.random_curve(rng)
    assert xs[0] == 0.0 and xs[-1] == 1.0 and np.all(np.diff(xs) >= 0)
    steps = np.diff(ys)
    assert np.all(steps >= 0) or np.all(steps <= 0)
    assert abs(ys[-1] - ys[0]) >= 0.5 - 1e-12 and ys.min() >= 0.0 and ys.max() <= 1.0
    directions.append(ys[-1] < ys[0])
  assert 0.4 < np.mean(directions) < 0.6  # reversed about half the time


def test_class_order_reverses_on_about_prob_over_two_of_images():
  """Two classes, dark and bright: the remap (probability 0.8) reverses their order half the time: 0.4."""
  image = np.full((8, 8, 1), -0.6, np.float32)
  image[:, 4:] = 0.6
  rng = np.random.default_rng(1)
  reversed_order = []
  for _ in range(1000):
    out = intensity.augment_intensity(image, rng, noise_std=0.0)
    assert out.shape == image.shape and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    reversed_order.append(out[:, :4].mean() > out[:, 4:].mean())
  assert 0.35 < np.mean(reversed_order) < 0.45


def test_no_remap_and_no_noise_is_the_identity_and_noise_has_its_std():
  image = np.random.default_rng(2).uniform(-0.5, 0.5, (16, 16, 3)).astype(np.float32)
  out = intensity.augment_intensity(image, np.random.default_rng(3), prob=0.0, noise_std=0.0)
  np.testing.assert_array_equal(out, image)
  stds = []
  for seed in range(200):
    rng = np.random.default_rng(seed)
    noisy = intensity.augment_intensity(image, rng, prob=0.0, noise_std=0.2)
    stds.append(np.std(noisy - image))
  assert np.mean(stds) == pytest.approx(0.1, rel=0.1)  # std uniform in [0, 0.2]: mean 0.1


def test_colour_channels_get_their_own_curves():
  image = np.zeros((4, 4, 3), np.float32)
  rng = np.random.default_rng(4)
  outs = [intensity.augment_intensity(image, rng, prob=1.0, noise_std=0.0) for _ in range(20)]
  assert any(len(np.unique(o[0, 0])) == 3 for o in outs)  # a grey pixel turns into a colour


def make_arrays(n=12):
  rng = np.random.default_rng(0)
  label = rng.integers(0, 3, (n, 6, 6)).astype(np.int32)
  image = (label[..., None] / 2.0 * 2 - 1).astype(np.float32)
  return {'image': image, 'label': label, 'row': np.arange(n)}


def test_pipeline_remaps_images_only_and_resumes_exactly():
  arrays = make_arrays()
  make = lambda: pipeline.train_iterator(arrays, 4, seed=7, process_index=0, process_count=1, intensity=True)
  batches = list(itertools.islice(make(), 6))
  changed = 0
  for b in batches:
    np.testing.assert_array_equal(b['label'], arrays['label'][b['row']])  # labels untouched
    changed += int(not np.array_equal(b['image'], arrays['image'][b['row']]))
    assert b['image'].dtype == np.float32 and b['image'].min() >= -1 and b['image'].max() <= 1
  assert changed == len(batches)  # noise alone changes every batch
  it = make()
  list(itertools.islice(it, 4))
  state = json.loads(json.dumps(pipeline.get_iterator_state(it)))
  fresh = make()
  pipeline.set_iterator_state(fresh, state)
  for a, b in zip(batches[4:], itertools.islice(fresh, 2), strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_intensity_leaves_the_order_and_the_flips_as_they_were():
  """The curves draw from their own stream: switching them on changes the images' values, never which rows a
  batch holds or how they are flipped (the labels, flipped with the images, are bit-identical)."""
  arrays = make_arrays()
  plain = pipeline.train_iterator(arrays, 4, seed=7, process_index=0, process_count=1, augment=True)
  curved = pipeline.train_iterator(arrays, 4, seed=7, process_index=0, process_count=1, augment=True, intensity=True)
  changed = 0
  for a, b in zip(itertools.islice(plain, 5), itertools.islice(curved, 5), strict=True):
    np.testing.assert_array_equal(a['row'], b['row'])
    np.testing.assert_array_equal(a['label'], b['label'])
    changed += int(not np.array_equal(a['image'], b['image']))
  assert changed == 5
