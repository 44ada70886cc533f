"""Blended DDIM sampler: scan == loop, determinism, exact mask preservation, guidance, sharding.

Compiling a sampler takes a second or two on CPU, so the tests share a few settings through a cache of jitted
samplers, and count eps_fn calls by tracing (no compilation).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffuseg_jax.sampling import sampler, schedules

T = 100
ALPHAS = schedules.make_schedule('linear', T, 1e-3, 5e-2).alphas_cumprod
B, H, W, C, D = 8, 8, 8, 2, 3

BASE = sampler.SamplerSettings(num_steps=10, num_timesteps=T)  # eta 0, hard, blend_until 1
STOCH = dataclasses.replace(BASE, eta=0.5, save_trajectory=True)
GUIDED = dataclasses.replace(STOCH, guidance_scale=2.0)
MIXED = dataclasses.replace(BASE, eta=0.7, guidance_scale=2.0, blend_mode='pyramid', pyramid_levels=2,
                            blend_until=0.5, save_trajectory=True)


def eps_fn(x, t, z_dom, drop_cond):
  """A smooth stand-in for the network that depends on every input (x, t, z_dom, drop_cond)."""
  cond = jnp.where(drop_cond, 0.0, jnp.tanh(z_dom).sum(-1))[:, None, None, None]
  return 0.5 * jnp.sin(x) + 0.3 * cond + 0.01 * t[:, None, None, None].astype(x.dtype)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  region = jnp.asarray(rng.normal(size=(B, H, W, C)), jnp.float32)
  mask = np.zeros((B, H, W, 1), np.float32)
  mask[:, 2:6, 3:7] = 1.0
  z_dom = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  return region, jnp.asarray(mask), z_dom


@functools.cache
def _runner(fn, settings):
  return jax.jit(functools.partial(sampler.blended_ddim_sample, fn, ALPHAS, settings=settings))


def _sample(settings, rng=0, fn=eps_fn, inputs=None):
  return _runner(fn, settings)(jax.random.key(rng), *(inputs if inputs is not None else _inputs()))


def _eps_call_shapes(settings):
  """Batch shapes eps_fn is called with, recorded while tracing (nothing is compiled)."""
  shapes = []

  def counting(x, t, z, drop):
    shapes.append((x.shape, t.shape, z.shape, drop.shape))
    return eps_fn(x, t, z, drop)

  jax.make_jaxpr(functools.partial(sampler.blended_ddim_sample, counting, ALPHAS, settings=settings))(
      jax.random.key(0), *_inputs())
  return shapes


@pytest.mark.parametrize('settings', [BASE, MIXED], ids=['hard', 'mixed'])
def test_scan_equals_loop(settings):
  x_scan, traj_scan = _sample(settings, rng=3)
  x_loop, traj_loop = sampler.loop_ddim_sample(eps_fn, ALPHAS, jax.random.key(3), *_inputs(), settings)
  np.testing.assert_allclose(x_scan, x_loop, atol=1e-5)
  if settings.save_trajectory:
    np.testing.assert_allclose(traj_scan, traj_loop, atol=1e-5)


def test_loop_sampler_compiles_its_step_once_for_any_params():
  """LoopSampler takes the denoiser's params as an argument: new params reuse the compiled step."""
  def apply_eps(scale, x, t, z_dom, drop_cond):
    return scale * eps_fn(x, t, z_dom, drop_cond)

  loop = sampler.LoopSampler(apply_eps, BASE)
  for scale in (1.0, 0.5):
    x_loop, _ = loop(jnp.float32(scale), ALPHAS, jax.random.key(3), *_inputs())
    x_scan, _ = _sample(BASE, rng=3, fn=functools.partial(apply_eps, scale))
    np.testing.assert_allclose(x_loop, x_scan, atol=1e-5)
  assert loop.step._cache_size() == 1  # noqa: SLF001 - one compiled step for both parameter values


def test_keys_determine_the_result():
  a, _ = _sample(STOCH, rng=1)
  b, _ = _sample(STOCH, rng=1)
  c, _ = _sample(STOCH, rng=2)
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2


@pytest.mark.parametrize('settings', [BASE, STOCH], ids=['eta0', 'eta0.5'])
def test_hard_blend_preserves_region_exactly(settings):
  region, mask, _ = _inputs()
  x0 = np.asarray(_sample(settings)[0])
  inside = np.broadcast_to(np.asarray(mask) == 1, x0.shape)
  np.testing.assert_allclose(x0[inside], np.asarray(region)[inside], atol=1e-5)
  assert np.abs(x0[~inside] - np.asarray(region)[~inside]).min() > 0


