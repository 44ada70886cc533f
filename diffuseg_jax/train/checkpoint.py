"""Orbax checkpoints of one training unit: train state + data-iterator state + config, resumed from latest.

Layout: <unit folder>/checkpoints/<step>/{state,data,config} (units.py). Two failures are told apart:
  - a checkpoint whose network does not fit the current code (readable, other parameter shapes):
    `CheckpointMismatchError`, one line naming the first parameter that differs; nothing is moved;
  - a checkpoint that fails to restore (truncated, corrupted): reported by name, moved to
    `checkpoints.unreadable/`, and the previous one is used instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from diffuseg_jax import logs
from diffuseg_jax.errors import UserError

# Orbax splits every replicated array into one slice per replica so that replicas write in parallel. For the
# small arrays of these networks that costs one eager slice per array and device (about 25,000 dispatches per
# save of a 3-network pipeline on 8 devices, 1 s or more each save) and saves nothing. Arrays under 4 MiB per
# replica slice are written whole by replica 0; bigger ones keep replica-parallel writes.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 4 << 20


def _register_array_handler() -> None:
  absl_logger = logging.getLogger('absl')  # orbax logs a warning for every override of a default handler
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array,
        ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL),
        override=True)
  finally:
    absl_logger.setLevel(level)


_register_array_handler()


class CheckpointMismatchError(UserError):
  """A readable checkpoint of another network shape than the current code builds."""


def _key_name(key) -> str:
  for attr in ('name', 'key', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def param_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'path/to/param': shape} of the arrays of a (params) pytree or of its checkpoint metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves
          if hasattr(leaf, 'shape')}


def shape_difference(saved: dict[str, tuple], current: dict[str, tuple]) -> str | None:
  """What differs between two {path: shape} maps, in one phrase, or None."""
  for path in sorted(set(saved) | set(current)):
    if path not in current:
      return f'parameter {path} {saved[path]} is not in the current network'
    if path not in saved:
      return f'parameter {path} {current[path]} of the current network is not in the checkpoint'
    if saved[path] != current[path]:
      return f'parameter {path} is {saved[path]} in the checkpoint and {current[path]} now'
  return None


class StageCheckpointer:
  """Thin wrapper over `ocp.CheckpointManager` for one stage."""

  def __init__(self, directory: str, *, max_to_keep: int = 2, config_json: dict | None = None):
    self.directory = os.path.abspath(directory)
    self._config_json = config_json or {}
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False) -> None:
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            config=ocp.args.JsonSave(self._config_json),
        ),
        force=force,
    )

  def restore(self, abstract_state: Any, step: int | None = None, *, only: str | None = None
              ) -> tuple[Any, dict, int] | None:
    """(state, data_state, step) of the newest restorable checkpoint (<= step if given), or None.

    `only` (a field of the state, e.g. 'ema_params'): read that subtree alone and return it in place of the
    state (and no data state). Inference needs only the EMA weights: a quarter of the arrays, read several
    times faster than the whole state with its optimiser moments (150 small arrays: 0.17 s against 1.3 s)."""
    steps = [s for s in self.all_steps() if step is None or s <= step]
    for s in reversed(steps):
      self._check_fits(s, abstract_state)
      try:
        if only is not None:  # read by path: the manager keeps the handler it saved 'state' with
          target = {only: getattr(abstract_state, only)}
          tree = ocp.PyTreeCheckpointer().restore(
              os.path.join(self.directory, str(s), 'state'),
              args=ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                          restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
          return tree[only], {}, s
        restored = self._manager.restore(
            s,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        return restored['state'], dict(restored['data'] or {}), s
      except Exception as e:  # noqa: BLE001 - any failure means "unusable checkpoint"
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        logs.say(f'warning: checkpoint {self.directory}/{s} is unreadable ({msg}); moved to '
                 f'{self.directory}.unreadable/; trying the previous one')
        if jax.process_index() == 0:
          self._quarantine(s)
    return None

  def _check_fits(self, step: int, abstract_state: Any) -> None:
    """Raises CheckpointMismatchError when step's saved parameters have other shapes than `abstract_state`'s
    (a readable checkpoint of another network: never moved, never taken for corruption)."""
    params = getattr(abstract_state, 'params', None)
    if params is None:
      return
    try:
      meta = ocp.PyTreeCheckpointer().metadata(os.path.join(self.directory, str(step), 'state'))
      meta = getattr(meta, 'item_metadata', meta)
      saved = getattr(meta, 'tree', meta)['params']
    except Exception:  # noqa: BLE001 - no readable metadata: the restore below decides (unreadable)
      return
    if difference := shape_difference(param_shapes(saved), param_shapes(params)):
      raise CheckpointMismatchError(
          f'checkpoint {self.directory}/{step} does not fit the current network: {difference}; nothing was '
          'moved or deleted. Restore the code or config that wrote it, or use another workdir')

  def _quarantine(self, step: int) -> None:
    """Move an unreadable step out of the manager's folder (kept for inspection, never overwritten)."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(f'{self.directory}.unreadable', f'{step}-{int(time.time())}')
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.exists(src):
      shutil.move(src, dst)
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
