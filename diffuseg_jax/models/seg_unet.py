"""Segmentation UNet (the downstream segmenter trained on synthetic pairs, stage `segment`).

A standard encoder-decoder with skip connections. GroupNorm, not BatchNorm: no batch statistics to carry,
so train and eval behave identically and the train state holds params only.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffuseg_jax.models import layers

Array = jnp.ndarray


class SegUNet(nn.Module):
  """x [B, H, W, C] -> logits [B, H, W, num_classes] float32; H, W divisible by 2^levels.

  Per level: ResBlock (skip saved) -> Downsample; bottleneck: 2 ResBlocks; decoder per level:
  Upsample -> concat(skip) -> ResBlock. Widths base * (1, 2, 4, 4, ...).
  """

  num_classes: int
  base_channels: int = 16
  levels: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    layers.check_divisible(x, self.levels)
    channels = layers.level_channels(self.base_channels, self.levels + 1)
    h = layers.conv3x3(channels[0], self.dtype, 'conv_in')(x.astype(self.dtype))
    skips = []
    for level in range(self.levels):
      h = layers.ResBlock(channels[level], dtype=self.dtype, name=f'down_{level}_res')(h)
      skips.append(h)
      h = layers.Downsample(channels[level + 1], dtype=self.dtype, name=f'down_{level}_downsample')(h)
    h = layers.ResBlock(channels[-1], dtype=self.dtype, name='mid_res_0')(h)
    h = layers.ResBlock(channels[-1], dtype=self.dtype, name='mid_res_1')(h)
    for level in reversed(range(self.levels)):
      h = layers.Upsample(channels[level], dtype=self.dtype, name=f'up_{level}_upsample')(h)
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = layers.ResBlock(channels[level], dtype=self.dtype, name=f'up_{level}_res')(h)
    h = nn.silu(layers.group_norm(channels[0], self.dtype, 'norm_out')(h))
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name='conv_out')(h).astype(jnp.float32)


def build_seg_unet(seg_config, num_classes: int, dtype: Any = jnp.float32) -> SegUNet:
  """SegUNet from the `segmentation` config section."""
  return SegUNet(num_classes=num_classes, base_channels=seg_config.base_channels, levels=seg_config.levels,
                 dtype=dtype)
