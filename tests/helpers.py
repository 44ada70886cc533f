"""Shared test helpers: configs and a pipeline Context in a temp workdir."""

from __future__ import annotations

import os

from diffuseg_jax.config_files import load_sibling
from diffuseg_jax.context import Context
from diffuseg_jax.train.sharding import make_mesh

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def tiny_config(variant: str | None = None):
  return load_sibling(os.path.join(CONFIGS, 'test.py'), 'test.py').get_config(variant)


def make_context(config, workdir) -> Context:
  os.makedirs(workdir, exist_ok=True)
  return Context(config=config, workdir=str(workdir), mesh=make_mesh(config.mesh), show_progress=False)
