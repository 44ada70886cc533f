"""MNIST -> MNIST-M-style (embedded data, no download): the default end-to-end DiffuSeg run.

  python -m diffuseg_jax.main --config=configs/mnist_m.py --workdir=runs/mnist_m          # full (~30 min, 2-core CPU)
  python -m diffuseg_jax.main --config=configs/mnist_m.py:quick --workdir=runs/mnist_m_quick  # quick (< 5 min)

Pixel-space diffusion (autoencoder.kind='identity') on 32x32x3 images: the images are tiny, so a latent
autoencoder would only lose detail.
"""

from diffuseg_jax.config_files import load_sibling

default = load_sibling(__file__)


def get_config(variant: str | None = None):
  c = default.get_config()
  c.data.name = 'mnist_m'
  c.autoencoder.kind = 'identity'
  if variant in (None, '', 'full'):
    return c
  if variant == 'quick':
    c.data.num_source = 1000
    c.data.num_target = 1000
    c.data.num_test = 300
    c.vae.teacher_steps = 300
    c.vae.student_steps = 300
    c.diffusion.steps = 800
    c.sampling.num_steps = 20
    c.sampling.num_masks = 512
    c.segmentation.steps = 200
    c.segmentation.seeds = (0,)
    c.eval.num_quality_images = 300
    return c
  raise ValueError(f'unknown variant {variant!r} of configs/mnist_m.py (use full or quick)')
