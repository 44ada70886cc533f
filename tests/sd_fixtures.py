"""A tiny Stable-Diffusion-layout folder with random weights and real diffusers configs, written in the test.

  <root>/vae        FlaxAutoencoderKL, factor 2, 4 latent channels (16 x 16 RGB -> 8 x 8 x 4)
  <root>/unet       FlaxUNet2DConditionModel, 32 channels (diffusers fixes its GroupNorms at 32 groups)
  <root>/scheduler  FlaxDDIMScheduler config: scaled_linear betas, T = 100, the given prediction_type
The weights are drawn on the host: compiling the initialisers would take seconds.
"""

from __future__ import annotations

import math
import pathlib

import jax
import numpy as np

from diffuseg_jax.models import diffusers_adapter as da

LATENT_CHANNELS = 4
CROSS_ATTENTION_DIM = 8
SCHEDULER = dict(num_train_timesteps=100, beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012)


def host_params(module, seed=0):
  """Params of the module's real tree, drawn with numpy (unit scales, small biases, fan-in weights)."""
  shapes = jax.eval_shape(module.init_weights, jax.random.key(0))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key == 'scale':
      return np.ones(leaf.shape, np.float32)
    std = 0.05 if path[-1].key == 'bias' else 1 / math.sqrt(max(1, math.prod(leaf.shape[:-1])))
    return rng.normal(0.0, std, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def tiny_vae(image_size: int = 16):
  return da.FlaxAutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 2,
                              up_block_types=('UpDecoderBlock2D',) * 2, block_out_channels=(8, 16),
                              layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=4,
                              sample_size=image_size, scaling_factor=0.25)


def tiny_unet(in_channels: int = LATENT_CHANNELS):
  return da.FlaxUNet2DConditionModel(sample_size=4, in_channels=in_channels, out_channels=in_channels,
                                     down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                                     up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), block_out_channels=(32, 32),
                                     layers_per_block=1, attention_head_dim=8,
                                     cross_attention_dim=CROSS_ATTENTION_DIM)


def write_tiny_sd(root, prediction_type: str = 'v_prediction', unet_channels: int = LATENT_CHANNELS,
                  scheduler: bool = True) -> tuple[pathlib.Path, dict]:
  """Writes the folder; returns (root, {'vae': (module, params), 'unet': (module, params)})."""
  root = pathlib.Path(root)
  vae, unet = tiny_vae(), tiny_unet(unet_channels)
  vae_params, unet_params = host_params(vae), host_params(unet, 1)
  vae.save_pretrained(root / 'vae', params=vae_params)
  unet.save_pretrained(root / 'unet', params=unet_params)
  if scheduler:
    da.diffusers.FlaxDDIMScheduler(**SCHEDULER, prediction_type=prediction_type).save_config(root / 'scheduler')
  return root, {'vae': (vae, vae_params), 'unet': (unet, unet_params)}
