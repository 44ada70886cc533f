"""Noise schedules, the forward process q(x_t | x_0) and the DDIM timestep subsequence.

Indexing: timesteps t = 0..T-1 are the noisy states x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps with
a_t = alphas_cumprod[t] (so t = 0 is already slightly noisy, as in DDPM/diffusers); index -1 stands for the
clean data x_0 with a = 1. Schedules are built host-side in float64 and stored as float32 numpy arrays, so
they can be closed over as constants or passed into jitted functions.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ('linear', 'scaled_linear', 'cosine')
COSINE_S = 0.008  # Nichol & Dhariwal (2021) offset: keeps beta_0 from being vanishingly small
MAX_BETA = 0.999  # cosine betas are clipped here to avoid a singular step at t = T - 1


class Schedule(NamedTuple):
  """betas float32 [T], alphas_cumprod float32 [T] = prod_{s<=t} (1 - betas_s)."""

  betas: np.ndarray
  alphas_cumprod: np.ndarray


def make_schedule(name: str, num_timesteps: int, beta_start: float = 1e-4,
                  beta_end: float = 2e-2) -> Schedule:
  """Betas and alphas_cumprod of a named schedule (ValueError for an unknown name).

  `linear`: betas linspace(b0, b1); `scaled_linear`: linspace(sqrt b0, sqrt b1)**2 (Stable Diffusion);
  `cosine` (Nichol & Dhariwal 2021): a_t = f(t+1)/f(0), f(t) = cos((t/T + s)/(1 + s) pi/2)^2, s = 0.008,
  betas clipped at 0.999 (beta_start / beta_end unused).
  """
  if name not in SCHEDULES:
    raise ValueError(f'schedule={name!r} is not one of {list(SCHEDULES)}')
  if int(num_timesteps) < 1:
    raise ValueError(f'num_timesteps={num_timesteps} must be >= 1')
  n = int(num_timesteps)
  if name == 'cosine':
    steps = np.arange(n + 1, dtype=np.float64) / n
    f = np.cos((steps + COSINE_S) / (1.0 + COSINE_S) * np.pi / 2.0) ** 2
    betas = np.minimum(1.0 - f[1:] / f[:-1], MAX_BETA)
  else:
    if not 0.0 < beta_start <= beta_end < 1.0:
      raise ValueError(f'beta_start={beta_start}, beta_end={beta_end}: '
                        'need 0 < beta_start <= beta_end < 1')
    if name == 'linear':
      betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    else:
      betas = np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), n, dtype=np.float64) ** 2
  alphas_cumprod = np.cumprod(1.0 - betas)
  return Schedule(betas=betas.astype(np.float32), alphas_cumprod=alphas_cumprod.astype(np.float32))


def q_sample(x0: jax.Array, t: jax.Array, noise: jax.Array,
             alphas_cumprod: jax.Array | np.ndarray) -> jax.Array:
  """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise. x0, noise [B, ...]; t int [B]; alphas_cumprod [T]."""
  a = jnp.asarray(alphas_cumprod, jnp.float32)[t].astype(x0.dtype)
  a = a.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def ddim_timesteps(num_timesteps: int, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """DDIM subsequence: (t int32 [S] strictly descending, t_prev int32 [S], t_prev[i] = t[i+1], last = -1).

  "Trailing" spacing: t_i = floor((S - i) T / S) - 1, so the first step starts at t = T - 1, the noisiest
  state, whose marginal is closest to the sampler's x_T ~ N(0, I) (leading spacing, e.g. 980..0 for T=1000,
  S=50, starts from a state that is not pure noise and never denoises the top of the schedule). Steps are
  T/S apart (exactly when S divides T) and the last one jumps from t = T//S - 1 to clean data (t_prev = -1,
  whose alpha_cumprod is 1). S = T gives every timestep.
  """
  n, s = int(num_timesteps), int(num_steps)
  if not 1 <= s <= n:
    raise ValueError(f'num_steps={num_steps} must be in [1, num_timesteps={n}]')
  i = np.arange(s, dtype=np.int64)
  t = ((s - i) * n) // s - 1
  t_prev = np.concatenate([t[1:], [-1]])
  return t.astype(np.int32), t_prev.astype(np.int32)


def alphas_at(alphas_cumprod: jax.Array | np.ndarray, t: jax.Array | np.ndarray) -> jax.Array:
  """alphas_cumprod[t] with t = -1 meaning clean data (alpha 1). t int [...], returns float32 [...]."""
  a = jnp.asarray(alphas_cumprod, jnp.float32)
  t = jnp.asarray(t)
  return jnp.where(t >= 0, a[jnp.maximum(t, 0)], 1.0)
