"""MNIST -> MNIST-M-style (embedded data, no download): the default end-to-end DiffuSeg run.

  python -m diffuseg_jax.main --config=configs/mnist_m.py --workdir=runs/mnist_m  # full
  python -m diffuseg_jax.main --config=configs/mnist_m.py:quick --workdir=runs/mnist_m_quick  # quick

The full run took 25 min on an idle 2-core CPU (fresh clone, install included); quick is the same pipeline
with fewer steps and smaller batches.
Pixel-space diffusion (autoencoder.kind='identity') on 32x32x3 images: at this size a latent autoencoder
would only lose detail. Networks are sized so that the whole pipeline trains on a laptop CPU; on a GPU raise
the step counts (e.g. --config.diffusion.steps=20000) for better images.
"""

from diffuseg_jax.config_files import load_sibling

default = load_sibling(__file__)


def get_config(variant: str | None = None):
  c = default.get_config()
  c.data.name = 'mnist_m'
  c.autoencoder.kind = 'identity'
  c.train.ema_decay = 0.995
  c.vae.base_channels = 16
  c.vae.teacher_steps = 500
  c.vae.student_steps = 500
  c.diffusion.base_channels = 16
  c.diffusion.channel_mult = (1, 2, 4)
  c.diffusion.batch_size = 32
  c.diffusion.steps = 1200
  c.diffusion.learning_rate = 5e-4
  c.sampling.num_steps = 25
  c.sampling.blend_until = 1.0  # blend every step (paper); 0.8 and 0.5 measured worse, see README
  c.segmentation.base_channels = 8
  c.segmentation.steps = 200
  # Transfer, the oracle and DiffuSeg, 3 seeds each (9 runs); add semi with
  # --config.segmentation.strategies=transfer,self,semi,diffuseg (3 more runs, ~2.5 min on a 2-core CPU).
  c.segmentation.strategies = 'transfer,self,diffuseg'
  if variant in (None, '', 'full'):
    return c
  if variant == 'quick':
    c.data.num_source = 1000
    c.data.num_target = 1000
    c.data.num_test = 300
    c.vae.teacher_steps = 120
    c.vae.student_steps = 120
    c.vae.batch_size = 32
    c.diffusion.steps = 300
    c.diffusion.batch_size = 16
    c.sampling.num_steps = 20
    c.sampling.num_masks = 256
    c.segmentation.steps = 120
    c.segmentation.batch_size = 32
    c.segmentation.seeds = (0,)
    c.segmentation.strategies = 'transfer,self,diffuseg'
    c.eval.num_quality_images = 256
    return c
  raise ValueError(f'unknown variant {variant!r} of configs/mnist_m.py (use full or quick)')
