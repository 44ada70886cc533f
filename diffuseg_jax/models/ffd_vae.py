"""FFD-VAE: the two-factor VAE of paper section III-B (Fig. 3, eq. 4-5).

  VEnc_theta(x) -> q(z_seg | x): spatial latent [B, H/2^L, W/2^L, z_seg_channels]   (anatomy factor)
  VEnc_phi(x)   -> q(z_dom | x): global vector  [B, z_dom_dim]                      (domain/appearance factor)
  seg decoder(z_seg)           -> logits [B, H, W, num_classes]
  VDec_phi(z_seg, z_dom)       -> recon  [B, H, W, out_channels] (linear output; images live in [-1, 1])

The segmentation head sees z_seg only, so the segmentation cannot depend on z_dom by construction. z_dom
FiLM-modulates every ResBlock of the image decoder (through a small MLP), so appearance must flow through it.
The teacher S and the student T are two instances of this module.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffuseg_jax.models import layers

Array = jnp.ndarray


class _Encoder(nn.Module):
  """Conv features -> (mean, logvar), float32. Spatial (VEnc_theta, z_seg): a 3x3 conv, [B, H/2^L, W/2^L, out];
  global (VEnc_phi, z_dom): global average pool -> Dense, [B, out]."""

  channels: tuple[int, ...]
  out: int
  spatial: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    h = layers.ConvEncoder(self.channels, dtype=self.dtype, name='features')(x)
    if self.spatial:
      return layers.split_moments(layers.conv3x3(2 * self.out, self.dtype, 'moments')(h))
    h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
    return layers.split_moments(nn.Dense(2 * self.out, dtype=self.dtype, name='moments')(h))


class _ImageDecoder(nn.Module):
  """VDec_phi(z_seg, z_dom): z_dom -> MLP -> FiLM of every decoder ResBlock."""

  channels: tuple[int, ...]
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z_seg: Array, z_dom: Array) -> Array:
    width = 4 * self.channels[0]
    emb = nn.Dense(width, dtype=self.dtype, name='dom_mlp_0')(z_dom.astype(self.dtype))
    emb = nn.Dense(width, dtype=self.dtype, name='dom_mlp_1')(nn.silu(emb))
    return layers.ConvDecoder(self.channels, self.out_channels, dtype=self.dtype, name='decoder')(z_seg, emb)


class FFDVAE(nn.Module):
  """Feature-factorised VAE. Params float32; compute in `dtype`; every output is float32.

  `__call__(x [B, H, W, C], sample)` -> dict(seg_logits, recon, seg_mean, seg_logvar, z_seg, dom_mean,
  dom_logvar, z_dom). With sample=True the latents are reparameterised draws (rng stream 'latent'),
  otherwise the posterior means. H and W must be divisible by 2^levels.
  """

  num_classes: int
  out_channels: int
  base_channels: int = 32
  levels: int = 2
  z_seg_channels: int = 8
  z_dom_dim: int = 16
  dtype: Any = jnp.float32

  def __post_init__(self):
    layers.check_levels(self.levels)
    super().__post_init__()

  def setup(self):
    channels = layers.level_channels(self.base_channels, self.levels)
    self.seg_encoder = _Encoder(channels, self.z_seg_channels, spatial=True, dtype=self.dtype)
    self.dom_encoder = _Encoder(channels, self.z_dom_dim, spatial=False, dtype=self.dtype)
    self.seg_decoder = layers.ConvDecoder(channels, self.num_classes, dtype=self.dtype)
    self.image_decoder = _ImageDecoder(channels, self.out_channels, dtype=self.dtype)

  def _check_size(self, x: Array):
    layers.check_divisible(x, self.levels)

  def encode_seg(self, x: Array) -> tuple[Array, Array]:
    """x [B, H, W, C] -> posterior (mean, logvar) of z_seg, each [B, H/2^L, W/2^L, z_seg_channels]."""
    self._check_size(x)
    return self.seg_encoder(x)

  def encode_dom(self, x: Array) -> tuple[Array, Array]:
    """x [B, H, W, C] -> posterior (mean, logvar) of z_dom, each [B, z_dom_dim]."""
    self._check_size(x)
    return self.dom_encoder(x)

  def decode_seg(self, z_seg: Array) -> Array:
    """z_seg [B, h, w, z_seg_channels] -> logits [B, h * 2^L, w * 2^L, num_classes]."""
    return self.seg_decoder(z_seg)

  def decode_image(self, z_seg: Array, z_dom: Array) -> Array:
    """z_seg [B, h, w, z_seg_channels], z_dom [B, z_dom_dim] -> recon [B, h * 2^L, w * 2^L, out_channels]."""
    return self.image_decoder(z_seg, z_dom)

  def __call__(self, x: Array, sample: bool = True) -> dict[str, Array]:
    seg_mean, seg_logvar = self.encode_seg(x)
    dom_mean, dom_logvar = self.encode_dom(x)
    if sample:
      z_seg = layers.gaussian_sample(seg_mean, seg_logvar, self.make_rng('latent'))
      z_dom = layers.gaussian_sample(dom_mean, dom_logvar, self.make_rng('latent'))
    else:
      z_seg, z_dom = seg_mean, dom_mean
    return {
        'seg_logits': self.decode_seg(z_seg),
        'recon': self.decode_image(z_seg, z_dom),
        'seg_mean': seg_mean,
        'seg_logvar': seg_logvar,
        'z_seg': z_seg,
        'dom_mean': dom_mean,
        'dom_logvar': dom_logvar,
        'z_dom': z_dom,
    }


def build_ffd_vae(vae_config, num_classes: int, channels: int, dtype: Any = jnp.float32) -> FFDVAE:
  """FFDVAE from the `vae` config section; `channels` is the image channel count (1 or 3)."""
  return FFDVAE(
      num_classes=num_classes,
      out_channels=channels,
      base_channels=vae_config.base_channels,
      levels=vae_config.levels,
      z_seg_channels=vae_config.z_seg_channels,
      z_dom_dim=vae_config.z_dom_dim,
      dtype=dtype,
  )
