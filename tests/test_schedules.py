"""Noise schedules, q_sample and DDIM timesteps against hand-written numpy formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffuseg_jax.sampling import schedules


def _cumprod_loop(betas):
  out, acc = [], 1.0
  for b in betas:
    acc *= 1.0 - b
    out.append(acc)
  return np.array(out)


def test_linear_and_scaled_linear():
  T, b0, b1 = 50, 1e-4, 2e-2
  lin = schedules.make_schedule('linear', T, b0, b1)
  want = np.array([b0 + i * (b1 - b0) / (T - 1) for i in range(T)])
  np.testing.assert_allclose(lin.betas, want, rtol=1e-6)
  np.testing.assert_allclose(lin.alphas_cumprod, _cumprod_loop(want), rtol=1e-5)
  sl = schedules.make_schedule('scaled_linear', T, b0, b1)
  want = np.array([(math.sqrt(b0) + i * (math.sqrt(b1) - math.sqrt(b0)) / (T - 1)) ** 2 for i in range(T)])
  np.testing.assert_allclose(sl.betas, want, rtol=1e-6)
  np.testing.assert_allclose(sl.alphas_cumprod, _cumprod_loop(want), rtol=1e-5)
  assert lin.betas.dtype == np.float32 and sl.alphas_cumprod.dtype == np.float32


def test_cosine():
  T, s = 100, 0.008
  f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
  want = np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)])
  sch = schedules.make_schedule('cosine', T)
  np.testing.assert_allclose(sch.betas, want, rtol=1e-5)
  assert sch.betas[-1] == np.float32(0.999)  # clipped: f(T) = 0 would give beta = 1
  # Unclipped steps: alpha_bar_t = f(t + 1) / f(0).
  np.testing.assert_allclose(sch.alphas_cumprod[:-1], [f(i + 1) / f(0) for i in range(T - 1)], rtol=1e-4,
                             atol=1e-7)


@pytest.mark.parametrize('name', ['linear', 'scaled_linear', 'cosine'])
def test_alphas_cumprod_monotone(name):
  a = schedules.make_schedule(name, 1000, 1e-4, 2e-2).alphas_cumprod
  assert np.all(np.diff(a) < 0) and 0 < a[-1] and a[0] < 1


def test_bad_schedule_config():
  with pytest.raises(ValueError, match='schedule='):
    schedules.make_schedule('quadratic', 10)
  with pytest.raises(ValueError, match='beta_start'):
    schedules.make_schedule('linear', 10, 0.5, 0.1)


def test_q_sample_against_numpy():
  a = schedules.make_schedule('linear', 100).alphas_cumprod
  rng = np.random.default_rng(0)
  x0, noise = rng.normal(size=(3, 4, 4, 2)), rng.normal(size=(3, 4, 4, 2))
  t = np.array([0, 50, 99])
  want = np.stack([math.sqrt(a[t[i]]) * x0[i] + math.sqrt(1 - a[t[i]]) * noise[i] for i in range(3)])
  got = schedules.q_sample(jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32), a)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_q_sample_moments():
  a = schedules.make_schedule('cosine', 1000).alphas_cumprod
  n, t = 20000, 400
  x0 = jnp.full((n, 1), 0.8)
  noise = jax.random.normal(jax.random.key(0), (n, 1))
  xt = np.asarray(schedules.q_sample(x0, jnp.full((n,), t), noise, a))
  np.testing.assert_allclose(xt.mean(), math.sqrt(a[t]) * 0.8, atol=4 / math.sqrt(n))
  np.testing.assert_allclose(xt.var(), 1 - a[t], rtol=0.05)


def test_ddim_timesteps():
  t, t_prev = schedules.ddim_timesteps(1000, 50)
  np.testing.assert_array_equal(t, np.arange(999, 0, -20))  # trailing: 999, 979, ..., 19
  np.testing.assert_array_equal(t_prev, np.append(t[1:], -1))
  assert t.dtype == np.int32 and t_prev.dtype == np.int32
  t, t_prev = schedules.ddim_timesteps(10, 10)
  np.testing.assert_array_equal(t, np.arange(9, -1, -1))
  np.testing.assert_array_equal(t_prev, np.arange(8, -2, -1))
  for n, s in [(1000, 7), (97, 13), (5, 1), (64, 64)]:
    t, t_prev = schedules.ddim_timesteps(n, s)
    assert len(t) == s and t[0] == n - 1 and t_prev[-1] == -1
    assert np.all(np.diff(t) < 0) and t.min() >= 0
  with pytest.raises(ValueError, match='num_steps'):
    schedules.ddim_timesteps(10, 11)
  with pytest.raises(ValueError, match='num_steps'):
    schedules.ddim_timesteps(10, 0)


def test_alphas_at_clean_is_one():
  a = schedules.make_schedule('linear', 10).alphas_cumprod
  np.testing.assert_array_equal(schedules.alphas_at(a, np.array([3, -1, 0])), [a[3], 1.0, a[0]])
