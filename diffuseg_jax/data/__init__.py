"""Datasets: every loader reduces its files to a `DomainData` of 2D slices (see `types.py`).

`load_domain_data(config.data, seed)` dispatches on `config.data.name`. Each dataset module exposes
`load(data_config, seed) -> DomainData` and raises `DataError` (one line naming the file and the problem)
for anything wrong with the user's files.
"""

from __future__ import annotations

import importlib

from diffuseg_jax.data.types import DataSpec, DomainData, Split, VolumeInfo
from diffuseg_jax.errors import ConfigError

# name -> module under diffuseg_jax.data that defines `load(data_config, seed) -> DomainData`.
DATASETS = {
    'mnist_m': 'mnist_m',
    'folder': 'folder',
    'mscmr': 'mscmr',
    'acdc': 'acdc',
    'mmwhs': 'mmwhs',
    'retina': 'retina',
}


def load_domain_data(data_config, seed: int) -> DomainData:
  name = data_config.name
  if name not in DATASETS:
    raise ConfigError(f'config.data.name={name!r} is not one of {sorted(DATASETS)}')
  module = importlib.import_module(f'diffuseg_jax.data.{DATASETS[name]}')
  return module.load(data_config, seed)


__all__ = ['DATASETS', 'DataSpec', 'DomainData', 'Split', 'VolumeInfo', 'load_domain_data']
