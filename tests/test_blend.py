"""Blending modes, mask downsampling and pyramids against numpy / scipy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from diffuseg_jax.sampling import blend

RNG = np.random.default_rng(0)


def _square_mask(b=2, h=16, w=16, lo=5, hi=11):
  m = np.zeros((b, h, w, 1), np.float32)
  m[:, lo:hi, lo:hi] = 1.0
  return m


def test_hard_blend_against_numpy():
  x_dom, x_seg = RNG.normal(size=(2, 6, 6, 3)), RNG.normal(size=(2, 6, 6, 3))
  m = RNG.uniform(size=(2, 6, 6, 1))
  got = blend.blend(jnp.asarray(x_dom, jnp.float32), jnp.asarray(x_seg, jnp.float32), jnp.asarray(m), 'hard')
  np.testing.assert_allclose(got, x_dom * (1 - m) + x_seg * m, rtol=1e-5, atol=1e-6)


def test_mask_to_latent_against_numpy():
  m = RNG.uniform(size=(2, 8, 12)) > 0.5
  frac = m.reshape(2, 2, 4, 3, 4).mean(axis=(2, 4))[..., None]
  np.testing.assert_allclose(blend.mask_to_latent(jnp.asarray(m), 4, threshold=None), frac, atol=1e-7)
  np.testing.assert_array_equal(blend.mask_to_latent(jnp.asarray(m), 4), (frac >= 0.5).astype(np.float32))
  got = blend.mask_to_latent(jnp.asarray(m[..., None], jnp.float32), 4)
  assert got.shape == (2, 2, 3, 1) and got.dtype == jnp.float32
  np.testing.assert_array_equal(blend.mask_to_latent(jnp.asarray(m), 1), m[..., None].astype(np.float32))
  with pytest.raises(ValueError, match='not divisible'):
    blend.mask_to_latent(jnp.asarray(m), 5)


@pytest.mark.parametrize('sigma', [1.0, 1.5])
def test_gaussian_blur_against_scipy(sigma):
  x = RNG.normal(size=(2, 13, 11, 2)).astype(np.float32)
  want = ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode='nearest', truncate=3.0)
  np.testing.assert_allclose(blend.gaussian_blur(jnp.asarray(x), sigma), want, atol=1e-5)


@pytest.mark.parametrize('shape,levels,want_levels', [((16, 16), 3, 3), ((16, 16), 9, 5), ((12, 20), 4, 3),
                                                      ((7, 8), 3, 1)])
def test_pyramid_roundtrip_and_level_clipping(shape, levels, want_levels):
  x = jnp.asarray(RNG.normal(size=(2, *shape, 3)), jnp.float32)
  pyr = jax.eval_shape(lambda y: blend.laplacian_pyramid(y, levels), x)
  assert len(pyr) == want_levels
  for i, p in enumerate(pyr):
    assert p.shape == (2, shape[0] // 2**i, shape[1] // 2**i, 3)
  roundtrip = jax.jit(lambda y: blend.collapse_pyramid(blend.laplacian_pyramid(y, levels)))
  np.testing.assert_allclose(roundtrip(x), x, atol=1e-5)


def test_gaussian_pyramid_reduce_against_numpy():
  """REDUCE = 5-tap binomial filter with edge replication, then every second sample."""
  x = RNG.normal(size=(1, 8, 8, 1)).astype(np.float32)
  k = np.array([1, 4, 6, 4, 1]) / 16
  want = ndimage.correlate1d(ndimage.correlate1d(x, k, axis=1, mode='nearest'), k, axis=2, mode='nearest')
  np.testing.assert_allclose(blend.gaussian_pyramid(jnp.asarray(x), 2)[1], want[:, ::2, ::2], atol=1e-6)


def test_pyramid_blend_extremes():
  x_dom = jnp.asarray(RNG.normal(size=(2, 16, 16, 3)), jnp.float32)
  x_seg = jnp.asarray(RNG.normal(size=(2, 16, 16, 3)), jnp.float32)
  ones, zeros = jnp.ones((2, 16, 16, 1)), jnp.zeros((2, 16, 16, 1))
  pyramid = jax.jit(lambda a, b, mm, levels: blend.blend(a, b, mm, 'pyramid', pyramid_levels=levels),
                    static_argnums=3)
  np.testing.assert_allclose(pyramid(x_dom, x_seg, ones, 3), x_seg, atol=1e-5)
  np.testing.assert_allclose(pyramid(x_dom, x_seg, zeros, 3), x_dom, atol=1e-5)
  # A real mask: close to the hard blend far from the edge, but not equal to it overall.
  m = jnp.asarray(_square_mask(h=16, w=16, lo=2, hi=14))
  got = np.asarray(pyramid(x_dom, x_seg, m, 2))
  hard = np.asarray(blend.blend(x_dom, x_seg, m, 'hard'))
  assert np.abs(got - hard).max() > 1e-2
  np.testing.assert_allclose(got[:, 7:9, 7:9], hard[:, 7:9, 7:9], atol=1e-5)


def test_soft_equals_hard_away_from_edge():
  sigma = 1.0  # kernel radius 3
  x_dom = jnp.asarray(RNG.normal(size=(2, 16, 16, 2)), jnp.float32)
  x_seg = jnp.asarray(RNG.normal(size=(2, 16, 16, 2)), jnp.float32)
  m = _square_mask()
  soft = np.asarray(blend.blend(x_dom, x_seg, jnp.asarray(m), 'soft', soft_sigma=sigma))
  hard = np.asarray(blend.blend(x_dom, x_seg, jnp.asarray(m), 'hard'))
  # Inside the region: exactly x_seg. Farther than the radius from it: exactly x_dom.
  inside = m[..., 0] == 1
  np.testing.assert_array_equal(soft[inside], np.asarray(x_seg)[inside])
  dist = ndimage.distance_transform_cdt(1 - m[0, ..., 0], metric='chessboard')
  far = np.broadcast_to(dist > 3, m.shape[:3])
  np.testing.assert_array_equal(soft[far], hard[far])
  # Just outside the edge the two are mixed.
  band = np.broadcast_to(dist == 1, m.shape[:3])
  assert np.all(np.abs(soft[band] - hard[band]) > 0)


def test_unknown_mode():
  x = jnp.zeros((1, 4, 4, 1))
  with pytest.raises(ValueError, match='blend_mode'):
    blend.blend(x, x, x, 'poisson')


