"""ACDC cine MR -> MSCMRseg LGE (DE): ventricle segmentation across datasets, one class list.

  python -m diffuseg_jax.main --config=configs/acdc.py --config.data.root=/path/to/ACDC \
      --config.data.target_root=/path/to/MSCMRseg --workdir=runs/acdc_mscmr

Source: every ACDC patient's ED and ES frames (labels 1 RV, 2 Myo, 3 LV); target / val / test: the MSCMRseg
DE volumes split by subject. Both are mapped to background, LV, RV, Myo (diffuseg_jax/data/acdc.py). ACDC
alone (same-domain baseline, split by patient): --config.data.target=acdc and no target_root.
"""

from diffuseg_jax.config_files import load_sibling

default = load_sibling(__file__)


def get_config():
  c = default.get_config()
  c.data.name = 'acdc'
  c.data.target = 'DE'
  c.data.image_size = 128
  c.data.empty_slices = 'drop_source'
  c.autoencoder.kind = 'kl'
  c.autoencoder.downsample = 4
  c.autoencoder.latent_channels = 4
  return c
