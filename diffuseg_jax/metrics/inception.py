"""InceptionV3 as used for FID (the 2015-12-05 TF graph as ported for PyTorch FID), pool3 features [B, 2048].

The architecture is torchvision's InceptionV3 with the FID-specific blocks: average pools that exclude the
padding (`count_include_pad=False`) in Mixed_5b-d, Mixed_6b-e and Mixed_7b, and a max pool in the pooling
branch of Mixed_7c. Weights are never downloaded; they come from a local `.npz`.

Expected `.npz` layout: one array per variable, keyed by its '/'-joined flax path:
  'params/<Block>[/<branch>]/conv/kernel'  [kh, kw, in, out]
  'params/<Block>[/<branch>]/bn/scale'     [out]   (BatchNorm gamma, eps = 1e-3)
  'params/<Block>[/<branch>]/bn/bias'      [out]   (beta)
  'batch_stats/<Block>[/<branch>]/bn/mean' [out]   (running mean)
  'batch_stats/<Block>[/<branch>]/bn/var'  [out]   (running variance)
e.g. 'params/Conv2d_1a_3x3/conv/kernel', 'params/Mixed_5b/branch5x5_1/bn/scale'. Block and branch names are
torchvision's. `convert_torch_state_dict` builds this from the usual FID state dict (pt_inception weights,
keys 'Conv2d_1a_3x3.conv.weight', 'Mixed_5b.branch1x1.bn.running_mean', ...); the caller loads the `.pth`
into a dict of numpy arrays and saves the result with `np.savez(path, **converted)`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffuseg_jax.errors import UserError

Pad = tuple[tuple[int, int], tuple[int, int]]


def _pad(ph: int, pw: int) -> Pad:
  return ((ph, ph), (pw, pw))


class BasicConv(nn.Module):
  """Conv (no bias) + inference BatchNorm (eps 1e-3) + ReLU, torchvision's BasicConv2d."""

  features: int
  kernel: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Pad = ((0, 0), (0, 0))
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.features, self.kernel, self.strides, padding=self.padding, use_bias=False,
                dtype=self.dtype, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype, name='bn')(x)
    return nn.relu(x)


def _avg3(x: jax.Array) -> jax.Array:
  return nn.avg_pool(x, (3, 3), (1, 1), padding=_pad(1, 1), count_include_pad=False)


