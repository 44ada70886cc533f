"""MSCMRseg bSSFP (C0) -> LGE (DE): cardiac ventricle segmentation (paper section IV, Fig. 6 and 9).

  python -m diffuseg_jax.main --config=configs/mscmr.py --config.data.root=/path/to/MSCMRseg \
      --workdir=runs/mscmr

`data.root` holds subjectN_{C0,T2,DE}.nii.gz and subjectN_{C0,T2,DE}_manual.nii.gz anywhere below it (see
diffuseg_jax/data/mscmr.py). Short-axis slices at 128 x 128; classes background, LV, RV, Myo. Latent
diffusion in a KL autoencoder with factor 4: 32 x 32 x 4 latents. Another source sequence:
--config.data.source=T2.
"""

from diffuseg_jax.config_files import load_sibling

default = load_sibling(__file__)


def get_config():
  c = default.get_config()
  c.data.name = 'mscmr'
  c.data.source = 'C0'
  c.data.target = 'DE'
  c.data.image_size = 128
  c.data.empty_slices = 'drop_source'  # masks without any structure would synthesise background only
  c.autoencoder.kind = 'kl'
  c.autoencoder.downsample = 4
  c.autoencoder.latent_channels = 4
  return c
