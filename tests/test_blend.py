"""Blending modes, mask downsampling and pyramids against numpy / scipy references."""

import einops
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




# --- latent masks: thin structures -------------------------------------------------------------------------


def _thin_lines(size=64, width=1):
  """A [1, size, size] label with a vertical, a horizontal and a diagonal line `width` pixels wide, placed at
  odd offsets so that no line is aligned with a latent pixel's edge."""
  m = np.zeros((1, size, size), bool)
  m[0, :, 13:13 + width] = True
  m[0, 37:37 + width, :] = True
  for i in range(size - width):
    m[0, i, i:i + width] = True
  return m


@pytest.mark.parametrize('factor', [2, 4, 8])
@pytest.mark.parametrize('width', [1, 2, 3])
def test_coverage_latent_mask_holds_every_labelled_pixel(factor, width):
  label = _thin_lines(width=width)
  frac = label.reshape(1, 64 // factor, factor, 64 // factor, factor).mean(axis=(2, 4))
  latent = {}
  for rule, want in (('coverage', frac > 0), ('majority', frac >= 0.5)):
    got = blend.mask_to_latent(jnp.asarray(label), factor, blend.latent_mask_threshold(rule, factor))
    latent[rule] = np.asarray(got)[0, ..., 0]
    np.testing.assert_array_equal(latent[rule], want[0].astype(np.float32))
  preserved = np.repeat(np.repeat(latent['coverage'], factor, 0), factor, 1) == 1  # at image resolution
  assert preserved[label[0]].all()  # every labelled pixel lies in the region the sampler preserves
  if width == 1 and factor >= 4:  # what majority voting does: a 1-pixel line is lost entirely
    assert latent['majority'].sum() == 0
  with pytest.raises(ValueError, match='latent_mask'):
    blend.latent_mask_threshold('any', factor)


class _BlockCodec:
  """A latent space of factor f: encode = f x f block means, decode = nearest upsampling (like a KL codec's
  factor, with a known inverse on block-constant images)."""

  downsample = 4

  def encode(self, x):
    return einops.reduce(x, 'b (h fh) (w fw) c -> b h w c', 'mean', fh=4, fw=4)

  def decode(self, z):
    return einops.repeat(z, 'b h w c -> b (h fh) (w fw) c', fh=4, fw=4)


class _ZeroUnet:
  def apply(self, variables, x, t, z, drop):
    del variables, t, z, drop
    return jnp.zeros_like(x)


def test_synthesis_preserves_every_pixel_of_a_one_pixel_vessel():
  """Through the synthesis kernel with a factor-4 latent space: hard blending to the last step gives x_0 = r(m)
  on the latent mask, and that mask, at image resolution, holds every pixel of 1-pixel lines."""
  from diffuseg_jax.sampling import schedules, synthesis
  from diffuseg_jax.sampling.sampler import SamplerSettings

  label = _thin_lines(width=1)
  region = np.where(label[..., None], 0.8, -0.6).astype(np.float32)
  settings = SamplerSettings(num_steps=3, num_timesteps=50)
  alphas = jnp.asarray(schedules.make_schedule('linear', 50).alphas_cumprod)
  images, err = synthesis.synthesize(_ZeroUnet(), settings, alphas, None, _BlockCodec(), jax.random.key(0),
                                     jnp.asarray(region), jnp.asarray(label, jnp.float32), jnp.zeros((1, 2)))
  assert float(err[0]) == 0.0
  preserved = np.asarray(_BlockCodec().decode(_BlockCodec().encode(jnp.asarray(region))))
  np.testing.assert_array_equal(np.asarray(images)[label], np.clip(preserved, -1, 1)[label])
  assert (np.asarray(images)[label] > -0.6).all()  # each line pixel carries its block's share of the line


# --- variance-preserving soft blending ---------------------------------------------------------------------


def _band(mask, sigma):
  m = np.maximum(mask, ndimage.gaussian_filter(mask, sigma=(0, sigma, sigma, 0), mode='nearest', truncate=3.0))
  return m, (m > 0.2) & (m < 0.8)


def test_variance_preserving_blend_keeps_the_expected_noise_variance():
  """Two latents at noise level a with independent unit noises and known clean parts: in the feather band the
  blended noise variance is 1 - a (soft_vp), where plain soft blending gives ((1 - m)^2 + m^2)(1 - a)."""
  a, n, sigma = 0.36, 4096, 1.5
  mask = np.broadcast_to(_square_mask(1, 16, 16, 5, 11), (n, 16, 16, 1)).astype(np.float32)
  m, band = _band(mask[:1], sigma)
  key_dom, key_seg = jax.random.split(jax.random.key(1))
  x0_dom, x0_seg = jnp.full((n, 16, 16, 1), -0.5), jnp.full((n, 16, 16, 1), 0.7)
  x_dom = np.sqrt(a) * x0_dom + np.sqrt(1 - a) * jax.random.normal(key_dom, x0_dom.shape)
  x_seg = np.sqrt(a) * x0_seg + np.sqrt(1 - a) * jax.random.normal(key_seg, x0_seg.shape)
  vp = np.asarray(blend.variance_preserving_blend(x_dom, x0_dom, x_seg, x0_seg, jnp.asarray(mask), a, sigma))
  soft = np.asarray(blend.blend(x_dom, x_seg, jnp.asarray(mask), 'soft', sigma))
  var_vp, var_soft = vp.var(axis=0)[band[0]], soft.var(axis=0)[band[0]]
  np.testing.assert_allclose(var_vp, 1 - a, rtol=0.1)  # 4096 samples: the variance's std is ~2 %
  assert abs(var_vp.mean() / (1 - a) - 1) < 0.02
  want_soft = ((1 - m) ** 2 + m**2)[0][band[0]] * (1 - a)
  np.testing.assert_allclose(var_soft, want_soft, rtol=0.1)
  assert var_soft.min() < 0.6 * (1 - a)
  # The mean is the soft blend of the clean parts, and outside the band the two modes agree.
  np.testing.assert_allclose(vp.mean(axis=0), np.sqrt(a) * ((1 - m) * -0.5 + m * 0.7)[0], atol=0.05)
  outside = (m[0] == 0) | (m[0] == 1)
  np.testing.assert_allclose(vp[:8][:, outside], soft[:8][:, outside], atol=1e-5)
  # Clean latents (a = 1): the soft blend of the clean parts; x_seg's region exactly.
  clean = blend.variance_preserving_blend(x0_dom[:2], x0_dom[:2], x0_seg[:2], x0_seg[:2], jnp.asarray(mask[:2]),
                                          1.0, sigma)
  np.testing.assert_allclose(clean, blend.blend(x0_dom[:2], x0_seg[:2], jnp.asarray(mask[:2]), 'soft', sigma),
                             atol=1e-6)
  assert (np.asarray(clean)[:, mask[0, ..., 0] == 1] == np.float32(0.7)).all()
  with pytest.raises(ValueError, match='variance_preserving_blend'):
    blend.blend(x_dom, x_seg, jnp.asarray(mask), 'soft_vp')


def test_sampler_step_with_soft_vp_gives_the_variance_the_next_step_expects():
  """One blended DDIM step on data x_0 = 0 with the exact noise prediction: x_dom = sqrt(1 - a_prev) eps, and
  the blended latent's variance in the feather band is 1 - a_prev (soft: lower)."""
  from diffuseg_jax.sampling import sampler, schedules

  alphas = np.asarray(schedules.make_schedule('linear', 100).alphas_cumprod)
  t, t_prev, n = 60, 40, 4096
  a_t, a_prev = alphas[t], alphas[t_prev]

  def exact_eps(x, t_b, z, drop):  # x = sqrt(1 - a_t) eps for clean data 0
    del z, drop
    return x / jnp.sqrt(1.0 - jnp.asarray(alphas)[t_b][:, None, None, None])

  mask = jnp.asarray(np.broadcast_to(_square_mask(1, 16, 16, 5, 11), (n, 16, 16, 1)))
  x = np.sqrt(1 - a_t) * jax.random.normal(jax.random.key(2), (n, 16, 16, 1))
  region = jnp.zeros((n, 16, 16, 1))
  variances = {}
  for mode in ('soft', 'soft_vp'):
    settings = sampler.SamplerSettings(num_steps=2, num_timesteps=100, blend_mode=mode, soft_sigma=1.5)
    step = jax.jit(sampler.make_step_fn(exact_eps, settings))
    out = step(x, jax.random.key(3), region, mask, jnp.zeros((n, 2)), jnp.int32(t), jnp.float32(a_t),
               jnp.float32(a_prev), jnp.asarray(True))
    variances[mode] = np.asarray(out).var(axis=0)
  _, band = _band(np.asarray(mask[:1]), 1.5)
  np.testing.assert_allclose(variances['soft_vp'][band[0]], 1 - a_prev, rtol=0.1)
  assert variances['soft'][band[0]].min() < 0.6 * (1 - a_prev)
  inside = np.asarray(mask[0]) == 1
  np.testing.assert_allclose(variances['soft_vp'][inside], 1 - a_prev, rtol=0.1)
