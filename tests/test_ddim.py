"""DDIM steps against numpy and closed forms; the full sampler on a Gaussian whose optimal eps is known."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffuseg_jax.sampling import ddim, sampler, schedules

RNG = np.random.default_rng(0)


def _np_ddim_step(x, eps, a_t, a_prev, eta, noise):
  x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
  sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
  return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * noise


@pytest.mark.parametrize('eta', [0.0, 0.6, 1.0])
def test_step_against_numpy(eta):
  x, eps, noise = (RNG.normal(size=(2, 3, 3, 2)) for _ in range(3))
  a_t, a_prev = 0.3, 0.7
  got = ddim.ddim_step(jnp.asarray(x, jnp.float32), jnp.asarray(eps, jnp.float32), a_t, a_prev, eta,
                       jnp.asarray(noise, jnp.float32))
  np.testing.assert_allclose(got, _np_ddim_step(x, eps, a_t, a_prev, eta, noise), rtol=1e-5, atol=1e-5)


def test_eta1_sigma_is_ddpm_posterior_std():
  """sigma(eta=1) between consecutive timesteps = sqrt(beta_tilde_t) = sqrt((1-a_{t-1})/(1-a_t) beta_t).

  The reference is a float64 schedule; the tolerance covers the float32 rounding of alphas_cumprod near 1
  (relative to beta ~ 1e-4). At t = 1, 2 beta_tilde and beta differ by ~2x, so using beta would fail.
  """
  b = np.linspace(1e-4, 2e-2, 1000)
  a = np.cumprod(1 - b)
  for t in [1, 2, 10, 500, 999]:
    beta_tilde = (1 - a[t - 1]) / (1 - a[t]) * b[t]
    np.testing.assert_allclose(ddim.ddim_sigma(a[t], a[t - 1], 1.0), math.sqrt(beta_tilde), rtol=2e-3)
  want = 0.3 * math.sqrt((1 - a[4]) / (1 - a[5]) * b[5])
  np.testing.assert_allclose(ddim.ddim_sigma(a[5], a[4], 0.3), want, rtol=2e-3)


def test_exact_eps_lands_on_trajectory():
  """With eta = 0 and the true eps of a known x0, one step gives sqrt(a_prev) x0 + sqrt(1 - a_prev) eps."""
  x0, eps = RNG.normal(size=(2, 4, 4, 1)), RNG.normal(size=(2, 4, 4, 1))
  a_t, a_prev = 0.2, 0.9
  x_t = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
  eps_exact = (x_t - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
  np.testing.assert_allclose(ddim.predict_x0(x_t, eps_exact, a_t), x0, atol=1e-6)
  x_t32, eps32 = jnp.asarray(x_t, jnp.float32), jnp.asarray(eps_exact, jnp.float32)
  got = ddim.ddim_step(x_t32, eps32, a_t, a_prev, 0.0, None)
  np.testing.assert_allclose(got, math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps, atol=1e-5)


@pytest.mark.parametrize('eta,num_steps', [(0.0, 200), (1.0, 1000)])
def test_sampler_recovers_gaussian_data(eta, num_steps):
  """Data x0 ~ N(mu, s^2) per pixel: eps*(x_t, t) = sqrt(1-a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a) exactly.

  Unblended sampling (mask = 0) from many x_T must produce mean mu and std s. Swapping a_t / a_prev or
  dropping the eta noise breaks it by far more than the tolerance (checked by mutation).
  """
  mu, s = 1.5, 0.5
  sch = schedules.make_schedule('linear', 1000)
  ac = jnp.asarray(sch.alphas_cumprod)

  def eps_fn(x, t, z_dom, drop):
    a = ac[t][:, None, None, None]
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * s * s + 1 - a)

  b = 512
  zeros = jnp.zeros((b, 8, 8, 1))
  settings = sampler.SamplerSettings(num_steps=num_steps, eta=eta, blend_mode='hard', blend_until=1.0)
  run = jax.jit(lambda rng: sampler.blended_ddim_sample(eps_fn, sch.alphas_cumprod, rng, zeros, zeros,
                                                        jnp.zeros((b, 2)), settings)[0])
  x = np.asarray(run(jax.random.key(1)))
  assert abs(x.mean() - mu) < 0.02, x.mean()
  assert abs(x.std() - s) < 0.015, x.std()


def test_clip_x0_clips_and_rederives_eps():
  """Pixel-space clipping: x0 = clip((x - sqrt(1-a) eps)/sqrt(a)); eps' = (x - sqrt(a) x0)/sqrt(1-a); numpy."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)
  eps = rng.normal(size=x.shape).astype(np.float32)
  a_t, a_prev = 0.01, 0.3
  x0 = np.clip((x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t), -1, 1)
  eps2 = (x - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
  expected = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps2
  got = ddim.ddim_step(jnp.asarray(x), jnp.asarray(eps), a_t, a_prev, 0.0, None, clip_x0=1.0)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(ddim.ddim_step(jnp.asarray(x), jnp.asarray(eps), a_t, 1.0, 0.0, None, 1.0))).max() <= 1.0