class InceptionA(nn.Module):
  pool_features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = lambda f, k, p, name: BasicConv(f, k, padding=p, dtype=self.dtype, name=name)
    b1 = c(64, (1, 1), _pad(0, 0), 'branch1x1')(x)
    b5 = c(48, (1, 1), _pad(0, 0), 'branch5x5_1')(x)
    b5 = c(64, (5, 5), _pad(2, 2), 'branch5x5_2')(b5)
    b3 = c(64, (1, 1), _pad(0, 0), 'branch3x3dbl_1')(x)
    b3 = c(96, (3, 3), _pad(1, 1), 'branch3x3dbl_2')(b3)
    b3 = c(96, (3, 3), _pad(1, 1), 'branch3x3dbl_3')(b3)
    bp = c(self.pool_features, (1, 1), _pad(0, 0), 'branch_pool')(_avg3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv(384, (3, 3), (2, 2), dtype=self.dtype, name='branch3x3')(x)
    bd = BasicConv(64, (1, 1), dtype=self.dtype, name='branch3x3dbl_1')(x)
    bd = BasicConv(96, (3, 3), padding=_pad(1, 1), dtype=self.dtype, name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, (3, 3), (2, 2), dtype=self.dtype, name='branch3x3dbl_3')(bd)
    bp = nn.max_pool(x, (3, 3), (2, 2))
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    c = lambda f, k, p, name: BasicConv(f, k, padding=p, dtype=self.dtype, name=name)
    b1 = c(192, (1, 1), _pad(0, 0), 'branch1x1')(x)
    b7 = c(c7, (1, 1), _pad(0, 0), 'branch7x7_1')(x)
    b7 = c(c7, (1, 7), _pad(0, 3), 'branch7x7_2')(b7)
    b7 = c(192, (7, 1), _pad(3, 0), 'branch7x7_3')(b7)
    bd = c(c7, (1, 1), _pad(0, 0), 'branch7x7dbl_1')(x)
    bd = c(c7, (7, 1), _pad(3, 0), 'branch7x7dbl_2')(bd)
    bd = c(c7, (1, 7), _pad(0, 3), 'branch7x7dbl_3')(bd)
    bd = c(c7, (7, 1), _pad(3, 0), 'branch7x7dbl_4')(bd)
    bd = c(192, (1, 7), _pad(0, 3), 'branch7x7dbl_5')(bd)
    bp = c(192, (1, 1), _pad(0, 0), 'branch_pool')(_avg3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = lambda f, k, p, name, s=(1, 1): BasicConv(f, k, s, p, dtype=self.dtype, name=name)
    b3 = c(192, (1, 1), _pad(0, 0), 'branch3x3_1')(x)
    b3 = c(320, (3, 3), _pad(0, 0), 'branch3x3_2', (2, 2))(b3)
    b7 = c(192, (1, 1), _pad(0, 0), 'branch7x7x3_1')(x)
    b7 = c(192, (1, 7), _pad(0, 3), 'branch7x7x3_2')(b7)
    b7 = c(192, (7, 1), _pad(3, 0), 'branch7x7x3_3')(b7)
    b7 = c(192, (3, 3), _pad(0, 0), 'branch7x7x3_4', (2, 2))(b7)
    bp = nn.max_pool(x, (3, 3), (2, 2))
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (average pool, padding excluded) or Mixed_7c (`max_pool=True`) of the FID network."""

  max_pool: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = lambda f, k, p, name: BasicConv(f, k, padding=p, dtype=self.dtype, name=name)
    b1 = c(320, (1, 1), _pad(0, 0), 'branch1x1')(x)
    b3 = c(384, (1, 1), _pad(0, 0), 'branch3x3_1')(x)
    b3 = jnp.concatenate([c(384, (1, 3), _pad(0, 1), 'branch3x3_2a')(b3),
                          c(384, (3, 1), _pad(1, 0), 'branch3x3_2b')(b3)], axis=-1)
    bd = c(448, (1, 1), _pad(0, 0), 'branch3x3dbl_1')(x)
    bd = c(384, (3, 3), _pad(1, 1), 'branch3x3dbl_2')(bd)
    bd = jnp.concatenate([c(384, (1, 3), _pad(0, 1), 'branch3x3dbl_3a')(bd),
                          c(384, (3, 1), _pad(1, 0), 'branch3x3dbl_3b')(bd)], axis=-1)
    pooled = nn.max_pool(x, (3, 3), (1, 1), padding=_pad(1, 1)) if self.max_pool else _avg3(x)
    bp = c(192, (1, 1), _pad(0, 0), 'branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
  """[B, H, W, 3] images in [-1, 1] -> pool3 features [B, 2048].

  Inputs are bilinearly resized (half-pixel centres, no antialiasing, as torch's F.interpolate) to
  `resize_to` x `resize_to` first; `resize_to=None` skips it (the input must then be at least 75x75).
  """

  resize_to: int | None = 299
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.resize_to is not None:
      b, _, _, ch = x.shape
      x = jax.image.resize(x, (b, self.resize_to, self.resize_to, ch), 'bilinear', antialias=False)
    x = x.astype(self.dtype)
    d = self.dtype
    x = BasicConv(32, (3, 3), (2, 2), dtype=d, name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, (3, 3), dtype=d, name='Conv2d_2a_3x3')(x)
    x = BasicConv(64, (3, 3), padding=_pad(1, 1), dtype=d, name='Conv2d_2b_3x3')(x)
    x = nn.max_pool(x, (3, 3), (2, 2))
    x = BasicConv(80, (1, 1), dtype=d, name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, (3, 3), dtype=d, name='Conv2d_4a_3x3')(x)
    x = nn.max_pool(x, (3, 3), (2, 2))
    x = InceptionA(32, dtype=d, name='Mixed_5b')(x)
    x = InceptionA(64, dtype=d, name='Mixed_5c')(x)
    x = InceptionA(64, dtype=d, name='Mixed_5d')(x)
    x = InceptionB(dtype=d, name='Mixed_6a')(x)
    x = InceptionC(128, dtype=d, name='Mixed_6b')(x)
    x = InceptionC(160, dtype=d, name='Mixed_6c')(x)
    x = InceptionC(160, dtype=d, name='Mixed_6d')(x)
    x = InceptionC(192, dtype=d, name='Mixed_6e')(x)
    x = InceptionD(dtype=d, name='Mixed_7a')(x)
    x = InceptionE(dtype=d, name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, dtype=d, name='Mixed_7c')(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def expected_shapes(model: InceptionV3FID | None = None) -> dict[str, tuple[int, ...]]:
  """'/'-joined variable path -> shape, the layout a weights `.npz` must have."""
  model = model or InceptionV3FID(resize_to=None)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(variables, sep='/').items()}


_BN_KEYS = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
            'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}


def convert_torch_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """PyTorch FID Inception state dict (numpy arrays) -> our `.npz` layout (see module docstring).

  'X.conv.weight' [out, in, kh, kw] -> 'params/X/conv/kernel' [kh, kw, in, out]; 'X.bn.{weight, bias,
  running_mean, running_var}' -> scale / bias / mean / var. 'fc.*', 'AuxLogits.*' and 'num_batches_tracked'
  are not used by pool3 and are dropped.
  """
  out = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    parts = key.split('.')
    if parts[0] in ('fc', 'AuxLogits') or parts[-1] == 'num_batches_tracked':
      continue
    path = '/'.join(parts[:-2])
    if parts[-2] == 'conv' and parts[-1] == 'weight':
      out[f'params/{path}/conv/kernel'] = np.transpose(value, (2, 3, 1, 0)).astype(np.float32)
    elif parts[-2] == 'bn' and parts[-1] in _BN_KEYS:
      collection, name = _BN_KEYS[parts[-1]]
      out[f'{collection}/{path}/bn/{name}'] = value.astype(np.float32)
    else:
      raise ValueError(f'unexpected key in the Inception state dict: {key}')
  return out


def load_variables(path: str, model: InceptionV3FID | None = None) -> dict:
  """Variables {'params', 'batch_stats'} from a `.npz` in our layout; UserError naming the file otherwise."""
  if not os.path.isfile(path):
    raise UserError(f'eval.inception_path: {path} does not exist')
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {k: np.asarray(npz[k]) for k in npz.files}
  except Exception as e:  # any unreadable file is the same user error
    raise UserError(f'eval.inception_path: {path} is not a readable .npz of arrays ({type(e).__name__}); '
                    'convert PyTorch FID weights with metrics.inception.convert_torch_state_dict') from None
  want = expected_shapes(model)
  missing = sorted(set(want) - set(arrays))
  if missing:
    raise UserError(f'eval.inception_path: {path} lacks {len(missing)} Inception arrays, e.g. {missing[0]!r}')
  for k, shape in want.items():
    if arrays[k].shape != shape:
      raise UserError(f'eval.inception_path: {path}: {k} has shape {arrays[k].shape}, expected {shape}')
  flat = {tuple(k.split('/')): jnp.asarray(arrays[k], jnp.float32) for k in want}
  return traverse_util.unflatten_dict(flat)


def make_inception_fn(path: str, resize_to: int | None = 299) -> Callable[[jax.Array], jax.Array]:
  """Jitted [B, H, W, 3] in [-1, 1] -> [B, 2048] with the weights in `path` bound in."""
  model = InceptionV3FID(resize_to=resize_to)
  variables = load_variables(path, model)
  apply = jax.jit(model.apply)  # weights passed as arguments, not baked into the program as constants
  return lambda x: apply(variables, x)
