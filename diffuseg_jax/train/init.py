"""Create a replicated `TrainState` without materialising anything twice (eval_shape -> jit(out_shardings))."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from diffuseg_jax.train import sharding
from diffuseg_jax.train.checkpoint import StageCheckpointer
from diffuseg_jax.train.state import TrainState


def create_train_state(
    init_params: Callable[[jax.Array], Any], rng: jax.Array, tx: optax.GradientTransformation,
    ema_decay: float, mesh: Mesh,
) -> TrainState:
  def init(key):
    return TrainState.create(init_params(key), tx, ema_decay)

  abstract = jax.eval_shape(init, rng)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  return jax.jit(init, out_shardings=shardings)(rng)


def abstract_train_state(init_params, rng, tx, ema_decay) -> TrainState:
  return jax.eval_shape(lambda key: TrainState.create(init_params(key), tx, ema_decay), rng)


def final_step_reached(directory: str, num_steps: int) -> bool:
  """True when `directory` holds a checkpoint at (or past) the stage's final step."""
  import os

  if not os.path.isdir(directory):
    return False
  ckpt = StageCheckpointer(directory)
  try:
    latest = ckpt.latest_step()
  finally:
    ckpt.close()
  return latest is not None and latest >= num_steps


def restore_final_ema_params(directory: str, abstract: TrainState, mesh: Mesh, what: str, memo: dict) -> Any:
  """`restore_final_state(...).ema_params`, kept in `memo` (e.g. `Context.restored`) by (folder, newest step):
  a stage read by several later stages of one run is restored once, and only its EMA weights stay in memory."""
  import os

  newest = max((n for n in os.listdir(directory) if n.isdigit()), key=int, default='') if os.path.isdir(
      directory) else ''
  key = (os.path.abspath(directory), newest)
  if key not in memo:
    memo[key] = restore_final_state(directory, abstract, mesh, what).ema_params
  return memo[key]


def restore_final_state(directory: str, abstract: TrainState, mesh: Mesh, what: str) -> TrainState:
  """The newest checkpoint of a finished stage, replicated on `mesh`; a clear error if there is none."""
  from diffuseg_jax.errors import UserError

  # Restore onto this run's mesh: without target shardings orbax falls back to the saved ones, which fail
  # ("topology mismatch") when the checkpoint was written with another device or process count.
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
                        abstract)
  ckpt = StageCheckpointer(directory)
  try:
    restored = ckpt.restore(target)
  finally:
    ckpt.close()
  if restored is None:
    raise UserError(f'{what}: no usable checkpoint in {directory}; run that stage first '
                    f'(it is in config.stages by default)')
  return jax.device_put(restored[0], sharding.replicated(mesh))
