"""Entry point: flags -> `pipeline.run(config, workdir)`.

  python -m diffuseg_jax.main --config=configs/mnist_m.py --workdir=runs/mnist_m
  python -m diffuseg_jax.main --config=configs/mnist_m.py:quick --config.stages=teacher,student

User mistakes (bad override, missing data, invalid value) print one line and exit with status 2; Ctrl-C
saves a checkpoint where one can be made, prints one line and exits with status 130 (a second Ctrl-C exits
at once). README.md "Troubleshooting" lists the messages.
"""

from __future__ import annotations

import difflib
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:variant]).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder; default runs/<config name>[_<variant>].')
_NO_PROGRESS = flags.DEFINE_bool('no_progress', False, 'Disable progress bars.')

RESUME = 'rerun the same command to resume'


def default_workdir(config_arg: str) -> str:
  path, _, variant = config_arg.partition(':')
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join('runs', f'{name}_{variant}' if variant else name)


def main(argv) -> int:
  del argv
  if not flags.FLAGS['config'].present:
    print('error: --config is required, e.g. --config=configs/mnist_m.py (one file per dataset in configs/)',
          file=sys.stderr)
    return 2
  import jax  # after flag parsing: keeps `--help` fast

  from diffuseg_jax import config_validation, distributed, logs, runtime
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
    if 'No such file or directory' in last:
      last = f'file not found: {_config_arg().partition(":")[0]}'
    print(f'error: cannot load --config: {last}', file=sys.stderr)
    return 2
  config_validation.expand_paths(config)
  # A shell leaves `~` after `=` alone: `--workdir=~/runs/x` would otherwise make a folder named `~`.
  workdir = os.path.expanduser(_WORKDIR.value or default_workdir(_config_arg()))
  from diffuseg_jax import pipeline
  from diffuseg_jax.errors import NonFiniteLossError

  # From here on SIGTERM, and a first Ctrl-C, mean "checkpoint and stop" (train/preemption.py).
  preemption.install_handler(interrupt=True)
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
    if not preemption.interrupted():
      print(f'{e}; {RESUME}', file=sys.stderr)
      return 143
    where = f'at step {e.step} of stage {e.stage}' if e.stage else 'outside a training loop (finished outputs are kept)'
    print(f'interrupted {where}; {RESUME}', file=sys.stderr)
    return preemption.INTERRUPTED_EXIT
  return 0


def _config_arg() -> str:
  """--config as given: 'path[:variant]'."""
  return flags.FLAGS['config'].serialize().split('=', 1)[-1]


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, but a bad config path or override is one line and exit 2 (no traceback)."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - config_flags raises many types for user mistakes
    print(f'error: {_describe_flag_error(e, argv)}', file=sys.stderr)
    sys.exit(2)


def _describe_flag_error(e: Exception, argv: list[str]) -> str:
  text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
  text = re.sub(r'^\w+Error: ', '', text)  # config_flags prefixes a config file's own error with its type
  overrides = [arg[2:].split('=', 1) for arg in argv if arg.startswith('--config.')]
  unknown = re.search(r"Unknown command line flag '([^']+)'", text)
  if unknown and not unknown.group(1).startswith('config.'):  # a flag of the command itself, misspelt
    own = sorted((_CONFIG.name, _WORKDIR.name, _NO_PROGRESS.name))
    close = difflib.get_close_matches(unknown.group(1), own, n=1)
    hint = f'did you mean --{close[0]}?' if close else 'flags: ' + ', '.join(f'--{n}' for n in own)
    return f'unknown flag --{unknown.group(1)} ({hint})'
  if isinstance(e, (AttributeError, KeyError)) or 'Unknown command line flag' in text:
    fields = _config_fields(argv)
    for key, *_ in overrides:
      dotted = key[len('config.'):]
      if fields is not None and dotted not in fields:
        close = difflib.get_close_matches(dotted, fields, n=1)
        hint = f'did you mean {close[0]}?' if close else 'configs/default.py lists every field'
        return f'unknown config field {dotted} ({hint})'
    return f'unknown config field in {" ".join("--" + "=".join(o) for o in overrides)}'
  bad = re.match(r'flag --config\.(\S+?)=(.*?): (.*)$', text)
  if bad:
    key, value, why = bad.groups()
    if 'invalid literal for int()' in why:
      why = 'not an integer'
    elif 'could not convert string to float' in why:
      why = 'not a number'
    elif 'Non-boolean argument' in why:
      why = 'not True or False'
    return f'config.{key}={value!r}: {why}'
  return text


def _config_fields(argv: list[str]) -> list[str] | None:
  """The dotted fields of the config named by --config (loaded again without overrides), or None."""
  from diffuseg_jax.config_validation import dotted_fields

  arg = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if arg is None:
    return None
  try:
    return dotted_fields(flags.FLAGS['config'].parser.parse(arg))
  except Exception:  # noqa: BLE001 - a config that does not load has its own message
    return None


def run() -> None:
  try:
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
  except KeyboardInterrupt:  # Ctrl-C before the handler is installed (imports, flag parsing)
    print(f'interrupted before any work started; {RESUME}', file=sys.stderr)
    sys.exit(130)


if __name__ == '__main__':
  run()
