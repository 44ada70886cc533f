"""ACDC cine MR -> MSCMRseg LGE (DE): ventricle segmentation across datasets, one class list.

  python -m diffuseg_jax.main --config=configs/acdc.py --config.data.root=/path/to/ACDC \
      --config.data.target_root=/path/to/MSCMRseg --workdir=runs/acdc_mscmr

Variants, with the same flags:
  --config=configs/acdc.py:quick  minutes on a CPU, 8 patients / subjects per split, 64 x 64 slices
  --config=configs/acdc.py:gpu    the sizes for a real GPU run (default.py's gpu variant)

Source: every ACDC patient's ED and ES frames (labels 1 RV, 2 Myo, 3 LV); target / val / test: the MSCMRseg
DE volumes split by subject. Both are mapped to background, LV, RV, Myo (diffuseg_jax/data/acdc.py). ACDC
alone (same-domain baseline, split by patient): --config.data.target=acdc and no target_root.
"""

from diffuseg_jax.config_files import apply_variant, load_sibling

default = load_sibling(__file__)


def get_config(arg: str | None = None):
  c = default.latent_slices(default.get_config(), 'acdc', target='DE', empty_slices='drop_source')
  return apply_variant(c, arg, default.LATENT_SLICE_VARIANTS, __file__)
