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


def _orders(curves, n=600, seed=5):
  """The orders (argsort) a family's curves give four fixed class intensities, over n curves."""
  rng = np.random.default_rng(seed)
  classes = np.array([0.05, 0.2, 0.55, 0.85])  # a T1-like tissue contrast: background, CSF, GM, WM
  return [tuple(np.argsort(np.interp(classes, *intensity.random_curve(rng, curves=curves)), kind='stable'))
          for _ in range(n)]


def test_monotone_curves_give_two_class_orders_and_any_gives_many():
  monotone = set(_orders('monotone'))
  assert monotone <= {(0, 1, 2, 3), (3, 2, 1, 0)}, monotone  # ties (flat pieces) aside: up or down only
  orders = _orders('any')
  assert len(set(orders)) >= 12  # of the 24
  # T1 -> PD: the background stays darkest while CSF, GM, WM reverse (argsort: background, WM, GM, CSF)
  assert (0, 3, 2, 1) in orders


def test_any_curves_are_non_monotone_about_half_the_time_and_keep_the_range():
  rng = np.random.default_rng(6)
  bent = []
  for _ in range(2000):
    xs, ys = intensity.random_curve(rng, curves='any')
    assert xs[0] == 0.0 and xs[-1] == 1.0 and np.all(np.diff(xs) >= 0)
    assert ys.max() - ys.min() >= 0.5 - 1e-12 and ys.min() >= 0.0 and ys.max() <= 1.0
    steps = np.diff(ys)
    bent.append(not (np.all(steps >= 0) or np.all(steps <= 0)))
  # shuffled half the time; 2 of the 4! orders of the knot values are monotone again: 0.5 * 22 / 24
  expected = 0.5 * 22 / 24
  assert abs(np.mean(bent) - expected) < 4 * np.sqrt(expected * (1 - expected) / 2000)


def test_monotone_family_draws_what_it_always_drew():
  """'monotone' must not consume extra random numbers: runs made before the 'any' family existed keep their
  data stream (and their run fingerprints, where it is the neutral value). The draws, by hand: two inner
  knots, low, high, two inner values, the reversal coin."""
  rng, by_hand = np.random.default_rng(9), np.random.default_rng(9)
  xs, ys = intensity.random_curve(rng, curves='monotone')
  inner = np.sort(by_hand.uniform(0.0, 1.0, 2))
  low = by_hand.uniform(0.0, 0.5)
  high = by_hand.uniform(low + 0.5, 1.0)
  values = low + (high - low) * np.sort(np.concatenate([[0.0], by_hand.uniform(0.0, 1.0, 2), [1.0]]))
  if by_hand.random() < 0.5:
    values = values[::-1]
  np.testing.assert_array_equal(xs, np.concatenate([[0.0], inner, [1.0]]))
  np.testing.assert_array_equal(ys, values)
  assert rng.random() == by_hand.random()  # the same position in the stream


def test_unknown_curve_family_is_a_clear_error():
  with pytest.raises(ValueError, match="'wavy' is not one of monotone, any"):
    intensity.random_curve(np.random.default_rng(0), curves='wavy')
  with pytest.raises(ValueError, match="'wavy' is not one of monotone, any"):
    pipeline.train_iterator(make_arrays(), 4, seed=0, process_index=0, process_count=1, intensity=True, curves='wavy')


