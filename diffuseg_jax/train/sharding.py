"""One device mesh for the whole run: batch sharded on 'data', parameters replicated.

Every process feeds its own rows (`jax.make_array_from_process_local_data`), so the same code runs on one
CPU, 8 forced CPU devices, a multi-GPU node or many hosts. `param_sharding` is the hook for FSDP-style
rules later; today it replicates.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffuseg_jax.errors import ConfigError


def make_mesh(mesh_config) -> Mesh:
  axes = [tuple(a) for a in mesh_config.axes]
  names = tuple(a[0] for a in axes)
  sizes = [int(a[1]) for a in axes]
  devices = jax.devices()
  if sizes.count(-1) > 1:
    raise ConfigError(f'config.mesh.axes={axes}: at most one axis may be -1')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ConfigError(f'config.mesh.axes={axes} does not divide {len(devices)} devices')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ConfigError(f'config.mesh.axes={axes} needs {math.prod(sizes)} devices, found {len(devices)}')
  return Mesh(np.asarray(devices).reshape(sizes), names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_sharding(mesh: Mesh, params_shape):
  """Sharding tree for parameters (replicated; the place for FSDP-style rules)."""
  return jax.tree.map(lambda _: replicated(mesh), params_shape)


def check_batch_size(global_batch: int, mesh: Mesh, what: str) -> None:
  n = mesh.shape['data']
  if global_batch % n or global_batch % jax.process_count():
    raise ConfigError(
        f'{what}={global_batch} must be divisible by the {n} data-parallel devices '
        f'and {jax.process_count()} processes'
    )


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Per-process numpy batch -> global jax.Arrays sharded on 'data'."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
