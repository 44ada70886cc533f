"""MSCMRseg bSSFP (C0) -> LGE (DE): cardiac ventricle segmentation (paper section IV, Fig. 6 and 9).

  python -m diffuseg_jax.main --config=configs/mscmr.py --config.data.root=/path/to/MSCMRseg \
      --workdir=runs/mscmr  # full
  python -m diffuseg_jax.main --config=configs/mscmr.py:quick --config.data.root=/path/to/MSCMRseg \
      --workdir=runs/mscmr_quick  # quick: minutes on a CPU, 8 subjects per split, 64 x 64 slices
  python -m diffuseg_jax.main --config=configs/mscmr.py:gpu --config.data.root=/path/to/MSCMRseg \
      --workdir=runs/mscmr_gpu  # gpu: the sizes for a real GPU run (default.py's gpu variant)

`data.root` holds subjectN_{C0,T2,DE}.nii.gz and subjectN_{C0,T2,DE}_manual.nii.gz anywhere below it (see
diffuseg_jax/data/mscmr.py). Short-axis slices at 128 x 128; classes background, LV, RV, Myo. Latent
diffusion in a KL autoencoder with factor 4: 32 x 32 x 4 latents. Another source sequence:
--config.data.source=T2.
"""

from diffuseg_jax.config_files import apply_variant, load_sibling

default = load_sibling(__file__)


def get_config(arg: str | None = None):
  c = default.latent_slices(default.get_config(), 'mscmr', source='C0', target='DE',
                            empty_slices='drop_source')  # masks without any structure synthesise background only
  return apply_variant(c, arg, default.LATENT_SLICE_VARIANTS, __file__)
