"""Fréchet distance, KID, background similarity, feature extractors and the FID InceptionV3."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from diffuseg_jax.errors import UserError
from diffuseg_jax.metrics import features, inception
from diffuseg_jax.metrics import image_quality as iq


def _sqrtm_frechet(mu1, s1, mu2, s2):
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)


def test_frechet_matches_sqrtm_formula():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6))
  b = rng.standard_normal((150, 6)) * 1.5 + 0.3
  mu1, s1 = iq.gaussian_stats(a)
  mu2, s2 = iq.gaussian_stats(b)
  np.testing.assert_allclose(mu1, a.mean(0))
  np.testing.assert_allclose(s1, np.cov(a.T))
  assert iq.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_sqrtm_frechet(mu1, s1, mu2, s2), rel=1e-8)
  assert iq.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_diagonal_closed_form_and_rank_deficient():
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.0])
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  assert iq.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)
  # Fewer samples than features: singular covariances still give a finite, non-negative distance.
  rng = np.random.default_rng(1)
  fd = iq.frechet_distance(*iq.gaussian_stats(rng.standard_normal((5, 40))),
                           *iq.gaussian_stats(rng.standard_normal((5, 40))))
  assert np.isfinite(fd) and fd >= 0


def _naive_mmd2(x, y):
  k = lambda a, b: (np.dot(a, b) / len(a) + 1.0) ** 3
  m = len(x)
  kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
  return kxx + kyy - 2 * kxy


def test_kid_matches_naive_double_loop():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((7, 4))
  y = rng.standard_normal((7, 4)) + 0.5
  # subset_size >= N: each subset is a permutation of the whole set, so MMD^2 is exact and std is 0.
  mean, std = iq.kernel_inception_distance(x, y, num_subsets=3, subset_size=100, seed=0)
  assert mean == pytest.approx(_naive_mmd2(x, y), rel=1e-10)
  assert std == pytest.approx(0.0, abs=1e-12)
  mean, std = iq.kernel_inception_distance(rng.standard_normal((40, 4)), rng.standard_normal((30, 4)),
                                           num_subsets=5, subset_size=10, seed=0)
  assert std > 0 and abs(mean) < 1.0


def test_background_similarity_hand_computed():
  synthetic = np.zeros((2, 2, 2, 1))
  reference = np.zeros((2, 2, 2, 1))
  synthetic[0, :, :, 0] = [[1.0, -1.0], [0.0, 0.5]]   # [-1, 1] scale
  reference[0, :, :, 0] = [[-1.0, -1.0], [0.5, 0.5]]
  synth_masks = np.array([[[0, 0], [0, 1]], [[1, 1], [1, 1]]])
  ref_masks = np.array([[[0, 0], [2, 0]], [[0, 0], [0, 0]]])
  # Pair 0, background = pixels (0,0), (0,1): |diff| on [0,1] scale = 1.0, 0.0 -> 100 * 0.5 = 50.
  per_pair = iq.background_similarity_per_pair(synthetic, reference, synth_masks, ref_masks)
  np.testing.assert_allclose(per_pair[0], 50.0)
  assert np.isnan(per_pair[1])  # all foreground: skipped
  assert iq.background_similarity(synthetic, reference, synth_masks, ref_masks) == pytest.approx(50.0)
  # Without reference masks pixel (1,0) joins: |0 - 0.5| / 2 = 0.25 -> 100 * 1.25 / 3.
  assert iq.background_similarity(synthetic[:1], reference[:1], synth_masks[:1]) == pytest.approx(125 / 3)


def test_random_conv_extractor_batching_channels_and_determinism():
  ex = features.load_feature_extractor(None)
  assert 'not Inception' in ex.name and ex.feature_dim == 512
  rng = np.random.default_rng(3)
  imgs = rng.uniform(-1, 1, (5, 20, 20, 1)).astype(np.float32)
  f_a = features.extract_features(ex, imgs, batch_size=2)
  f_b = features.extract_features(features.random_conv_extractor(), imgs, batch_size=8)
  assert f_a.shape == (5, 512) and f_a.dtype == np.float32
  np.testing.assert_allclose(f_a, f_b, rtol=1e-5, atol=1e-6)
  # Grey images equal their 3-channel replicas.
  f_rgb = features.extract_features(ex, np.repeat(imgs, 3, axis=-1), batch_size=8)
  np.testing.assert_allclose(f_a, f_rgb, rtol=1e-5, atol=1e-6)
  # He-normal kernels from the numpy generator: first-layer std ~ sqrt(2 / (3*3*3)).
  k = features.random_conv_params(features.RandomConvNet(), 0)['params']['conv0']['kernel']
  assert float(jnp.std(k)) == pytest.approx(np.sqrt(2 / 27), rel=0.1)


def _torch_layout_state_dict(seed=0):
  """Random weights in the PyTorch FID state-dict layout, derived from the flax variable shapes."""
  rng = np.random.default_rng(seed)
  sd = {'fc.weight': np.zeros((1008, 2048), np.float32), 'fc.bias': np.zeros(1008, np.float32)}
  for key, shape in inception.expected_shapes().items():
    collection, *path, layer, name = key.split('/')
    prefix = '.'.join(path)
    if name == 'kernel':
      kh, kw, cin, cout = shape
      sd[f'{prefix}.conv.weight'] = (rng.standard_normal((cout, cin, kh, kw)) * np.sqrt(2 / (kh * kw * cin)))
    else:
      torch_name = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}[name]
      value = rng.uniform(0.5, 1.5, shape) if name in ('scale', 'var') else rng.uniform(-0.1, 0.1, shape)
      sd[f'{prefix}.bn.{torch_name}'] = value.astype(np.float32)
      sd[f'{prefix}.bn.num_batches_tracked'] = np.array(0)
  return sd


def test_inception_architecture_and_npz_roundtrip(tmp_path):
  shapes = inception.expected_shapes()
  total = sum(int(np.prod(s)) for s in shapes.values())
  bn_channels = sum(int(np.prod(s)) for k, s in shapes.items() if k.endswith('/bn/mean'))
  # The published InceptionV3 (no top, BatchNorm without gamma) has 21,802,784 parameters; ours adds gamma.
  assert total - bn_channels == 21_802_784

  sd = _torch_layout_state_dict()
  converted = inception.convert_torch_state_dict(sd)
  assert set(converted) == set(shapes)
  path = tmp_path / 'inception.npz'
  np.savez(path, **converted)
  variables = inception.load_variables(str(path))

  # Converter layout vs a direct numpy conv in the torch layout (first block: 3x3 stride 2, BN, ReLU).
  rng = np.random.default_rng(4)
  x = rng.uniform(-1, 1, (1, 9, 9, 3)).astype(np.float32)
  block = {c: variables[c]['Conv2d_1a_3x3'] for c in ('params', 'batch_stats')}
  got = inception.BasicConv(32, (3, 3), (2, 2)).apply(block, jnp.asarray(x))
  w = sd['Conv2d_1a_3x3.conv.weight']
  patches = np.stack([x[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3] for i in range(4) for j in range(4)])
  conv = np.einsum('phwc,ochw->po', patches, w).reshape(4, 4, 32)
  bn = lambda n: sd[f'Conv2d_1a_3x3.bn.{n}']
  normed = (conv - bn('running_mean')) / np.sqrt(bn('running_var') + 1e-3)
  ref = np.maximum(normed * bn('weight') + bn('bias'), 0)
  np.testing.assert_allclose(np.asarray(got[0]), ref, rtol=1e-4, atol=1e-4)

  fn = inception.make_inception_fn(str(path), resize_to=None)
  out = np.asarray(fn(jnp.asarray(rng.uniform(-1, 1, (2, 75, 75, 3)), jnp.float32)))
  assert out.shape == (2, 2048) and np.isfinite(out).all() and (out >= 0).all()

  ex = features.load_feature_extractor(str(path))  # full path: any size/channels resized to 299, RGB
  assert ex.name.startswith('InceptionV3') and ex.feature_dim == 2048
  f = features.extract_features(ex, rng.uniform(-1, 1, (1, 16, 16, 1)).astype(np.float32), batch_size=4)
  assert f.shape == (1, 2048)


def test_inception_bad_files_raise_user_error(tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    features.load_feature_extractor(str(tmp_path / 'missing.npz'))
  bad = tmp_path / 'weights.pth'
  bad.write_bytes(b'not an npz')
  with pytest.raises(UserError, match='weights.pth'):
    features.load_feature_extractor(str(bad))
  partial = tmp_path / 'partial.npz'
  np.savez(partial, x=np.zeros(3))
  with pytest.raises(UserError, match='lacks'):
    inception.load_variables(str(partial))


def test_fid_avg_pool_excludes_padding():
  # FID's Inception blocks average only the valid neighbours at the border (count_include_pad=False).
  x = jnp.arange(9.0).reshape(1, 3, 3, 1)
  got = np.asarray(inception._avg3(x))[0, :, :, 0]
  ref = np.array([[np.mean([0, 1, 3, 4]), np.mean([0, 1, 2, 3, 4, 5]), np.mean([1, 2, 4, 5])],
                  [np.mean([0, 1, 3, 4, 6, 7]), 4.0, np.mean([1, 2, 4, 5, 7, 8])],
                  [np.mean([3, 4, 6, 7]), np.mean([3, 4, 5, 6, 7, 8]), np.mean([4, 5, 7, 8])]])
  np.testing.assert_allclose(got, ref)


def test_label_agreement_by_hand():
  given = np.zeros((2, 4, 4), int)
  given[0, :2, :2] = 1  # 4 px of class 1
  given[1, 0, :] = 2  # 4 px of class 2
  pred = np.zeros_like(given)
  pred[0, :2, :1] = 1  # 2 px of class 1, inside the given 4
  pred[1, 0, :2] = 2
  pred[1, 3, :2] = 2  # 4 px of class 2, 2 of them right
  # class 1: 2 * 2 / (2 + 4) = 2/3; class 2: 2 * 2 / (4 + 4) = 1/2; class 3 absent from both: skipped
  assert iq.label_agreement(pred, given, 4) == pytest.approx((2 / 3 + 1 / 2) / 2)
  assert iq.label_agreement(np.zeros_like(given), np.zeros_like(given), 3) is None
