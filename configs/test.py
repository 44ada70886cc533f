"""A tiny CPU config for tests: every stage runs in seconds on embedded data.

  python -m diffuseg_jax.main --config=configs/test.py --workdir=/tmp/diffuseg_test
"""

from diffuseg_jax.config_files import load_sibling

default = load_sibling(__file__)


def get_config(variant: str | None = None):
  c = default.get_config()
  c.data.name = 'mnist_m'
  c.data.image_size = 16
  c.data.num_source = 64
  c.data.num_target = 64
  c.data.num_test = 16
  c.vae.base_channels = 8
  c.vae.levels = 1
  c.vae.z_seg_channels = 4
  c.vae.z_dom_dim = 4
  c.vae.teacher_steps = 4
  c.vae.student_steps = 4
  c.vae.batch_size = 16
  c.autoencoder.kind = 'identity'
  c.autoencoder.base_channels = 8
  c.autoencoder.steps = 4
  c.autoencoder.batch_size = 16
  c.diffusion.base_channels = 8
  c.diffusion.channel_mult = (1, 2)
  c.diffusion.attention_levels = (1,)
  c.diffusion.num_heads = 2
  c.diffusion.num_cond_tokens = 2
  c.diffusion.steps = 4
  c.diffusion.batch_size = 16
  c.diffusion.num_timesteps = 100
  c.sampling.num_steps = 4
  c.sampling.batch_size = 16
  c.sampling.shard_size = 16
  c.sampling.num_masks = 32
  c.segmentation.base_channels = 8
  c.segmentation.levels = 2
  c.segmentation.steps = 4
  c.segmentation.batch_size = 16
  c.segmentation.seeds = (0,)
  c.eval.batch_size = 16
  c.eval.num_quality_images = 16
  c.eval.num_figure_examples = 2
  c.train.log_every = 2
  c.checkpoint.every_steps = 2
  c.train.progress = False
  if variant == 'kl':
    c.autoencoder.kind = 'kl'
    c.autoencoder.downsample = 2
  elif variant not in (None, ''):
    raise ValueError(f'unknown variant {variant!r} of configs/test.py')
  return c
