"""KL autoencoder: the latent space of the diffusion model when it is trained here (autoencoder.kind='kl').

A small LDM-style first stage (Rombach et al.): a diagonal-Gaussian posterior at 1/f resolution with a weak
KL pull to N(0, I), so latents stay near unit scale and decode smoothly.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffuseg_jax.models import layers

Array = jnp.ndarray


class KLAutoencoder(nn.Module):
  """encode: x [B, H, W, in_channels] -> (mean, logvar) [B, H/f, W/f, latent_channels] float32;
  decode: z [B, H/f, W/f, latent_channels] -> x [B, H, W, in_channels] float32 (linear output).
  f = `downsample`, a power of two >= 2; H, W divisible by f. Params float32; compute in `dtype`.
  """

  in_channels: int
  latent_channels: int = 4
  base_channels: int = 32
  downsample: int = 4
  dtype: Any = jnp.float32

  def __post_init__(self):
    f = self.downsample
    if not isinstance(f, int) or f < 2 or f & (f - 1):
      raise ValueError(f'downsample must be a power of two >= 2, got {f!r}')
    super().__post_init__()

  @property
  def levels(self) -> int:
    return self.downsample.bit_length() - 1

  def setup(self):
    channels = layers.level_channels(self.base_channels, self.levels)
    self.encoder = layers.ConvEncoder(channels, dtype=self.dtype)
    self.moments = layers.conv3x3(2 * self.latent_channels, self.dtype, 'moments')
    self.decoder = layers.ConvDecoder(channels, self.in_channels, dtype=self.dtype)

  def encode(self, x: Array) -> tuple[Array, Array]:
    if x.shape[1] % self.downsample or x.shape[2] % self.downsample:
      raise ValueError(f'image size {x.shape[1]}x{x.shape[2]} is not divisible by downsample = '
                        f'{self.downsample}')
    return layers.split_moments(self.moments(self.encoder(x)))

  def decode(self, z: Array) -> Array:
    return self.decoder(z)

  def __call__(self, x: Array, sample: bool = True) -> dict[str, Array]:
    """-> dict(recon, mean, logvar, z); z is a posterior draw (rng stream 'latent') or the mean."""
    mean, logvar = self.encode(x)
    z = layers.gaussian_sample(mean, logvar, self.make_rng('latent')) if sample else mean
    return {'recon': self.decode(z), 'mean': mean, 'logvar': logvar, 'z': z}


def build_kl_autoencoder(autoencoder_config, channels: int, dtype: Any = jnp.float32) -> KLAutoencoder:
  """KLAutoencoder from the `autoencoder` config section; `channels` is the image channel count."""
  return KLAutoencoder(
      in_channels=channels,
      latent_channels=autoencoder_config.latent_channels,
      base_channels=autoencoder_config.base_channels,
      downsample=autoencoder_config.downsample,
      dtype=dtype,
  )
