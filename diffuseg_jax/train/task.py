"""One trainable network, declared once: the shape every network of the pipeline takes.

A `Task` says what to train (model, parameter init, `loss_fn`, optimiser, number of steps, batch size, where
it checkpoints); this module owns everything else, written once for all networks:

  train_step(loss_fn, state, batch, rng, frozen) -> (state, metrics)   the one jitted step
  init_state / abstract_state                                         eval_shape -> sharded jit(init)
  init_or_restore(task, mesh, checkpointer)                           resume from the newest checkpoint
  load_final(task, mesh, directory, memo)                             EMA params of a finished task

`loss_fn(params, batch, rng, frozen) -> (loss, metrics)` is pure: `rng` is already folded with the step, and
`frozen` is a pytree of fixed parameters (e.g. the teacher's, for the student), never differentiated. The
benchmarks time the same `loss_fn` through the same `train_step` as the pipeline.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from diffuseg_jax.train import sharding
from diffuseg_jax.train.checkpoint import StageCheckpointer
from diffuseg_jax.train.state import TrainState

LossFn = Callable[[Any, dict[str, jax.Array], jax.Array, Any], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Task:
  """A trainable network.

  name: logs, progress bars and the data order (`data_seed`) are keyed by it, e.g. 'teacher',
    'segment_transfer_seed0'.
  checkpoint: its checkpoint folder relative to `<workdir>/checkpoints`, e.g. 'segment/transfer_seed0'.
  rng: root key: `init_params(rng)` makes the initial parameters; step k uses `fold_in(rng, k)`.
  learning_rate_field: the config field to lower when the loss turns non-finite (for the error message).
  """

  name: str
  model: Any
  init_params: Callable[[jax.Array], Any]
  loss_fn: LossFn
  optimizer: optax.GradientTransformation
  num_steps: int
  batch_size: int
  checkpoint: str
  rng: jax.Array
  ema_decay: float
  learning_rate_field: str = 'learning_rate'


def named_rng(seed: int, name: str) -> jax.Array:
  """A root key per name (stage, task), independent across names and fixed by the run's seed."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def data_seed(seed: int, name: str) -> int:
  """The shuffling/augmentation seed of a task's training data, fixed by the run's seed and the task name."""
  return seed * 1_000_003 + zlib.crc32(name.encode()) % 1_000_003


def linen_init(model, *inputs: jax.ShapeDtypeStruct, rng_names: tuple[str, ...] = ('params',), **kwargs):
  """`init_params(key)` of a linen module applied to zeros of `inputs`; with several `rng_names` (e.g.
  ('params', 'latent') for a VAE's sampling) the key is split into one key per name, in that order."""

  def init_params(key: jax.Array):
    keys = jax.random.split(key, len(rng_names)) if len(rng_names) > 1 else [key]
    zeros = [jnp.zeros(x.shape, x.dtype) for x in inputs]
    return model.init(dict(zip(rng_names, keys, strict=True)), *zeros, **kwargs)['params']

  return init_params


def train_step(loss_fn: LossFn, state: TrainState, batch: dict[str, jax.Array], rng: jax.Array,
               frozen: Any) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step of `loss_fn` (gradients w.r.t. `state.params` only), EMA included."""
  rng = jax.random.fold_in(rng, state.step)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng, frozen)
  return state.apply_gradients(grads), {**metrics, 'loss': loss}


def compile_step(task: Task, mesh: Mesh) -> Callable:
  """`train_step` of the task, jitted once: state replicated and donated, batch sharded on 'data'."""
  repl = sharding.replicated(mesh)
  return jax.jit(functools.partial(train_step, task.loss_fn),
                 in_shardings=(repl, sharding.batch_sharding(mesh), repl, repl), out_shardings=(repl, repl),
                 donate_argnums=0)


def _create(task: Task, key: jax.Array) -> TrainState:
  return TrainState.create(task.init_params(key), task.optimizer, task.ema_decay)


def abstract_state(task: Task, mesh: Mesh | None = None) -> TrainState:
  """The task's TrainState as ShapeDtypeStructs (replicated on `mesh` when given: a restore target)."""
  abstract = jax.eval_shape(functools.partial(_create, task), task.rng)
  if mesh is None:
    return abstract
  repl = sharding.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), abstract)


def init_state(task: Task, mesh: Mesh, abstract: TrainState | None = None) -> TrainState:
  """A fresh replicated TrainState, allocated once (eval_shape -> jit with out_shardings); `abstract`, the
  task's `abstract_state` when the caller has it, saves tracing the networks' init once more."""
  if abstract is None:
    abstract = jax.eval_shape(functools.partial(_create, task), task.rng)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  return jax.jit(functools.partial(_create, task), out_shardings=shardings)(task.rng)


def init_or_restore(task: Task, mesh: Mesh, checkpointer: StageCheckpointer) -> tuple[TrainState, dict, int | None]:
  """(state, data-iterator state, step resumed from) from the newest readable checkpoint, else a fresh state.

  The restore targets this run's mesh: without target shardings orbax would fall back to the saved ones,
  which fail when the device or process count changed since (a resumed job on other hardware).
  """
  abstract = abstract_state(task, mesh)
  restored = checkpointer.restore(abstract)
  if restored is None:
    return init_state(task, mesh, abstract), {}, None
  state, data_state, step = restored
  return jax.device_put(state, sharding.replicated(mesh)), data_state, step


def checkpoint_steps(directory: str) -> list[int]:
  """The committed checkpoint steps in `directory`, ascending, read from the file system alone: orbax
  renames a step's folder to its number only once it is complete. No CheckpointManager is made, so this is
  no collective: processes may look at a stage at different moments (a multi-process run's `is_done`)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def final_step_reached(directory: str, num_steps: int) -> bool:
  """True when `directory` holds a checkpoint at (or past) the task's final step."""
  steps = checkpoint_steps(directory)
  return bool(steps) and steps[-1] >= num_steps


def load_final(task: Task, mesh: Mesh, directory: str, memo: dict | None = None) -> Any:
  """EMA params of the task's final checkpoint in `directory`, replicated on `mesh`.

  A checkpoint older than the final step is never returned in its place (ValueError: rerun the task).
  `memo` (e.g. `Context.restored`) keeps the result by (folder, newest step), so that a task read by several
  later stages of one run is restored once, and only its EMA weights stay in memory.
  """
  key = (os.path.abspath(directory), (checkpoint_steps(directory) or [None])[-1])
  if memo is not None and key in memo:
    return memo[key]
  ckpt = StageCheckpointer(directory)
  try:
    restored = ckpt.restore(abstract_state(task, mesh), only='ema_params')
  finally:
    ckpt.close()
  if restored is None:
    raise ValueError(f'{task.name}: no usable checkpoint in {directory}; run its stage first')
  ema_params, _, step = restored
  if step < task.num_steps:
    raise ValueError(f'{task.name}: the newest usable checkpoint in {directory} is step {step}, not the final '
                     f'step {task.num_steps}; rerun its stage to finish training')
  params = jax.device_put(ema_params, sharding.replicated(mesh))
  if memo is not None:
    memo[key] = params
  return params
