"""DRIVE -> IOSTAR: retinal vessel segmentation on RGB images (paper Tables I-II, Fig. 5 and 8).

  python -m diffuseg_jax.main --config=configs/iostar.py --config.data.root=/path/to/DRIVE \
      --config.data.target_root=/path/to/IOSTAR --workdir=runs/iostar

Source: every labelled DRIVE image; target / val / test: IOSTAR split by image (diffuseg_jax/data/retina.py).
128 x 128 RGB, classes background, vessel; field-of-view masks are kept for evaluation. IOSTAR -> DRIVE:
--config.data.source=iostar --config.data.target=drive with the roots swapped.
"""

from diffuseg_jax.config_files import load_sibling

default = load_sibling(__file__)


def get_config():
  c = default.get_config()
  c.data.name = 'retina'
  c.data.source = 'drive'
  c.data.target = 'iostar'
  c.data.image_size = 128
  c.data.channels = 3
  c.autoencoder.kind = 'kl'
  c.autoencoder.downsample = 4
  c.autoencoder.latent_channels = 4
  return c
