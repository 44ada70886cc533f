"""Entry point: flags -> `pipeline.run(config, workdir)`.

  python -m diffuseg_jax.main --config=configs/mnist_m.py --workdir=runs/mnist_m
  python -m diffuseg_jax.main --config=configs/mnist_m.py:quick --config.stages=teacher,student

User mistakes (bad override, missing data, invalid value) print one line and exit with status 2.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:variant]).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder; default runs/<config name>[_<variant>].')
_NO_PROGRESS = flags.DEFINE_bool('no_progress', False, 'Disable progress bars.')


def default_workdir(config_arg: str) -> str:
  path, _, variant = config_arg.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('runs', f'{name}_{variant}' if variant else name)


def main(argv) -> int:
  del argv
  from diffuseg_jax import distributed, logs  # after flag parsing: keeps `--help` fast

  distributed.maybe_initialize()
  config = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS['config'].serialize().split('=', 1)[-1])
  logs.setup(workdir)
  from diffuseg_jax import pipeline
  from diffuseg_jax.errors import NonFiniteLossError, UserError
  from diffuseg_jax.train.preemption import Preempted

  try:
    pipeline.run(config, workdir, show_progress=not _NO_PROGRESS.value)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except NonFiniteLossError as e:
    print(f'error: {e}', file=sys.stderr)
    return 3
  except Preempted as e:
    print(f'{e}; rerun the same command to resume', file=sys.stderr)
    return 143
  return 0


def run() -> None:
  try:
    app.run(lambda argv: sys.exit(main(argv)))
  except flags.Error as e:  # unknown/invalid override raised outside app.run's handler
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  run()
