"""Python logging to `<workdir>/log.txt` (process 0), so a run's history survives the terminal."""

from __future__ import annotations

import logging
import os
import warnings

import jax

_handler: logging.Handler | None = None
log = logging.getLogger('diffuseg_jax')


def quiet_terminal() -> None:
  """The terminal gets our prints and warnings only (not absl/JAX INFO lines such as backend probing)."""
  from absl import logging as absl_logging

  absl_logging.get_absl_handler().setLevel(logging.WARNING)


def say(msg: str) -> None:
  """A progress line for the user: printed by process 0 only (the others would repeat it) and logged."""
  if jax.process_index() == 0:
    print(msg, flush=True)
    log.info(msg)


def setup(workdir: str) -> None:
  warnings.filterwarnings('ignore', message='.*Flax classes are deprecated.*')
  quiet_terminal()
  if jax.process_index() != 0:
    return
  global _handler
  try:
    os.makedirs(workdir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(workdir, 'log.txt'))
  except OSError:
    return  # the pipeline reports an unwritable workdir with a clear error
  handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
  root = logging.getLogger()
  if _handler is not None:  # a second run in the same process logs to its own workdir only
    root.removeHandler(_handler)
    _handler.close()
  _handler = handler
  root.addHandler(handler)
  root.setLevel(logging.INFO)
