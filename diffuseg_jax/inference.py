"""Batched, sharded inference over host arrays, and the jitted apply functions of the trained networks.

`batched_apply` pads to the batch, shards on 'data' and gathers back to numpy. Every process holds the same
host arrays (datasets are loaded on each process), so a global batch is built with `jax.device_put` and
outputs are gathered with `process_allgather` when they span processes.

The apply functions below are jitted once at import with the linen module as a static argument, so each is
compiled once per (network, input shape) and reused by every stage, strategy and seed of a run:
  segment_labels(x, params, model=SegUNet)        int32 [B, H, W]   argmax of the segmentation logits
  segment_labels_and_confidence(x, params, model=SegUNet)  {'label', 'confidence' (its softmax probability)}
  ffd_vae_labels(x, params, model=FFDVAE)          int32 [B, H, W]   the FFD-VAE's segmentation head (pseudo-labels)
  ffd_vae_outputs(x, params, model=FFDVAE)         dict: seg, recon, dom_mean, dom_logvar (posterior means)
  domain_codes(x, params, model=FFDVAE)            float [B, D]      z_dom posterior means
  encode(x, codec) / decode(z, codec)              latents <-> images through a `LatentCodec`
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from diffuseg_jax.train import sharding


@functools.partial(jax.jit, static_argnames='model')
def segment_labels(x: jax.Array, params, *, model) -> jax.Array:
  return jnp.argmax(model.apply({'params': params}, x), -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames='model')
def segment_labels_and_confidence(x: jax.Array, params, *, model) -> dict[str, jax.Array]:
  """{'label': argmax int32 [B, H, W], 'confidence': its softmax probability float32 [B, H, W]}."""
  probs = jax.nn.softmax(model.apply({'params': params}, x).astype(jnp.float32), axis=-1)
  return {'label': jnp.argmax(probs, -1).astype(jnp.int32), 'confidence': jnp.max(probs, -1)}


@functools.partial(jax.jit, static_argnames='model')
def ensemble_labels(x: jax.Array, params_list, *, model) -> jax.Array:
  """argmax of the mean softmax of one segmenter architecture under each params in `params_list`: int32
  [B, H, W] (the seeds of a strategy voting as one labeller)."""
  probs = sum(jax.nn.softmax(model.apply({'params': p}, x).astype(jnp.float32), axis=-1) for p in params_list)
  return jnp.argmax(probs, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames='model')
def ffd_vae_labels(x: jax.Array, params, *, model) -> jax.Array:
  return jnp.argmax(model.apply({'params': params}, x, sample=False)['seg_logits'], -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames='model')
def ffd_vae_outputs(x: jax.Array, params, *, model) -> dict[str, jax.Array]:
  out = model.apply({'params': params}, x, sample=False)
  return {'seg': jnp.argmax(out['seg_logits'], -1).astype(jnp.int32), 'recon': out['recon'],
          'dom_mean': out['dom_mean'], 'dom_logvar': out['dom_logvar']}


@functools.partial(jax.jit, static_argnames='model')
def domain_codes(x: jax.Array, params, *, model) -> jax.Array:
  return model.apply({'params': params}, x, method='encode_dom')[0]


@jax.jit
def encode(x: jax.Array, codec) -> jax.Array:
  return codec.encode(x)


@jax.jit
def decode(z: jax.Array, codec) -> jax.Array:
  return codec.decode(z)


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
