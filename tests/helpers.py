"""Shared test helpers: configs and a pipeline Context in a temp workdir."""

from __future__ import annotations

import os
import re

from diffuseg_jax.config_files import load_config
from diffuseg_jax.context import Context
from diffuseg_jax.train.sharding import make_mesh


def tiny_config(variant: str | None = None):
  """configs/test.py's get_config(variant)."""
  return load_config('test', variant)


def make_context(config, workdir) -> Context:
  os.makedirs(workdir, exist_ok=True)
  return Context(config=config, workdir=str(workdir), mesh=make_mesh(config.mesh), show_progress=False)


def unit_path(workdir, unit: str) -> str | None:
  """The newest fingerprint folder of `unit` in a workdir (units.py), or None before it exists."""
  from diffuseg_jax import units

  fps = units.kept_fingerprints(str(workdir), unit)
  return units.unit_dir(str(workdir), unit, fps[-1]) if fps else None


def subprocess_env(devices: int, **extra: str) -> dict[str, str]:
  """The environment of a `python -m diffuseg_jax.main` subprocess: CPU with `devices` devices and this
  session's XLA flags (tests/conftest.py: the fast-compile flags), `extra` variables on top."""
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', os.environ.get('XLA_FLAGS', '')).split()
  flags.append(f'--xla_force_host_platform_device_count={devices}')
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ' '.join(flags), **extra}
