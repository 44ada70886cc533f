"""Python logging to `<workdir>/log.txt` (process 0), so a run's history survives the terminal.

log.txt holds this project's lines and every library's warnings; the libraries' INFO lines (orbax writes
a dozen per checkpoint, and made 97% of log.txt) go to `<workdir>/debug.log` with everything else, for
the rare question that needs them. The terminal gets our prints and warnings only.
"""

from __future__ import annotations

import logging
import os
import warnings

import jax

_handlers: list[logging.Handler] = []
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


def ours_or_warning(record: logging.LogRecord) -> bool:
  """log.txt's filter: this project's records, and anyone's warnings and errors."""
  return record.name.split('.')[0] == log.name or record.levelno >= logging.WARNING


def setup(workdir: str) -> None:
  warnings.filterwarnings('ignore', message='.*Flax classes are deprecated.*')
  quiet_terminal()
  if jax.process_index() != 0:
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    main = logging.FileHandler(os.path.join(workdir, 'log.txt'))
    debug = logging.FileHandler(os.path.join(workdir, 'debug.log'))
  except OSError:
    return  # the pipeline reports an unwritable workdir with a clear error
  main.addFilter(ours_or_warning)
  root = logging.getLogger()
  for handler in _handlers:  # a second run in the same process logs to its own workdir only
    root.removeHandler(handler)
    handler.close()
  _handlers[:] = [main, debug]
  for handler in _handlers:
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
    root.addHandler(handler)
  root.setLevel(logging.INFO)
