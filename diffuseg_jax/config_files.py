"""Loading `configs/default.py` from a sibling config file, by path.

Config files are loaded by `ml_collections.config_flags` from a path, not imported as a package, so a
dataset config finds `default.py` next to itself: `default = load_sibling(__file__, 'default.py')`. This
works from any current directory and from tests.
"""

from __future__ import annotations

import importlib.util
import pathlib
import types


def load_sibling(config_file: str, name: str = 'default.py') -> types.ModuleType:
  path = pathlib.Path(config_file).with_name(name)
  spec = importlib.util.spec_from_file_location(f'diffuseg_jax_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
