"""Local pretrained diffusers Flax weights (e.g. a Stable Diffusion VAE / UNet directory), behind NHWC APIs.

This is the only module that imports diffusers. Its Flax classes are NCHW at the boundary and log a
deprecation notice every time a module is set up (i.e. on every trace); the notice is silenced here so that
loading and calling print nothing. Nothing is ever downloaded: `from_pretrained(..., local_files_only=True)`.

Layout: `path` is either the model directory itself (config.json + diffusion_flax_model.msgpack) or a Stable
Diffusion pipeline root holding it in `vae/` (autoencoder) or `unet/` (UNet).
"""

import contextlib
import json
import os
import warnings
from typing import Any

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange
from flax.traverse_util import flatten_dict

from diffuseg_jax.errors import UserError
from diffuseg_jax.models.cond_unet import select_condition
from diffuseg_jax.models.layers import fused_attention

# Before the Flax classes are first touched: importing them already logs the notice.
diffusers.utils.logging.set_verbosity_error()
warnings.filterwarnings('ignore', message='.*Flax classes are deprecated.*')
FlaxAutoencoderKL = diffusers.FlaxAutoencoderKL
FlaxUNet2DConditionModel = diffusers.FlaxUNet2DConditionModel
from diffusers.models.attention_flax import FlaxAttention  # noqa: E402 - after the notice is silenced

Array = jnp.ndarray
Params = Any

_WEIGHTS = 'diffusion_flax_model.msgpack'
_TORCH_WEIGHTS = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')


def _convert_command(model_dir: str, subfolder: str) -> str:
  """A one-line shell command that writes Flax weights next to a diffusers PyTorch checkpoint."""
  cls = 'FlaxAutoencoderKL' if subfolder == 'vae' else 'FlaxUNet2DConditionModel'
  return (f'python -c "from diffusers import {cls} as M; m, p = M.from_pretrained(\'{model_dir}\', from_pt=True); '
          f'm.save_pretrained(\'{model_dir}\', params=p)"')


def _model_dir(path, subfolder: str, field: str) -> str:
  """The directory holding config.json + Flax weights: `path` itself or `path/subfolder`."""
  if path is None:
    raise UserError(f'{field} is not set: give a local diffusers Flax model directory')
  path = os.fspath(os.path.expanduser(path))
  for candidate in (path, os.path.join(path, subfolder)):
    if os.path.isfile(os.path.join(candidate, 'config.json')):
      if not os.path.isfile(os.path.join(candidate, _WEIGHTS)):
        torch = [f for f in _TORCH_WEIGHTS if os.path.isfile(os.path.join(candidate, f))]
        if torch:
          raise UserError(f'{field}={path}: {candidate} holds PyTorch weights ({torch[0]}) but no {_WEIGHTS}; '
                          f'convert them once, where torch is installed: {_convert_command(candidate, subfolder)}')
        raise UserError(f'{field}={path}: {candidate} has no {_WEIGHTS} (Flax weights are required)')
      return candidate
  if not os.path.isdir(path):
    raise UserError(f'{field}={path}: directory not found')
  raise UserError(f'{field}={path}: no config.json in it or in its {subfolder}/ folder')


