"""A tiny CPU config for tests: every stage runs in seconds on embedded data.

  python -m diffuseg_jax.main --config=configs/test.py --workdir=/tmp/diffuseg_test  # pixel space
  python -m diffuseg_jax.main --config=configs/test.py:kl --workdir=/tmp/diffuseg_test_kl  # kl
  python -m diffuseg_jax.main --config=configs/test.py:sd --config.sd_path=DIR --workdir=/tmp/diffuseg_test_sd  # sd

kl: the same with a KL autoencoder (factor 2) as the diffusion's latent space; sd: the Stable Diffusion route
(default.py's `sd_route`) on a tiny SD-layout folder, --config.sd_path=DIR (the tests write one). No quick/gpu
variants: this config is already the smallest that runs every stage.
"""

from diffuseg_jax.config_files import apply_variant, load_sibling

default = load_sibling(__file__)


def get_config(arg: str | None = None):
  c = default.get_config()
  c.data.update(name='mnist_m', image_size=16, num_source=64, num_target=64, num_test=16)
  c.vae.update(base_channels=8, levels=1, z_seg_channels=4, z_dom_dim=4, teacher_steps=4, student_steps=4,
               batch_size=16)
  c.autoencoder.update(kind='identity', base_channels=8, steps=4, batch_size=16)
  # One UNet level, attention in it (16 x 16 tokens): the smallest network that runs every block kind; the
  # suite's time is mostly compiling it (two levels cost about a third more). Deeper UNets: tests/test_models.py.
  c.diffusion.update(base_channels=8, channel_mult=(1,), attention_levels=(0,), num_heads=2, num_cond_tokens=2,
                     steps=4, batch_size=16, num_timesteps=100)
  # The paper's loop (eq. 7's denoiser, blending every step): the tests that pin what each step pastes use it;
  # the mask-conditioned default runs in tests/test_pipeline_e2e.py and tests/test_mask_condition.py.
  c.diffusion.mask_condition = 'none'
  # One round on every dataset (default 'auto' runs a second where there is a validation split): the tests of
  # the second round and of 'auto' set it (tests/test_relabel.py, tests/test_pipeline_e2e.py).
  c.diffusion.pseudo_labels_from = 'student'
  c.sampling.update(num_steps=4, batch_size=16, shard_size=16, num_masks=32, blend_until=1.0)
  c.segmentation.update(base_channels=8, levels=1, steps=4, batch_size=16, seeds=(0,),
                        strategies='transfer,self,semi,diffuseg')
  c.eval.update(batch_size=16, num_quality_images=16, num_figure_examples=2)
  c.train.update(log_every=2, progress=False)
  c.checkpoint.every_steps = 4  # one save per 4-step stage (resume tests set their own interval)
  return apply_variant(c, arg, {'kl': kl, 'sd': sd}, __file__)


def kl(c) -> None:
  """Latent diffusion in a KL autoencoder with factor 2 (8 x 8 latents of the 16 x 16 images)."""
  c.autoencoder.update(kind='kl', downsample=2)


def sd(c) -> None:
  """The :sd route (pretrained VAE, UNet and schedule from --config.sd_path) at this config's sizes."""
  default.sd_route(c)
