"""The generic training loop: sharded steps, exact resume, NaN stop, corrupted-checkpoint fallback."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import make_context, tiny_config

from diffuseg_jax.errors import NonFiniteLossError
from diffuseg_jax.train import init as train_init
from diffuseg_jax.train import sharding
from diffuseg_jax.train.loop import fit
from diffuseg_jax.train.state import TrainState

D = 6


def _init_params(key):
  return {'w': jax.random.normal(key, (D, 1)) * 0.1, 'b': jnp.zeros((1,))}


def _step(state, batch, rng, frozen):
  """Least squares with a little noise from rng (so the key plumbing matters)."""
  del frozen
  noise = 1e-3 * jax.random.normal(jax.random.fold_in(rng, state.step), ())

  def loss_fn(p):
    pred = batch['x'] @ p['w'] + p['b']
    return jnp.mean((pred[:, 0] - batch['y']) ** 2) + noise

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads), {'loss': loss}


def _arrays(n=64, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, D)).astype(np.float32)
  y = (x @ np.arange(1, D + 1, dtype=np.float32) + 0.5).astype(np.float32)
  return {'x': x, 'y': y}


def _state(ctx, lr=0.05):
  return train_init.create_train_state(_init_params, jax.random.key(0), optax.sgd(lr), 0.9, ctx.mesh)


def _fit(ctx, state, num_steps, arrays=None, step=_step, name='toy'):
  return fit(stage=name, ctx=ctx, state=state, step_fn=step, arrays=arrays or _arrays(), batch_size=16,
             num_steps=num_steps, rng=jax.random.key(1))


def test_state_is_replicated_on_eight_devices(tmp_path):
  ctx = make_context(tiny_config(), tmp_path)
  assert jax.device_count() == 8 and ctx.mesh.shape['data'] == 8
  state = _state(ctx)
  assert state.params['w'].sharding.is_fully_replicated
  batch = sharding.shard_batch({k: v[:16] for k, v in _arrays().items()}, ctx.mesh)
  assert len(batch['x'].sharding.device_set) == 8 and not batch['x'].sharding.is_fully_replicated


def test_sharded_step_matches_single_device_numpy(tmp_path):
  """One SGD step on the 8-device mesh equals the hand-derived numpy gradient step."""
  ctx = make_context(tiny_config(), tmp_path)
  state = _state(ctx, lr=0.1)
  arrays = {k: v[:16] for k, v in _arrays().items()}
  batch = sharding.shard_batch(arrays, ctx.mesh)
  rng = jax.random.key(1)
  new, _ = jax.jit(_step)(state, batch, rng, None)
  w = np.asarray(state.params['w'], np.float64)
  b = np.asarray(state.params['b'], np.float64)
  x, y = arrays['x'].astype(np.float64), arrays['y'].astype(np.float64)
  r = x @ w[:, 0] + b[0] - y
  gw = 2 * x.T @ r / len(y)
  gb = 2 * r.mean()
  np.testing.assert_allclose(np.asarray(new.params['w'])[:, 0], w[:, 0] - 0.1 * gw, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(new.params['b'])[0], b[0] - 0.1 * gb, rtol=1e-4, atol=1e-5)
  # EMA with warm-up: decay = min(0.9, 1/10) at step 0.
  np.testing.assert_allclose(np.asarray(new.ema_params['w']), 0.1 * w + 0.9 * np.asarray(new.params['w']),
                             rtol=1e-5, atol=1e-6)


def test_resume_reaches_bitwise_same_state(tmp_path):
  cfg = tiny_config()
  cfg.checkpoint.every_steps = 3
  full = _fit(make_context(cfg, tmp_path / 'a'), _state(make_context(cfg, tmp_path / 'a')), 10).state
  ctx_b = make_context(cfg, tmp_path / 'b')
  _fit(ctx_b, _state(ctx_b), 7)  # "killed" after step 7 (checkpoint at 6 and at the stop)
  # Drop the step-7 checkpoint as if the process died between 6 and 7: resume must replay from 6.
  shutil.rmtree(os.path.join(ctx_b.checkpoint_dir('toy'), '7'))
  res = _fit(ctx_b, _state(ctx_b), 10)
  assert res.resumed_from == 6 and res.steps_run == 4
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(res.state.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A finished stage returns immediately.
  again = _fit(ctx_b, _state(ctx_b), 10)
  assert again.steps_run == 0


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = tiny_config()
  cfg.checkpoint.every_steps = 2
  cfg.train.log_every = 1
  ctx = make_context(cfg, tmp_path)

  def nan_after_3(state, batch, rng, frozen):
    state, m = _step(state, batch, rng, frozen)
    return state, {'loss': jnp.where(state.step > 3, jnp.nan, m['loss'])}

  with pytest.raises(NonFiniteLossError, match='last good checkpoint'):
    _fit(ctx, _state(ctx), 10, step=nan_after_3)
  steps = sorted(int(s) for s in os.listdir(ctx.checkpoint_dir('toy')) if s.isdigit())
  assert steps and max(steps) <= 3


def test_corrupted_latest_checkpoint_falls_back_to_previous(tmp_path, capsys):
  cfg = tiny_config()
  cfg.checkpoint.every_steps = 2
  ctx = make_context(cfg, tmp_path)
  _fit(ctx, _state(ctx), 4)
  latest = os.path.join(ctx.checkpoint_dir('toy'), '4', 'state')
  for root, _, files in os.walk(latest):
    for f in files:
      with open(os.path.join(root, f), 'wb') as fh:
        fh.write(b'garbage')
  res = _fit(ctx, _state(ctx), 4)
  assert res.resumed_from == 2 and res.steps_run == 2
  assert 'unreadable' in capsys.readouterr().out


def test_state_roundtrip_through_checkpoint(tmp_path):
  ctx = make_context(tiny_config(), tmp_path)
  state = _fit(ctx, _state(ctx), 4).state
  abstract = train_init.abstract_train_state(_init_params, jax.random.key(0), optax.sgd(0.05), 0.9)
  restored = train_init.restore_final_state(ctx.checkpoint_dir('toy'), abstract, ctx.mesh, 'toy')
  assert isinstance(restored, TrainState) and int(restored.step) == 4
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_small_replicated_arrays_are_saved_whole(tmp_path, monkeypatch):
  """On 8 devices orbax would cut every replicated array into 8 slices (one eager op each, per save); the
  registered handler writes arrays under MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL whole from one replica."""
  from orbax.checkpoint._src.serialization import replica_slices

  from diffuseg_jax.train.checkpoint import StageCheckpointer

  sliced = []
  original = replica_slices.ReplicaSlice.data

  def counting(self):
    if self.slice_args is not None:
      sliced.append(self)
    return original(self)

  monkeypatch.setattr(replica_slices.ReplicaSlice, 'data', counting)
  def init_params(key):  # a leading dimension divisible by the 8 replicas, as conv kernels' often are
    return {'w': jax.random.normal(key, (64, 16))}

  ctx = make_context(tiny_config(), tmp_path)
  state = train_init.create_train_state(init_params, jax.random.key(0), optax.sgd(0.1), 0.9, ctx.mesh)
  assert state.params['w'].sharding.is_fully_replicated and len(state.params['w'].sharding.device_set) == 8
  ckpt = StageCheckpointer(ctx.checkpoint_dir('toy'))
  ckpt.save(1, state, force=True)
  ckpt.close()
  assert sliced == []
  abstract = train_init.abstract_train_state(init_params, jax.random.key(0), optax.sgd(0.1), 0.9)
  restored = train_init.restore_final_state(ctx.checkpoint_dir('toy'), abstract, ctx.mesh, 'toy')
  np.testing.assert_array_equal(np.asarray(restored.params['w']), np.asarray(state.params['w']))


def test_final_ema_params_restored_once_per_checkpoint(tmp_path, monkeypatch):
  """Later stages of one run share a restore; a newer checkpoint in the folder is restored again."""
  ctx = make_context(tiny_config(), tmp_path)
  state = _fit(ctx, _state(ctx), 2).state
  abstract = train_init.abstract_train_state(_init_params, jax.random.key(0), optax.sgd(0.05), 0.9)
  calls = []
  original = train_init.restore_final_state
  monkeypatch.setattr(train_init, 'restore_final_state', lambda *a: calls.append(a) or original(*a))
  directory = ctx.checkpoint_dir('toy')
  first = train_init.restore_final_ema_params(directory, abstract, ctx.mesh, 'toy', ctx.restored)
  again = train_init.restore_final_ema_params(directory, abstract, ctx.mesh, 'toy', ctx.restored)
  assert again is first and len(calls) == 1
  for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(first), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  newer = _fit(ctx, state, 4).state
  updated = train_init.restore_final_ema_params(directory, abstract, ctx.mesh, 'toy', ctx.restored)
  assert len(calls) == 2
  np.testing.assert_array_equal(np.asarray(updated['w']), np.asarray(newer.ema_params['w']))