def test_blend_until():
  region, mask, z_dom = _inputs()
  free = np.asarray(_sample(dataclasses.replace(STOCH, blend_until=0.0))[0])
  zero_mask = np.asarray(_sample(STOCH, inputs=(region, jnp.zeros_like(mask), z_dom))[0])
  np.testing.assert_allclose(free, zero_mask, atol=1e-6)  # blend_until = 0: no blending at all
  full = np.asarray(_sample(STOCH)[0])
  half = np.asarray(_sample(dataclasses.replace(STOCH, blend_until=0.5))[0])
  assert np.abs(full - free).max() > 1e-2
  assert np.abs(half - free).max() > 1e-3 and np.abs(half - full).max() > 1e-3


def test_guidance_scale_one_is_conditional_only():
  def cond_only(x, t, z, drop):
    return eps_fn(x, t, z, jnp.zeros_like(drop))

  np.testing.assert_array_equal(_sample(STOCH)[0], _sample(STOCH, fn=cond_only)[0])
  assert _eps_call_shapes(STOCH) == [((B, H, W, C), (B,), (B, D), (B,))]


def test_guidance_matches_hand_combined_eps():
  def hand_guided(x, t, z, drop):
    eps_c = eps_fn(x, t, z, jnp.zeros_like(drop))
    eps_u = eps_fn(x, t, z, jnp.ones_like(drop))
    return eps_u + 2.0 * (eps_c - eps_u)

  got = np.asarray(_sample(GUIDED)[0])
  np.testing.assert_allclose(got, _sample(STOCH, fn=hand_guided)[0], atol=1e-5)
  assert np.abs(got - np.asarray(_sample(STOCH)[0])).max() > 1e-3
  # cond and uncond are evaluated in ONE call on the doubled batch.
  assert _eps_call_shapes(GUIDED) == [((2 * B, H, W, C), (2 * B,), (2 * B, D), (2 * B,))]


def test_trajectory():
  x0, traj = _sample(STOCH)
  assert traj.shape == (STOCH.num_steps, B, H, W, C)
  np.testing.assert_array_equal(traj[-1], x0)
  assert _sample(BASE)[1] is None


def test_sharded_batch_equals_unsharded():
  region, mask, z_dom = _inputs()
  mesh = Mesh(np.array(jax.devices()), ('data',))
  data, repl = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  run = jax.jit(functools.partial(sampler.blended_ddim_sample, eps_fn, ALPHAS, settings=GUIDED),
                in_shardings=(repl, data, data, data), out_shardings=(data, None))
  x_sharded, _ = run(jax.random.key(4), *(jax.device_put(a, data) for a in (region, mask, z_dom)))
  assert x_sharded.sharding.is_equivalent_to(data, x_sharded.ndim)
  np.testing.assert_allclose(x_sharded, _sample(GUIDED, rng=4)[0], atol=1e-5)


def test_settings_validation():
  with pytest.raises(ValueError, match='blend_mode'):
    sampler.SamplerSettings(blend_mode='alpha')
  with pytest.raises(ValueError, match='num_steps'):
    sampler.SamplerSettings(num_steps=0)
  with pytest.raises(ValueError, match='blend_until'):
    sampler.SamplerSettings(blend_until=1.5)
  with pytest.raises(ValueError, match='num_timesteps'):
    sampler.blended_ddim_sample(eps_fn, ALPHAS, jax.random.key(0), *_inputs(),
                                sampler.SamplerSettings(num_steps=10, num_timesteps=1000))
  assert hash(BASE) == hash(dataclasses.replace(BASE))


def test_settings_from_config():
  cfg = ml_collections.ConfigDict({'sampling': dict(num_steps=20, eta=0.5, guidance_scale=3.0,
                                                    blend_mode='pyramid', blend_until=0.8, soft_sigma=2.0,
                                                    pyramid_levels=4),
                                   'diffusion': dict(num_timesteps=200)})
  s = sampler.SamplerSettings.from_config(cfg)
  assert s == sampler.SamplerSettings(20, 0.5, 3.0, 'pyramid', 0.8, 2.0, 4, False, 200)  # the stage keeps x_0 only
