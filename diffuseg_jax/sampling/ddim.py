"""One DDIM reverse step (Song et al. 2021, eq. 12) as pure functions of the noise prediction.

a_t / a_prev are alphas_cumprod at the current and the next (less noisy) timestep: scalars or arrays that
broadcast against x_t (a_prev = 1 for the final step to clean data). `clip_x0` (pixel space, where images
lie in [-clip, clip]) clips the implied x_0 and re-derives eps from it, as pixel-space DDPM/DDIM samplers do:
at the noisiest timesteps x_0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) amplifies small eps errors ~100-fold.
In a latent space x_0 has no fixed range and nothing is clipped (clip_x0 = None).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def predict_x0(x_t: jax.Array, eps: jax.Array, a_t: jax.Array | float) -> jax.Array:
  """x_0 implied by the noise prediction: (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)."""
  return (x_t - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t)


def ddim_sigma(a_t: jax.Array | float, a_prev: jax.Array | float, eta: float) -> jax.Array:
  """sigma_t = eta sqrt((1 - a_prev)/(1 - a_t)) sqrt(1 - a_t/a_prev); eta = 1 is DDPM's posterior std.

  1 - a_t/a_prev is evaluated as (a_prev - a_t)/a_prev: for neighbouring timesteps the ratio is within float32
  rounding of 1, while the difference of the two stored alphas is exact.
  """
  return eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a_t) * ((a_prev - a_t) / a_prev))


def implied_x0_eps(x_t: jax.Array, eps: jax.Array, a_t: jax.Array | float,
                   clip_x0: float | None = None) -> tuple[jax.Array, jax.Array]:
  """(x_0, eps) that a DDIM step uses: x_0 from `predict_x0`, clipped to [-clip_x0, clip_x0] with eps
  re-derived from it when clip_x0 is set."""
  x0 = predict_x0(x_t, eps, a_t)
  if clip_x0 is not None:
    x0 = jnp.clip(x0, -clip_x0, clip_x0)
    eps = (x_t - jnp.sqrt(a_t) * x0) / jnp.sqrt(1.0 - a_t)
  return x0, eps


def ddim_step(x_t: jax.Array, eps: jax.Array, a_t: jax.Array | float, a_prev: jax.Array | float, eta: float,
              noise: jax.Array | None, clip_x0: float | None = None) -> jax.Array:
  """x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma noise.

  `noise` ~ N(0, I) shaped like x_t is added whenever eta > 0 (stochastic DDIM, eta = 1: DDPM ancestral);
  it may be None when eta == 0.
  """
  x0, eps = implied_x0_eps(x_t, eps, a_t, clip_x0)
  if eta == 0.0:
    return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps
  if noise is None:
    raise ValueError('ddim_step needs `noise` when eta > 0')
  sigma = ddim_sigma(a_t, a_prev, eta)
  direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - jnp.square(sigma), 0.0)) * eps
  return jnp.sqrt(a_prev) * x0 + direction + sigma * noise
