"""The training core: a toy task through the generic step (one declaration is all a new network needs),
sharded steps, exact resume, NaN stop, corrupted-checkpoint fallback, final-checkpoint loading."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import make_context, tiny_config

from diffuseg_jax import run_identity
from diffuseg_jax.errors import NonFiniteLossError, UserError
from diffuseg_jax.train import sharding
from diffuseg_jax.train import task as task_lib
from diffuseg_jax.train.checkpoint import CheckpointMismatchError, StageCheckpointer
from diffuseg_jax.train.state import TrainState
from diffuseg_jax.train.task import Task

run_identity.register('toy', run_identity.UnitSpec(run_identity.COMMON))  # the toy task's unit

D = 6


def _init_params(key):
  return {'w': jax.random.normal(key, (D, 1)) * 0.1, 'b': jnp.zeros((1,))}


def _loss_fn(params, batch, rng, frozen):
  """Least squares with a little noise from rng (so the key plumbing matters)."""
  del frozen
  pred = batch['x'] @ params['w'] + params['b']
  mse = jnp.mean((pred[:, 0] - batch['y']) ** 2)
  return mse + 1e-3 * jax.random.normal(rng, ()), {'mse': mse}


def _task(num_steps=10, lr=0.05, loss_fn=_loss_fn, init_params=_init_params, name='toy') -> Task:
  """A new trainable network is this declaration and nothing else."""
  return Task(name=name, model=None, init_params=init_params, loss_fn=loss_fn, optimizer=optax.sgd(lr),
              num_steps=num_steps, batch_size=16, checkpoint=name, rng=jax.random.key(1), ema_decay=0.9)


def _arrays(n=64, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, D)).astype(np.float32)
  y = (x @ np.arange(1, D + 1, dtype=np.float32) + 0.5).astype(np.float32)
  return {'x': x, 'y': y}


def test_toy_task_trains_through_the_generic_step(tmp_path):
  """Context.train runs the declaration: the loss falls, the final checkpoint is the task's last step, and
  load_final gives its EMA params."""
  ctx = make_context(tiny_config(), tmp_path)
  task = _task(num_steps=60, lr=0.05)
  result = ctx.train(task, _arrays())
  assert result.steps_run == 60 and int(result.state.step) == 60 and ctx.is_trained(task)

  mse = [row['mse'] for row in ctx.training_log('toy')]
  assert mse[-1] < 0.05 * mse[0], mse
  ema = ctx.load(task)
  for a, b in zip(jax.tree.leaves(result.state.ema_params), jax.tree.leaves(ema), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_state_is_replicated_on_eight_devices(tmp_path):
  ctx = make_context(tiny_config(), tmp_path)
  assert jax.device_count() == 8 and ctx.mesh.shape['data'] == 8
  state = task_lib.init_state(_task(), ctx.mesh)
  assert state.params['w'].sharding.is_fully_replicated
  batch = sharding.shard_batch({k: v[:16] for k, v in _arrays().items()}, ctx.mesh)
  assert len(batch['x'].sharding.device_set) == 8 and not batch['x'].sharding.is_fully_replicated


def test_sharded_step_matches_single_device_numpy(tmp_path):
  """One SGD step of the compiled generic step on the 8-device mesh equals the hand-derived numpy step."""
  ctx = make_context(tiny_config(), tmp_path)

  def mse(params, batch, rng, frozen):
    return jnp.mean(((batch['x'] @ params['w'] + params['b'])[:, 0] - batch['y']) ** 2), {}

  task = _task(lr=0.1, loss_fn=mse)
  state = task_lib.init_state(task, ctx.mesh)
  arrays = {k: v[:16] for k, v in _arrays().items()}
  w = np.asarray(state.params['w'], np.float64)
  b = np.asarray(state.params['b'], np.float64)
  new, metrics = task_lib.compile_step(task, ctx.mesh)(state, sharding.shard_batch(arrays, ctx.mesh), task.rng,
                                                        None)
  x, y = arrays['x'].astype(np.float64), arrays['y'].astype(np.float64)
  r = x @ w[:, 0] + b[0] - y
  gw = 2 * x.T @ r / len(y)
  gb = 2 * r.mean()
  np.testing.assert_allclose(float(metrics['loss']), np.mean(r**2), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(new.params['w'])[:, 0], w[:, 0] - 0.1 * gw, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(new.params['b'])[0], b[0] - 0.1 * gb, rtol=1e-4, atol=1e-5)
  # EMA with warm-up: decay = min(0.9, 1/10) at step 0.
  np.testing.assert_allclose(np.asarray(new.ema_params['w']), 0.1 * w + 0.9 * np.asarray(new.params['w']),
                             rtol=1e-5, atol=1e-6)


def test_step_rng_is_folded_with_the_step():
  """The loss sees fold_in(task.rng, step): the same key at the same step, a new one at the next."""
  seen = []

  def loss_fn(params, batch, rng, frozen):
    seen.append(rng)
    return jnp.sum(params['w']) * 0.0 + jax.random.uniform(rng), {}

  task = _task(loss_fn=loss_fn)
  state = TrainState.create(_init_params(jax.random.key(0)), task.optimizer, task.ema_decay)
  step = jax.jit(lambda s, r: task_lib.train_step(task.loss_fn, s, {}, r, None))
  _, m0 = step(state, task.rng)
  _, m1 = step(state.replace(step=state.step + 1), task.rng)
  assert float(m0['loss']) == pytest.approx(float(jax.random.uniform(jax.random.fold_in(task.rng, 0))))
  assert float(m1['loss']) == pytest.approx(float(jax.random.uniform(jax.random.fold_in(task.rng, 1))))


def test_resume_reaches_bitwise_same_state(tmp_path):
  cfg = tiny_config()
  cfg.checkpoint.every_steps = 3
  full = make_context(cfg, tmp_path / 'a').train(_task(10), _arrays()).state
  ctx_b = make_context(cfg, tmp_path / 'b')
  ctx_b.train(_task(7, name='toy'), _arrays())  # "killed" after step 7 (checkpoint at 6 and at the stop)
  # Drop the step-7 checkpoint as if the process died between 6 and 7: resume must replay from 6.
  shutil.rmtree(os.path.join(ctx_b.checkpoint_dir('toy'), '7'))
  res = ctx_b.train(_task(10), _arrays())
  assert res.steps_run == 4
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(res.state.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A finished task returns immediately.
  assert ctx_b.train(_task(10), _arrays()).steps_run == 0


def test_nan_loss_stops_and_keeps_only_finite_checkpoints(tmp_path):
  """A learning rate far too large drives the loss to inf/nan: the run stops with the error, and every
  checkpoint it kept holds finite parameters."""
  cfg = tiny_config()
  cfg.checkpoint.every_steps = 2
  cfg.train.log_every = 1
  ctx = make_context(cfg, tmp_path)
  task = _task(num_steps=200, lr=1e3)
  with pytest.raises(NonFiniteLossError, match='last good checkpoint'):
    ctx.train(task, _arrays())
  ckpt = StageCheckpointer(ctx.checkpoint_dir('toy'))
  steps = ckpt.all_steps()
  assert steps and max(steps) < 200
  for s in steps:
    state, _, _ = ckpt.restore(task_lib.abstract_state(task, ctx.mesh), step=s)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params)), s
  ckpt.close()


def test_corrupted_latest_checkpoint_falls_back_to_previous(tmp_path):
  cfg = tiny_config()
  cfg.checkpoint.every_steps = 2
  ctx = make_context(cfg, tmp_path)
  ctx.train(_task(4), _arrays())
  latest = os.path.join(ctx.checkpoint_dir('toy'), '4', 'state')
  for root, _, files in os.walk(latest):
    for f in files:
      with open(os.path.join(root, f), 'wb') as fh:
        fh.write(b'garbage')
  ctx = make_context(cfg, tmp_path)  # a new run: completion is verified once per run
  assert not ctx.is_trained(_task(4))  # the final checkpoint's files no longer match their record
  with pytest.raises(UserError, match='changed since it was written'):
    ctx.load(_task(4))  # neither the damaged final model nor a half-trained one is handed out
  res = ctx.train(_task(4), _arrays())  # sets the damaged step aside, resumes from step 2
  assert res.steps_run == 2
  assert os.path.isdir(ctx.checkpoint_dir('toy') + '.unreadable')
  assert ctx.is_trained(_task(4)) and ctx.load(_task(4)) is not None


def test_state_roundtrip_through_checkpoint(tmp_path):
  ctx = make_context(tiny_config(), tmp_path)
  task = _task(4)
  state = ctx.train(task, _arrays()).state
  ckpt = StageCheckpointer(ctx.checkpoint_dir('toy'))
  restored, _, step = task_lib.init_or_restore(task, ctx.mesh, ckpt)
  # What inference reads: the EMA weights alone, the same tree and values as in the whole state.
  ema, _, ema_step = ckpt.restore(task_lib.abstract_state(task, ctx.mesh), only='ema_params')
  ckpt.close()
  assert isinstance(restored, TrainState) and int(restored.step) == 4 and step == 4
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert ema_step == 4 and jax.tree.structure(ema) == jax.tree.structure(state.ema_params)
  for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(ema), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert b.sharding.is_fully_replicated and len(b.sharding.device_set) == 8


def test_small_replicated_arrays_are_saved_whole(tmp_path, monkeypatch):
  """On 8 devices orbax would cut every replicated array into 8 slices (one eager op each, per save); the
  registered handler writes arrays under MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL whole from one replica."""
  from orbax.checkpoint._src.serialization import replica_slices

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
  task = _task(num_steps=1, init_params=init_params)
  state = task_lib.init_state(task, ctx.mesh)
  assert state.params['w'].sharding.is_fully_replicated and len(state.params['w'].sharding.device_set) == 8
  ckpt = StageCheckpointer(ctx.checkpoint_dir('toy'))
  ckpt.save(1, state, force=True)
  ckpt.close()
  assert sliced == []
  np.testing.assert_array_equal(np.asarray(ctx.load(task)['w']), np.asarray(state.ema_params['w']))


def test_final_ema_params_restored_once_per_checkpoint(tmp_path, monkeypatch):
  """The run that trained a task hands its EMA weights in memory to later stages; another run restores them
  once for all its stages; a newer final checkpoint is read again."""
  ctx = make_context(tiny_config(), tmp_path)
  state = ctx.train(_task(2), _arrays()).state
  calls = []
  original = StageCheckpointer.restore
  monkeypatch.setattr(StageCheckpointer, 'restore', lambda *a, **k: calls.append(a) or original(*a, **k))
  assert ctx.load(_task(2)) is state.ema_params and calls == []
  later_run = make_context(tiny_config(), tmp_path)
  first = later_run.load(_task(2))
  again = later_run.load(_task(2))
  assert again is first and len(calls) == 1
  for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(first), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # what the final checkpoint holds, bit for bit
  newer = later_run.train(_task(4), _arrays()).state  # resumes from step 2: one more restore
  assert later_run.load(_task(4)) is newer.ema_params and len(calls) == 2


def test_checkpoint_of_another_network_shape_is_an_error_not_corruption(tmp_path):
  """A readable checkpoint whose parameters have other shapes (the code changed) stops with one line naming
  the parameter; nothing is moved aside or deleted, and the original network still resumes from it."""
  ctx = make_context(tiny_config(), tmp_path)
  ctx.train(_task(4), _arrays())
  steps = sorted(os.listdir(ctx.checkpoint_dir('toy')))

  def wider(key):
    return {'w': jax.random.normal(key, (D, 2)) * 0.1, 'b': jnp.zeros((1,))}

  with pytest.raises(CheckpointMismatchError, match=r'parameter w is \(6, 1\) in the checkpoint and \(6, 2\) now'):
    ctx.train(_task(6, init_params=wider), _arrays())
  assert sorted(os.listdir(ctx.checkpoint_dir('toy'))) == steps
  assert not os.path.exists(ctx.checkpoint_dir('toy') + '.unreadable')
  assert ctx.train(_task(6), _arrays()).steps_run == 2  # the original network resumes at step 4
