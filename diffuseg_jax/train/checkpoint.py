"""Orbax checkpoints of one stage: train state + data-iterator state + config, always resumed from latest.

Layout: <workdir>/checkpoints/<stage>/<step>/{state,data,config}. A checkpoint that fails to restore
(truncated, corrupted) is reported by name and the previous one is used instead.
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

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int] | None:
    """(state, data_state, step) of the newest restorable checkpoint (<= step if given), or None."""
    steps = [s for s in self.all_steps() if step is None or s <= step]
    for s in reversed(steps):
      try:
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
