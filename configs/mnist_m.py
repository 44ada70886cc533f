"""MNIST -> MNIST-M-style (embedded data, no download): the default end-to-end DiffuSeg run.

  python -m diffuseg_jax.main --config=configs/mnist_m.py --workdir=runs/mnist_m  # full
  python -m diffuseg_jax.main --config=configs/mnist_m.py:quick --workdir=runs/mnist_m_quick  # quick
  python -m diffuseg_jax.main --config=configs/mnist_m.py:gpu --workdir=runs/mnist_m_gpu  # gpu
  python -m diffuseg_jax.main --config=configs/mnist_m.py:sd --config.sd_path=/path/to/sd \
      --workdir=runs/mnist_m_sd  # sd: Stable Diffusion from a local folder, on a GPU (default.py's sd)

The full run took 21-26 min on a 2-core CPU (fresh clone, install included); quick is the same pipeline
with fewer steps and smaller batches (a run-through in minutes); gpu trains far longer with batches of 128
(diffusion 20k steps, segmentation 5k: the sizes for a GPU, train.compute_dtype=auto).
Pixel-space diffusion (autoencoder.kind='identity') on 32x32x3 images: at this size a latent autoencoder
would only lose detail. Networks are sized so that the whole pipeline trains on a laptop CPU; on a GPU use
the gpu variant (or raise the step counts, e.g. --config.diffusion.steps=20000) for better images.
"""

from diffuseg_jax.config_files import apply_variant, load_sibling

default = load_sibling(__file__)


def get_config(arg: str | None = None):
  c = default.get_config()
  c.data.name = 'mnist_m'
  c.autoencoder.kind = 'identity'
  c.train.ema_decay = 0.995
  c.vae.update(base_channels=16, teacher_steps=500, student_steps=500)
  c.diffusion.update(base_channels=16, channel_mult=(1, 2, 4), batch_size=32, steps=1200, learning_rate=5e-4)
  c.sampling.num_steps = 25
  # Transfer, the oracle, DiffuSeg and DiffuSeg + self-training, 3 seeds each (12 runs); add semi with
  # --config.segmentation.strategies=transfer,self,semi,diffuseg,diffuseg_st (3 more runs, ~2.5 min on 2 cores).
  c.segmentation.update(base_channels=8, steps=200, strategies='transfer,self,diffuseg,diffuseg_st')
  return apply_variant(c, arg, {'quick': quick, 'gpu': gpu, 'sd': default.sd}, __file__)


def quick(c) -> None:
  """The published quick preset (README, whose numbers are quoted): minutes on a 2-core CPU.

  Its 300 diffusion steps learn a usable denoiser only with v-prediction and min-SNR weighting: with the
  paper's eps-prediction the samples were saturated noise and DiffuSeg scored Dice 0.02 (README)."""
  c.data.update(num_source=1000, num_target=1000, num_test=300)
  c.vae.update(teacher_steps=120, student_steps=120, batch_size=32)
  c.diffusion.update(steps=300, batch_size=16, prediction_type='v_prediction', loss_weighting='min_snr')
  c.sampling.update(num_steps=20, num_masks=256)
  c.segmentation.update(steps=120, batch_size=32, seeds=(0,), strategies='transfer,self,diffuseg')
  c.eval.num_quality_images = 256


def gpu(c) -> None:
  """default.gpu's steps and batches; networks sized for 32 x 32 images (narrower than default.gpu's)."""
  default.gpu(c)
  c.train.ema_decay = 0.999  # 20k+ steps: a longer EMA than the CPU preset's 0.995
  c.vae.base_channels = 32
  c.diffusion.update(base_channels=64, steps=20000)
  c.segmentation.base_channels = 16
