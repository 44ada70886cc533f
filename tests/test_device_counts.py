"""Data parallelism is invisible in the numbers: a fixed global batch on 1, 2 or 8 devices trains alike.

A tiny convolutional VAE-like model (conv -> GroupNorm -> sampled latent -> conv; reconstruction + KL + CE,
so the step draws random numbers for the sharded batch like the FFD-VAE does) runs a few `Context.train` steps with
global batch 16 on meshes over the first 1, 2 and 8 devices. Logged losses and parameters must agree to
float tolerance: only the order of the cross-device reductions may differ. Plain SGD keeps the comparison
sharp (Adam would blow float noise in near-zero gradients up to full-size updates).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_config
from jax.sharding import Mesh

from diffuseg_jax import run_identity
from diffuseg_jax.context import Context
from diffuseg_jax.train import task as task_lib
from diffuseg_jax.train.task import Task

run_identity.register('toy', run_identity.UnitSpec(run_identity.COMMON))  # the toy task's unit

STEPS = 3
CLASSES = 3


class TinyVAE(nn.Module):
  """[B, 8, 8, 3] images -> (reconstruction [B, 8, 8, 3], class logits [B, 8, 8, K], mean, logvar)."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, key):
    h = nn.Conv(8, (3, 3), dtype=self.dtype, name='enc')(x)
    h = nn.swish(nn.GroupNorm(num_groups=4, dtype=self.dtype, name='norm')(h))
    mean, logvar = jnp.split(nn.Conv(8, (1, 1), dtype=self.dtype, name='stats')(h), 2, axis=-1)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    rec = nn.Conv(3, (3, 3), dtype=self.dtype, name='dec')(z)
    logits = nn.Conv(CLASSES, (1, 1), dtype=self.dtype, name='seg')(h)
    return rec, logits, mean, logvar


def _loss_fn(params, batch, rng, frozen):
  del frozen
  rec, logits, mean, logvar = TinyVAE().apply({'params': params}, batch['image'], rng)
  kl = 0.5 * jnp.mean(jnp.exp(logvar) + mean**2 - 1.0 - logvar)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
  return jnp.mean((rec - batch['image']) ** 2) + 1e-2 * kl + ce, {}


def _arrays(n=48):
  rng = np.random.default_rng(0)
  label = rng.integers(0, CLASSES, (n, 8, 8)).astype(np.int32)
  image = (label[..., None] / CLASSES + 0.3 * rng.standard_normal((n, 8, 8, 3))).astype(np.float32)
  return {'image': image, 'label': label}


def _train(workdir, num_devices: int):
  """(initial params, params after STEPS steps, per-step losses) on the first `num_devices` devices."""
  config = tiny_config()
  config.train.log_every = 1
  config.checkpoint.every_steps = STEPS
  mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ('data',))
  ctx = Context(config=config, workdir=str(workdir), mesh=mesh, show_progress=False)

  def init_params(key):
    return TinyVAE().init(key, jnp.zeros((1, 8, 8, 3)), key)['params']

  task = Task(name='toy', model=TinyVAE(), init_params=init_params, loss_fn=_loss_fn, optimizer=optax.sgd(0.5),
              num_steps=STEPS, batch_size=16, checkpoint='toy', rng=jax.random.key(0), ema_decay=0.9)
  state = task_lib.init_state(task, mesh)
  assert len(jax.tree.leaves(state.params)[0].sharding.device_set) == num_devices
  initial = jax.tree.map(np.asarray, state.params)
  result = ctx.train(task, _arrays())
  losses = [row['loss'] for row in ctx.training_log('toy')]
  return initial, jax.tree.map(np.asarray, result.state.params), np.asarray(losses)


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
  return _train(tmp_path_factory.mktemp('mesh1'), 1)


@pytest.mark.parametrize('num_devices', [2, 8])
def test_fit_on_n_devices_matches_one_device(one_device, tmp_path, num_devices):
  _, params_1, losses_1 = one_device
  _, params_n, losses_n = _train(tmp_path, num_devices)
  assert losses_n.shape == (STEPS,) and np.all(np.isfinite(losses_n))
  np.testing.assert_allclose(losses_n, losses_1, rtol=1e-5)
  leaves_1 = jax.tree_util.tree_leaves_with_path(params_1)
  for (path, a), b in zip(leaves_1, jax.tree.leaves(params_n), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_training_moves_every_parameter_beyond_the_tolerance(one_device):
  """Guards the comparison above: the updates are far larger than its tolerance, in every leaf."""
  initial, params, _ = one_device
  moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(initial), strict=True)]
  assert min(moved) > 1e-3, moved
