"""DRIVE -> IOSTAR: retinal vessel segmentation on RGB images (paper Tables I-II, Fig. 5 and 8).

  python -m diffuseg_jax.main --config=configs/iostar.py --config.data.root=/path/to/DRIVE \
      --config.data.target_root=/path/to/IOSTAR --workdir=runs/iostar

Variants, with the same flags:
  --config=configs/iostar.py:quick  minutes on a CPU, 8 images per split, 64 x 64
  --config=configs/iostar.py:gpu    the sizes for a real GPU run (default.py's gpu variant)

Source: every labelled DRIVE image; target / val / test: IOSTAR split by image (diffuseg_jax/data/retina.py).
128 x 128 RGB, classes background, vessel; field-of-view masks are kept for evaluation. IOSTAR -> DRIVE:
--config.data.source=iostar --config.data.target=drive with the roots swapped.
"""

from diffuseg_jax.config_files import apply_variant, load_sibling

default = load_sibling(__file__)


def get_config(arg: str | None = None):
  c = default.latent_slices(default.get_config(), 'retina', source='drive', target='iostar', channels=3)
  return apply_variant(c, arg, default.LATENT_SLICE_VARIANTS, __file__)