def _load(cls, path, subfolder: str, field: str, dtype, param_dtype) -> tuple[nn.Module, Params]:
  model_dir = _model_dir(path, subfolder, field)
  try:
    module, params = cls.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
  except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f'{field}={path}: cannot load a {cls.__name__} from {model_dir}: {reason}') from None
  required = flatten_dict(jax.eval_shape(module.init_weights, jax.random.key(0)))
  have = flatten_dict(params)
  missing = sorted('/'.join(k) for k in required if k not in have)
  if missing:
    raise UserError(f'{field}={path}: {len(missing)} weights missing from {model_dir}, e.g. {missing[0]}')
  params = jax.tree.map(
      lambda a: jnp.asarray(a, param_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else jnp.asarray(a), params)
  return module, params


def load_pretrained_autoencoder(path, dtype: Any = jnp.float32,
                                param_dtype: Any = jnp.float32) -> tuple[FlaxAutoencoderKL, Params]:
  """(module, params) of a local FlaxAutoencoderKL; `dtype` is the compute dtype. Bad path -> UserError."""
  return _load(FlaxAutoencoderKL, path, 'vae', 'autoencoder.path', dtype, param_dtype)


def load_pretrained_unet(path, dtype: Any = jnp.float32,
                         param_dtype: Any = jnp.float32) -> tuple[FlaxUNet2DConditionModel, Params]:
  """(module, params) of a local FlaxUNet2DConditionModel; `dtype` is the compute dtype. Bad path -> UserError."""
  return _load(FlaxUNet2DConditionModel, path, 'unet', 'diffusion.pretrained_unet_path', dtype, param_dtype)


def pretrained_ae_encode(module: FlaxAutoencoderKL, params: Params, x: Array) -> tuple[Array, Array]:
  """x [B, H, W, C] -> posterior (mean, logvar) [B, H/f, W/f, latent_channels] float32 (unscaled latents).

  Sampling (mean + exp(logvar / 2) * eps) is left to the caller, like every other encoder here.
  """
  out = module.apply({'params': params}, rearrange(x, 'b h w c -> b c h w'), method='encode')
  dist = out.latent_dist
  return dist.mean.astype(jnp.float32), dist.logvar.astype(jnp.float32)  # diffusers keeps moments NHWC


def pretrained_ae_decode(module: FlaxAutoencoderKL, params: Params, z: Array) -> Array:
  """z [B, h, w, latent_channels] (unscaled) -> x [B, h * f, w * f, out_channels] float32."""
  out = module.apply({'params': params}, z, method='decode')  # NHWC latents are accepted as is
  return rearrange(out.sample, 'b c h w -> b h w c').astype(jnp.float32)


ATTENTION = ('fused', 'diffusers')


def _fused_diffusers_attention(next_fun, args, kwargs, context):
  """An `nn.intercept_methods` hook: diffusers' `FlaxAttention.__call__` with its own projections and weights,
  but the attention itself through `layers.fused_attention` (cuDNN's flash attention on a GPU in bfloat16)
  instead of diffusers' einsums, which materialise [B * heads, T, S] scores and probabilities: 2 x 64 GiB at
  batch 256 on SD's 64x64 latents. Every other method runs unchanged."""
  module = context.module
  if context.method_name != '__call__' or not isinstance(module, FlaxAttention):
    return next_fun(*args, **kwargs)
  names = ('hidden_states', 'context', 'deterministic')
  call = {**dict(zip(names[:len(args)], args, strict=True)), **kwargs}
  hidden = call['hidden_states']
  ctx = hidden if call.get('context') is None else call['context']
  split = lambda proj, x: rearrange(proj(x), 'b t (n d) -> b t n d', n=module.heads)  # diffusers' head order
  out = fused_attention(split(module.query, hidden), split(module.key, ctx), split(module.value, ctx),
                        scale=module.scale)
  out = module.proj_attn(rearrange(out, 'b t n d -> b t (n d)'))
  return module.dropout_layer(out, deterministic=call.get('deterministic', True))


class PretrainedCondUNet(nn.Module):
  """A diffusers FlaxUNet2DConditionModel driven by z_dom; same call as `CondUNet`.

  `__call__(x_t [B, h, w, C], t [B] or scalar, z_dom [B, cond_dim], drop_cond [B] bool | None)
  -> eps [B, h, w, C]` float32. z_dom (or the learned null `null_cond` [cond_dim] where drop_cond) is mapped
  by a trainable MLP to num_cond_tokens tokens of width cross_attention_dim, which replace the text
  embeddings. Parameter tree: {'null_cond', 'cond_tokens_0', 'cond_tokens_1', 'cond_tokens_norm', 'unet'};
  build it with `init_pretrained_cond_unet` so the pretrained weights are not re-initialised.
  `attention='fused'` computes the UNet's attention layers through `layers.fused_attention` (same weights, same
  result to rounding; see `_fused_diffusers_attention`), 'diffusers' with the UNet's own code (its einsums, or
  its query-chunked loop where the module was built with use_memory_efficient_attention).
  """

  unet: nn.Module  # a FlaxUNet2DConditionModel (from load_pretrained_unet)
  cond_dim: int = 16
  num_cond_tokens: int = 4
  dtype: Any = jnp.float32
  attention: str = 'fused'  # fused | diffusers

  @nn.compact
  def embed_condition(self, z_dom: Array, drop_cond: Array | None = None) -> Array:
    """[B, cond_dim] (+ [B] bool) -> context tokens [B, num_cond_tokens, cross_attention_dim]."""
    if z_dom.shape[-1] != self.cond_dim:
      raise ValueError(f'z_dom has width {z_dom.shape[-1]}, expected cond_dim={self.cond_dim}')
    null_cond = self.param('null_cond', nn.initializers.normal(1.0), (self.cond_dim,), jnp.float32)
    cond = select_condition(z_dom, null_cond, drop_cond).astype(self.dtype)
    width = self.unet.cross_attention_dim
    c = nn.Dense(width, dtype=self.dtype, name='cond_tokens_0')(cond)
    c = nn.Dense(self.num_cond_tokens * width, dtype=self.dtype, name='cond_tokens_1')(nn.silu(c))
    c = rearrange(c, 'b (n d) -> b n d', n=self.num_cond_tokens)
    return nn.LayerNorm(dtype=self.dtype, name='cond_tokens_norm')(c)

  def __call__(self, x_t: Array, t: Array, z_dom: Array, drop_cond: Array | None = None) -> Array:
    if x_t.shape[-1] != self.unet.in_channels:
      raise ValueError(f'latent has {x_t.shape[-1]} channels but the pretrained UNet expects '
                        f'{self.unet.in_channels} latent channels')
    if self.attention not in ATTENTION:
      raise ValueError(f'attention={self.attention!r}: expected one of {ATTENTION}')
    context = self.embed_condition(z_dom, drop_cond)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_t.shape[0],))
    fused = self.attention == 'fused'
    with nn.intercept_methods(_fused_diffusers_attention) if fused else contextlib.nullcontext():
      out = self.unet(rearrange(x_t, 'b h w c -> b c h w'), t, context.astype(self.unet.dtype))
    return rearrange(out.sample, 'b c h w -> b h w c').astype(jnp.float32)


def init_pretrained_cond_unet(module: PretrainedCondUNet, unet_params: Params, rng) -> dict[str, Params]:
  """Variables {'params': ...} of `module`: fresh condition projection + the given pretrained UNet params."""
  z = jnp.zeros((1, module.cond_dim), jnp.float32)
  own = jax.jit(lambda k: module.init(k, z, method='embed_condition')['params'])(rng)
  return {'params': {**own, 'unet': unet_params}}
