"""DRIVE -> IOSTAR: retinal vessel segmentation on RGB images (paper Tables I-II, Fig. 5 and 8).

  python -m diffuseg_jax.main --config=configs/iostar.py --config.data.root=/path/to/DRIVE \
      --config.data.target_root=/path/to/IOSTAR --workdir=runs/iostar

Variants, with the same flags:
  --config=configs/iostar.py:quick  minutes on a CPU, 8 images per split, 64 x 64
  --config=configs/iostar.py:gpu    default.py's gpu steps and widths, with this config's batches
  --config=configs/iostar.py:sd --config.sd_path=/path/to/sd  Stable Diffusion from a local folder (default.py's sd)

Source: every labelled DRIVE image; target / val / test: IOSTAR split by image (diffuseg_jax/data/retina.py).
RGB, classes background, vessel; field-of-view masks are kept for evaluation. IOSTAR -> DRIVE:
--config.data.source=iostar --config.data.target=drive with the roots swapped.

Sized for the releases: DRIVE 40 labelled images of 565 x 584 (source: all 40), IOSTAR 30 of 1024 x 1024
(target / val / test 21 / 3 / 6). 256 x 256 (64 x 64 x 4 latents): at 128 the DRIVE images would shrink
4.6x and IOSTAR's 8x, and every vessel narrower than 5-8 original pixels (most of them) would fall under a
pixel. Each training batch is at most the split it draws from (one batch holds no image twice):
  teacher / student  batch 8: 40 DRIVE = 5 batches an epoch, 1500 steps = 300 epochs; 21 IOSTAR = 570 epochs
  autoencoder        batch 8 of the 21 target images, 2000 steps = 760 epochs
  diffusion          batch 16 of the 21 target latents, 8000 steps = 6100 epochs (128k noised samples)
  synthesis          1000 pairs: each DRIVE mask 25 times, each with its own IOSTAR reference and noise
  segmentation       batch 16, 2000 steps: 32 epochs of the 1000 pairs (transfer: 800 epochs of DRIVE)
  evaluation         batch 8 (the 6 test images are one padded batch).
gpu: the same batches (the data does not grow) with default.py's gpu steps and widths; quick: batches of 8.
"""

from diffuseg_jax.config_files import apply_variant, load_sibling

default = load_sibling(__file__)
RELEASED_SPLITS = {'source': 40, 'target': 21, 'val': 3, 'test': 6}  # images, as above


def batches(c, small: int = 8, large: int = 16) -> None:
  """This config's batches: `small` for the FFD-VAE, autoencoder and evaluation, `large` for the diffusion
  model and the segmentation networks."""
  c.vae.batch_size = c.autoencoder.batch_size = c.eval.batch_size = small
  c.diffusion.batch_size = c.segmentation.batch_size = large


def quick(c) -> None:
  default.quick_at(64)(c)
  batches(c, large=8)  # 8 images per split


def gpu(c) -> None:
  default.gpu(c)
  batches(c)


VARIANTS = {'quick': quick, 'gpu': gpu, 'sd': default.sd}


def get_config(arg: str | None = None):
  c = default.latent_slices(default.get_config(), 'retina', source='drive', target='iostar', channels=3)
  c.data.image_size = 256
  batches(c)
  c.diffusion.steps = 8000
  c.segmentation.steps = 2000
  c.sampling.num_masks = 1000
  return apply_variant(c, arg, VARIANTS, __file__)
