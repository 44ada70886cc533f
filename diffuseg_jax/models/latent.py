"""One latent codec for the diffusion and synthesis stages, whatever the latent space is.

Design: `LatentCodec` is a JAX pytree. Its params are the only leaves; kind, module, scaling factor and
shape facts are static. So a codec can be passed straight into a jitted function as an ordinary argument
(`jax.jit(lambda codec, x: codec.encode(x))(codec, x)`): params are traced (never baked in as constants),
and a new codec with the same static part reuses the compiled program. Closing over a codec also works.

  encode(x [B, H, W, C], rng=None) -> z [B, H/f, W/f, latent_channels] float32, z = scaling_factor * latent
      (posterior mean when rng is None, a posterior draw otherwise)
  decode(z) -> x [B, H, W, C] float32
Kinds: 'identity' (pixel space, f = 1, z = scaling_factor * x), 'kl' (`KLAutoencoder` trained here),
'pretrained' (local diffusers FlaxAutoencoderKL through `diffusers_adapter`).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from diffuseg_jax.models import layers
from diffuseg_jax.models.autoencoder import KLAutoencoder, build_kl_autoencoder

Array = jnp.ndarray

KINDS = ('identity', 'kl', 'pretrained')


@struct.dataclass
class LatentCodec:
  """Image <-> diffusion latent. `params` is a pytree leaf set; everything else is static."""

  kind: str = struct.field(pytree_node=False)
  module: nn.Module | None = struct.field(pytree_node=False)
  params: Any
  scaling_factor: float = struct.field(pytree_node=False)
  downsample: int = struct.field(pytree_node=False)
  latent_channels: int = struct.field(pytree_node=False)
  image_channels: int = struct.field(pytree_node=False)

  def _moments(self, x: Array) -> tuple[Array, Array]:
    if x.shape[-1] != self.image_channels:
      raise ValueError(f'{self.kind} latent codec expects {self.image_channels}-channel images, got '
                        f'{x.shape[-1]}')
    if self.kind == 'kl':
      return self.module.apply({'params': self.params}, x, method='encode')
    from diffuseg_jax.models import diffusers_adapter  # only 'pretrained' codecs need diffusers

    return diffusers_adapter.pretrained_ae_encode(self.module, self.params, x)

  def encode(self, x: Array, rng: jax.Array | None = None) -> Array:
    """x [B, H, W, C] -> scaled latent [B, H/f, W/f, latent_channels] float32."""
    if self.kind == 'identity':
      if x.shape[-1] != self.image_channels:
        raise ValueError(f'identity latent codec expects {self.image_channels}-channel images, got '
                          f'{x.shape[-1]}')
      return self.scaling_factor * x.astype(jnp.float32)
    mean, logvar = self._moments(x)
    z = mean if rng is None else layers.gaussian_sample(mean, logvar, rng)
    return self.scaling_factor * z

  def decode(self, z: Array) -> Array:
    """Scaled latent [B, h, w, latent_channels] -> image [B, h * f, w * f, C] float32."""
    z = z.astype(jnp.float32) / self.scaling_factor
    if self.kind == 'identity':
      return z
    if self.kind == 'kl':
      return self.module.apply({'params': self.params}, z, method='decode')
    from diffuseg_jax.models import diffusers_adapter

    return diffusers_adapter.pretrained_ae_decode(self.module, self.params, z)

  def latent_shape(self, image_size: int) -> tuple[int, int, int]:
    """(h, w, latent_channels) of the latent of an image_size x image_size image."""
    if image_size % self.downsample:
      raise ValueError(f'image size {image_size} is not divisible by the latent downsample '
                        f'{self.downsample}')
    return (image_size // self.downsample, image_size // self.downsample, self.latent_channels)


def identity_codec(channels: int, scaling_factor: float = 1.0) -> LatentCodec:
  """Pixel-space 'latents' (tiny images): z = scaling_factor * x."""
  return LatentCodec('identity', None, {}, float(scaling_factor), 1, channels, channels)


def kl_codec(module: KLAutoencoder, params: Any, scaling_factor: float = 1.0) -> LatentCodec:
  """Codec over a trained `KLAutoencoder` (params: its 'params' collection)."""
  return LatentCodec('kl', module, params, float(scaling_factor), module.downsample, module.latent_channels,
                     module.in_channels)


def pretrained_codec(path, scaling_factor: float | None = None, dtype: Any = jnp.float32) -> LatentCodec:
  """Codec over a local diffusers FlaxAutoencoderKL; scaling_factor None: the one in its config (SD: 0.18215)."""
  from diffuseg_jax.models import diffusers_adapter

  module, params = diffusers_adapter.load_pretrained_autoencoder(path, dtype=dtype)
  scale = module.scaling_factor if scaling_factor is None else scaling_factor
  downsample = 2 ** (len(module.block_out_channels) - 1)
  return LatentCodec('pretrained', module, params, float(scale), downsample, module.latent_channels,
                     module.in_channels)


def build_codec(autoencoder_config, channels: int, params: Any = None, dtype: Any = jnp.float32) -> LatentCodec:
  """The codec named by the `autoencoder` config section.

  'kl' needs the trained KLAutoencoder `params`; 'pretrained' reads `autoencoder.path`. A None
  `autoencoder.scaling_factor` means 1 here (identity/kl) or the pretrained config's value; the autoencoder
  stage replaces it by `scaling_factor_for` (1 / std of training latents) when it is None.
  """
  kind = autoencoder_config.kind
  scale = autoencoder_config.scaling_factor
  if kind == 'identity':
    return identity_codec(channels, 1.0 if scale is None else scale)
  if kind == 'kl':
    if params is None:
      raise ValueError("kind='kl' needs trained autoencoder params (run the autoencoder stage)")
    return kl_codec(build_kl_autoencoder(autoencoder_config, channels, dtype), params,
                    1.0 if scale is None else scale)
  if kind == 'pretrained':
    return pretrained_codec(autoencoder_config.path, scale, dtype)
  raise ValueError(f'kind must be one of {", ".join(KINDS)}, got {kind!r}')


def with_scaling_factor(codec: LatentCodec, scaling_factor: float) -> LatentCodec:
  return dataclasses.replace(codec, scaling_factor=float(scaling_factor))


def scaling_factor_for(unscaled_latents: np.ndarray) -> float:
  """LDM's unit-variance rule: 1 / std of the unscaled posterior-mean latents of training images."""
  return float(1.0 / max(np.std(unscaled_latents), 1e-8))  # in the latents' dtype, as every earlier run
