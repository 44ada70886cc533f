"""Config files (`configs/*.py`): loading them by name or path, and their variants.

Config files are loaded by `ml_collections.config_flags` from a path, not imported as a package, so a
dataset config finds `default.py` next to itself: `default = load_sibling(__file__, 'default.py')`. This
works from any current directory and from tests. Everything else (tests, benchmarks) loads a config with
`load_config('mscmr', 'quick')` (or 'mscmr:quick', or a path), as `--config=configs/mscmr.py:quick` would.

Every config's `get_config(arg=None)` takes a variant: None, '' or 'full' is the base config, any other
`arg` names a function that changes it in place (`apply_variant`).
"""

from __future__ import annotations

import importlib.util
import pathlib
import types
from collections.abc import Callable, Mapping

import ml_collections

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'
BASE_VARIANTS = (None, '', 'full')

Variant = Callable[[ml_collections.ConfigDict], None]


def _load_module(path: pathlib.Path) -> types.ModuleType:
  spec = importlib.util.spec_from_file_location(f'diffuseg_jax_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sibling(config_file: str, name: str = 'default.py') -> types.ModuleType:
  """The config module `name` in the folder of `config_file` (a config's own `__file__`)."""
  return _load_module(pathlib.Path(config_file).with_name(name))


def config_path(name_or_path: str) -> pathlib.Path:
  """`configs/<name>.py` of this repository for a bare name ('mscmr'); any other string is a path, as is."""
  if pathlib.Path(name_or_path).name == name_or_path and not name_or_path.endswith('.py'):
    return CONFIG_DIR / f'{name_or_path}.py'
  return pathlib.Path(name_or_path)


def load_config_module(name_or_path: str) -> types.ModuleType:
  """The module of a config file (for its docstring or variant functions), by name or path."""
  return _load_module(config_path(name_or_path))


def load_config(name_or_path: str, variant: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(variant)` of a config file, like `--config=<path>[:variant]` on the command line.

  `name_or_path`: a bare name ('mscmr': configs/mscmr.py of this repository), a path, or either with
  ':variant' appended ('mscmr:quick'); a variant given both ways is a ValueError. Without a variant,
  `get_config()` is called with no argument (as config_flags does).
  """
  name_or_path, sep, suffix = name_or_path.partition(':')
  if sep:
    if variant is not None:
      raise ValueError(f'variant given twice: {name_or_path}:{suffix} and variant={variant!r}')
    variant = suffix
  module = load_config_module(name_or_path)
  return module.get_config() if variant is None else module.get_config(variant)


def apply_variant(config: ml_collections.ConfigDict, arg: str | None, variants: Mapping[str, Variant],
                  file: str) -> ml_collections.ConfigDict:
  """`config` as the variant `arg` of the config file `file` (its `__file__`) wants it.

  None, '' and 'full' leave `config` as it is; a key of `variants` applies that function to `config` (in
  place); anything else raises ValueError naming the choices. Returns `config`.
  """
  if arg in BASE_VARIANTS:
    return config
  if arg not in variants:
    choices = ', '.join(['full', *variants])
    raise ValueError(f'unknown variant {arg!r} of configs/{pathlib.Path(file).name} (choose from {choices})')
  variants[arg](config)
  return config