def _check_resumes_exactly(make, batches):
  """An iterator moved to the saved position after 5 batches yields batches 5.. of `batches` again."""
  it = make()
  list(itertools.islice(it, 5))
  fresh = make()
  pipeline.set_iterator_state(fresh, json.loads(json.dumps(pipeline.get_iterator_state(it))))
  for a, b in zip(batches[5:], itertools.islice(fresh, 3), strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_pipeline_any_curves_reorder_classes_and_resume_exactly():
  arrays = make_arrays(24)
  make = lambda: pipeline.train_iterator(arrays, 4, seed=3, process_index=0, process_count=1, intensity=True,
                                         curves='any')
  batches = list(itertools.islice(make(), 8))
  middle_not_between = 0  # the middle class (label 1) outside the range of classes 0 and 2: non-monotone
  for b in batches:
    np.testing.assert_array_equal(b['label'], arrays['label'][b['row']])
    for image, label in zip(b['image'][..., 0], b['label'], strict=True):
      means = [image[label == k].mean() for k in range(3)]
      middle_not_between += int(not min(means[0], means[2]) - 0.2 < means[1] < max(means[0], means[2]) + 0.2)
  assert middle_not_between > 0
  _check_resumes_exactly(make, batches)


@pytest.mark.parametrize(('augment', 'curves', 'bias_blur'), [(True, 'any', True), (False, 'monotone', False)])
def test_teacher_trains_on_the_curves_its_config_names(augment, curves, bias_blur, monkeypatch):
  """The teacher stage hands vae.augment_source_intensity, vae.source_intensity_curves and
  vae.augment_source_bias_blur to the pipeline."""
  from types import SimpleNamespace

  from diffuseg_jax.stages import teacher
  from tests.fixtures import default_config

  config = default_config()
  config.vae.augment_source_intensity = augment
  config.vae.source_intensity_curves = curves
  config.vae.augment_source_bias_blur = bias_blur
  calls = []
  source = SimpleNamespace(images=np.zeros((2, 8, 8, 1), np.float32), labels=np.zeros((2, 8, 8), np.int32))
  ctx = SimpleNamespace(config=config, data=SimpleNamespace(source=source, spec=None, val=None), is_main_process=False,
                        train=lambda task, arrays, **kwargs: calls.append(kwargs))
  # the network is not tested here
  stand_in = SimpleNamespace(name='teacher', checkpoint='teacher', model=None)
  monkeypatch.setattr(teacher, 'task', lambda config, spec: stand_in)
  teacher.run(ctx)
  assert calls == [{'intensity': augment, 'curves': curves, 'bias_blur': bias_blur}]


def test_bias_field_is_exp_of_a_bilinear_grid():
  """Against scipy: the log of the field is the 4 x 4 grid of N(0, std^2) values (the same draws) interpolated
  bilinearly with its corners on the corner pixels (map_coordinates, order 1); std 0 gives a gain of 1."""
  from scipy import ndimage

  h, w, std = 13, 10, 0.3
  field = intensity.bias_field((h, w), std, np.random.default_rng(3))
  coarse = np.random.default_rng(3).standard_normal((intensity.BIAS_GRID, intensity.BIAS_GRID)) * std
  g = intensity.BIAS_GRID - 1
  rows, cols = np.meshgrid(np.linspace(0, g, h), np.linspace(0, g, w), indexing='ij')
  want = np.exp(ndimage.map_coordinates(coarse, [rows, cols], order=1))
  np.testing.assert_allclose(field, want, rtol=1e-5)
  np.testing.assert_allclose(field[0, 0], np.exp(coarse[0, 0]), rtol=1e-6)
  np.testing.assert_allclose(field[-1, -1], np.exp(coarse[-1, -1]), rtol=1e-6)
  np.testing.assert_array_equal(intensity.bias_field((h, w), 0.0, np.random.default_rng(3)), np.ones((h, w)))


def test_bias_blur_by_hand(monkeypatch):
  """With no curve and no noise: bias_blur multiplies the [0, 1] intensities by the field drawn after the
  curve's and the noise's draws, then blurs with scipy's Gaussian of the drawn std; with both maxima 0 it
  changes nothing. Without bias_blur the output is what it always was."""
  from scipy import ndimage

  image = np.random.default_rng(0).uniform(-0.8, 0.8, (12, 12, 2)).astype(np.float32)
  plain = intensity.augment_intensity(image, np.random.default_rng(5), prob=0.0, noise_std=0.0)
  np.testing.assert_array_equal(plain, image)
  out = intensity.augment_intensity(image, np.random.default_rng(5), prob=0.0, noise_std=0.0, bias_blur=True)
  rng = np.random.default_rng(5)  # replay the draws: 2 curves, the remap coin, the noise std, the noise
  for _ in range(2):
    intensity.random_curve(rng)
  rng.random(), rng.uniform(0.0, 0.0), rng.standard_normal(image.shape)
  gain = intensity.bias_field((12, 12), rng.uniform(0.0, intensity.BIAS_STD), rng)
  sigma = rng.uniform(0.0, intensity.BLUR_SIGMA)
  unit = np.clip((image + 1) / 2 * gain[..., None], 0, 1)
  want = np.stack([ndimage.gaussian_filter(unit[..., c], sigma, mode='nearest') for c in range(2)], -1) * 2 - 1
  np.testing.assert_allclose(out, want, atol=1e-6)
  assert np.abs(out - image).max() > 0.01
  monkeypatch.setattr(intensity, 'BIAS_STD', 0.0)
  monkeypatch.setattr(intensity, 'BLUR_SIGMA', 0.0)
  same = intensity.augment_intensity(image, np.random.default_rng(5), prob=0.0, noise_std=0.0, bias_blur=True)
  np.testing.assert_allclose(same, image, atol=1e-6)


def test_class_remap_against_hand_values():
  """Without edge smoothing each class lands on its value, its texture scaled by the gain: by hand."""
  label = np.array([[0, 0, 1], [1, 2, 2]])
  unit = np.array([[0.1, 0.3, 0.5], [0.7, 0.8, 0.8]])  # class means 0.2, 0.6, 0.8
  out = intensity.class_remap(unit, label, np.array([0.9, 0.1, 0.5]), gain=2.0, edge_sigma=0.0)
  # class 0: 0.9 + 2 * (+-0.1); class 1: 0.1 + 2 * (-+0.1) -> 0.3 and -0.1 (clipped to 0); class 2: 0.5
  np.testing.assert_allclose(out, [[0.7, 1.0, 0.0], [0.3, 0.5, 0.5]], atol=1e-6)
  assert out.dtype == np.float32


def test_class_remap_smooths_only_the_offsets_at_the_borders():
  """With edge smoothing, a class interior far from any border keeps its exact value; the offset field is
  scipy's Gaussian filter of the per-pixel offsets."""
  from scipy import ndimage

  label = np.zeros((16, 16), np.int64)
  label[:, 8:] = 1
  rng = np.random.default_rng(0)
  unit = np.where(label == 1, 0.7, 0.2) + 0.02 * rng.standard_normal((16, 16))
  values = np.array([0.8, 0.3])
  out = intensity.class_remap(unit, label, values, gain=1.0, edge_sigma=0.5)
  means = np.array([unit[label == 0].mean(), unit[label == 1].mean()])
  offset = ndimage.gaussian_filter((values - means)[label], 0.5, mode='nearest')
  np.testing.assert_allclose(out, np.clip(unit + offset, 0, 1), atol=1e-6)
  np.testing.assert_allclose(out[:, :5], (unit + values[0] - means[0])[:, :5], atol=1e-6)
  np.testing.assert_allclose(out[:, 11:], (unit + values[1] - means[1])[:, 11:], atol=1e-6)


def test_class_values_reach_every_order_of_four_classes():
  """Per-class values give all 24 orders of four classes, including the ones a 4-knot curve rarely gives (the
  outer classes kept, the middle two swapped: source bg < CSF < GM < WM -> bg < GM < CSF < WM)."""
  label = np.repeat(np.arange(4), 16).reshape(8, 8)
  image = (np.array([0.05, 0.2, 0.55, 0.85])[label] * 2 - 1)[..., None].astype(np.float32)
  rng = np.random.default_rng(1)
  orders = []
  for _ in range(400):
    out = intensity.augment_intensity(image, rng, prob=1.0, noise_std=0.0, curves='classes', label=label)
    orders.append(tuple(np.argsort([out[..., 0][label == k].mean() for k in range(4)], kind='stable')))
  assert len(set(orders)) == 24
  assert orders.count((0, 2, 1, 3)) >= 5


def test_classes_family_draws_its_curves_as_any_and_needs_labels():
  for seed in range(20):
    a = intensity.random_curve(np.random.default_rng(seed), curves='any')
    b = intensity.random_curve(np.random.default_rng(seed), curves='classes')
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
  with pytest.raises(ValueError, match="'classes' need the image's label map"):
    intensity.augment_intensity(np.zeros((4, 4, 1), np.float32), np.random.default_rng(0), curves='classes')
  arrays = make_arrays()
  del arrays['label']
  with pytest.raises(ValueError, match="'classes' need a 'label' key"):
    pipeline.train_iterator(arrays, 4, seed=0, process_index=0, process_count=1, intensity=True, curves='classes')


def test_pipeline_classes_family_follows_each_records_label_and_resumes_exactly():
  """Two classes imaged alike in the source: no intensity curve can tell them apart, so a record where their
  interiors differ was remapped by class, and it must be its own label that was followed."""
  n = 24
  label = np.zeros((n, 12, 12), np.int32)
  label[:, 4:, :6], label[:, 4:, 6:] = 1, 2
  arrays = {'image': np.where(label > 0, 0.0, -1.0)[..., None].astype(np.float32), 'label': label,
            'row': np.arange(n)}
  make = lambda: pipeline.train_iterator(arrays, 4, seed=3, process_index=0, process_count=1, intensity=True,
                                         curves='classes')
  batches = list(itertools.islice(make(), 8))
  apart = 0
  for b in batches:
    np.testing.assert_array_equal(b['label'], arrays['label'][b['row']])
    interiors = b['image'][:, 6:, 1:4, 0].mean(axis=(1, 2)), b['image'][:, 6:, 8:11, 0].mean(axis=(1, 2))
    apart += int(np.sum(np.abs(interiors[0] - interiors[1]) > 0.2))
  assert 4 <= apart < 32  # about 0.8 * 0.5 of 32 records, less the pairs drawn close together
  _check_resumes_exactly(make, batches)


def test_per_class_family_remaps_every_image_by_class_on_spaced_values():
  """'per_class': every image takes per-class values (even with prob=0): the spaced values of the replayed draws
  (one curve, the remap coin, the noise std, the noise, the by-class coin, the uniform values, the order, the
  gain), remapped by class_remap."""
  label = np.repeat(np.arange(3), 12).reshape(6, 6)
  image = (np.array([0.1, 0.5, 0.9])[label] * 2 - 1)[..., None].astype(np.float32)
  for seed in range(30):
    out = intensity.augment_intensity(image, np.random.default_rng(seed), prob=0.0, noise_std=0.0,
                                      curves='per_class', label=label)
    rng = np.random.default_rng(seed)
    intensity.random_curve(rng, curves='any')
    rng.random(), rng.uniform(0.0, 0.0), rng.standard_normal(image.shape), rng.random()
    uniform = rng.uniform(0.0, 1.0, (1, 3))
    order = rng.permutation(3)
    values = (order + 0.25 + 0.5 * uniform[0]) / 3
    gain = float(np.exp(rng.uniform(*np.log(intensity.GAIN_RANGE))))
    want = intensity.class_remap((image[..., 0] + 1) / 2, label, values, gain) * 2 - 1
    np.testing.assert_allclose(out[..., 0], want, atol=1e-6)
  with pytest.raises(ValueError, match="'per_class' need the image's label map"):
    intensity.augment_intensity(image, np.random.default_rng(0), curves='per_class')
  arrays = make_arrays()
  del arrays['label']
  with pytest.raises(ValueError, match="'per_class' need a 'label' key"):
    pipeline.train_iterator(arrays, 4, seed=0, process_index=0, process_count=1, intensity=True, curves='per_class')


def test_spaced_class_values_keep_classes_apart_in_every_order():
  """By hand for a fixed order; over many draws every order of three classes appears and no two classes of an
  image are closer than 0.5 / K, while uniform values are often closer."""
  class Fixed:
    def permutation(self, k):
      return np.array([2, 0, 1])[:k]

  np.testing.assert_allclose(intensity.spaced_class_values(np.array([[0.0, 0.5, 1.0]]), Fixed()),
                             [[(2 + 0.25) / 3, (0 + 0.5) / 3, (1 + 0.75) / 3]])
  rng = np.random.default_rng(0)
  orders, gaps, uniform_gaps = set(), [], []
  for _ in range(300):
    u = rng.uniform(0.0, 1.0, (2, 3))
    v = intensity.spaced_class_values(u, rng)
    assert v.shape == (2, 3) and v.min() >= 0.25 / 3 and v.max() <= 1 - 0.25 / 3
    orders.add(tuple(np.argsort(v[0])))
    gaps.append(np.diff(np.sort(v, axis=1), axis=1).min())
    uniform_gaps.append(np.diff(np.sort(u, axis=1), axis=1).min())
  assert len(orders) == 6
  assert min(gaps) >= 0.5 / 3 - 1e-12
  assert np.mean(np.array(uniform_gaps) < 0.5 / 3) > 0.3
