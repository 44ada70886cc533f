"""Batched, sharded inference over host arrays: pad to the batch, shard on 'data', gather back to numpy.

Every process holds the same host arrays (datasets are loaded on each process), so a global batch is built
with `jax.device_put` and outputs are gathered with `process_allgather` when they span processes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from diffuseg_jax.train import sharding


def batched_apply(
    fn: Callable, arrays: dict[str, np.ndarray] | np.ndarray, batch_size: int, mesh, *, desc: str | None = None,
    show_progress: bool = False, args: tuple = (),
):
  """Apply jitted `fn(batch, *args) -> pytree of [B, ...]` to all rows; returns numpy [N, ...] pytree.

  `args` (e.g. parameters) are passed as arguments, never baked into the program as constants.

  `batch_size` is rounded up to a multiple of the 'data' axis; the last batch is padded (outputs cut).
  """
  single = not isinstance(arrays, dict)
  if single:
    arrays = {'x': arrays}
  n = len(next(iter(arrays.values())))
  ndev = mesh.shape['data']
  bs = max(ndev, -(-batch_size // ndev) * ndev)
  batch_sh = sharding.batch_sharding(mesh)
  args = jax.device_put(args, sharding.replicated(mesh))  # e.g. params loaded on one device
  outs = []
  for start in tqdm(range(0, n, bs), desc=desc, disable=not show_progress or desc is None, leave=False):
    rows = np.arange(start, min(start + bs, n))
    idx = np.concatenate([rows, np.full(bs - len(rows), rows[-1])])
    batch = {k: jax.device_put(np.asarray(v[idx]), batch_sh) for k, v in arrays.items()}
    out = fn(batch['x'] if single else batch, *args)
    out = jax.tree.map(_to_host, out)
    outs.append(jax.tree.map(functools.partial(_head, n=len(rows)), out))
  if not outs:
    raise ValueError('batched_apply: no rows')
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *outs)


def _head(x, n: int):
  return x[:n]


def _to_host(x):
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
