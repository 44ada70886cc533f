"""What the denoiser predicts: the noise (eps) or the velocity v (Salimans & Ho 2022), as diffusers names them.

With x_t = sqrt(a) x_0 + sqrt(1 - a) eps (a = alphas_cumprod[t]):
  epsilon       the network is trained to output eps;
  v_prediction  the network is trained to output v = sqrt(a) eps - sqrt(1 - a) x_0 (Stable Diffusion 2.x).
The sampler and the blend work on eps, so a v output is turned into the eps it implies:
  eps = sqrt(a) v + sqrt(1 - a) x_t,   x_0 = sqrt(a) x_t - sqrt(1 - a) v.
Both are linear in the output, so classifier-free guidance on v equals guidance on the implied eps.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ('epsilon', 'v_prediction')


def check(prediction_type: str) -> str:
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f'prediction_type={prediction_type!r} is not one of {list(PREDICTION_TYPES)}')
  return prediction_type


def _bcast(a: jax.Array, like: jax.Array) -> jax.Array:
  """alphas [B] (or a scalar) -> broadcastable against like [B, ...], in like's dtype."""
  a = jnp.asarray(a, jnp.float32)
  if a.ndim == 1:
    a = a.reshape((-1,) + (1,) * (like.ndim - 1))
  return a.astype(like.dtype)


def training_target(x0: jax.Array, noise: jax.Array, a: jax.Array, prediction_type: str) -> jax.Array:
  """What the network should output for x_t = q_sample(x0, t, noise): noise, or v. a [B] or scalar."""
  if check(prediction_type) == 'epsilon':
    return noise
  a = _bcast(a, x0)
  return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0


def to_eps(output: jax.Array, x_t: jax.Array, a: jax.Array, prediction_type: str) -> jax.Array:
  """The eps implied by the network's output at x_t; a [B] or scalar."""
  if check(prediction_type) == 'epsilon':
    return output
  a = _bcast(a, x_t)
  return jnp.sqrt(a) * output + jnp.sqrt(1.0 - a) * x_t


def eps_fn(apply: Callable[..., jax.Array], alphas_cumprod: jax.Array | np.ndarray,
           prediction_type: str) -> Callable[..., jax.Array]:
  """apply(x_t, t, z_dom, drop) -> output, as the sampler's eps_fn(x_t, t [B] int, z_dom, drop) -> eps."""
  if check(prediction_type) == 'epsilon':
    return apply
  alphas = jnp.asarray(alphas_cumprod, jnp.float32)

  def eps(x_t, t, z_dom, drop):
    return to_eps(apply(x_t, t, z_dom, drop), x_t, alphas[t], prediction_type)

  return eps
