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
  import jax  # after flag parsing: keeps `--help` fast

  from diffuseg_jax import distributed, logs, runtime
  from diffuseg_jax.errors import UserError
  from diffuseg_jax.train import preemption

  logs.quiet_terminal()
  runtime.configure()
  try:
    distributed.maybe_initialize()
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  try:
    config = _CONFIG.value
    config.seed  # noqa: B018 - config_flags defers a load failure until first access
  except Exception as e:  # noqa: BLE001
    last = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
    print(f'error: cannot load --config: {last}', file=sys.stderr)
    return 2
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS['config'].serialize().split('=', 1)[-1])
  from diffuseg_jax import pipeline
  from diffuseg_jax.errors import NonFiniteLossError

  preemption.install_handler()  # from here on SIGTERM means "checkpoint and stop" (train/preemption.py)
  try:
    # Progress bars from process 0 only: the others would print the same bars again.
    pipeline.run(config, workdir, show_progress=not _NO_PROGRESS.value and jax.process_index() == 0)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except NonFiniteLossError as e:
    print(f'error: {e}', file=sys.stderr)
    return 3
  except preemption.Preempted as e:
    print(f'{e}; rerun the same command to resume', file=sys.stderr)
    return 143
  return 0


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, but a bad config path or override is one line and exit 2 (no traceback)."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - config_flags raises many types for user mistakes
    print(f'error: {_describe_flag_error(e, argv)}', file=sys.stderr)
    sys.exit(2)


def _describe_flag_error(e: Exception, argv: list[str]) -> str:
  text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
  if isinstance(e, (AttributeError, KeyError)):
    name = text.strip('\'"')
    for arg in argv:
      key = arg.split('=', 1)[0]
      if key.startswith('--config.') and key.split('.')[-1] == name:
        return f'unknown config field in {key}: {name!r} does not exist in that section'
    return f'unknown config field {name!r}'
  return text


def run() -> None:
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)


if __name__ == '__main__':
  run()
