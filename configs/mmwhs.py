"""MM-WHS MR -> CT: whole-heart segmentation, 7 substructures (paper Table IV, Fig. 10).

  python -m diffuseg_jax.main --config=configs/mmwhs.py --config.data.root=/path/to/MM-WHS \
      --workdir=runs/mmwhs

`data.root` holds {mr,ct}_train_NNNN_{image,label}.nii.gz anywhere below it (diffuseg_jax/data/mmwhs.py).
Axial slices (canonical axis 2) at 128 x 128; classes background, LV, RV, LA, RA, Myo, Ao, PA. CT -> MR:
--config.data.source=ct --config.data.target=mr.
"""

from diffuseg_jax.config_files import load_sibling

default = load_sibling(__file__)


def get_config():
  c = default.get_config()
  c.data.name = 'mmwhs'
  c.data.source = 'mr'
  c.data.target = 'ct'
  c.data.image_size = 128
  c.data.slice_axis = 2
  c.data.empty_slices = 'drop_source'  # most axial slices miss the heart; keep target/test volumes whole
  c.autoencoder.kind = 'kl'
  c.autoencoder.downsample = 4
  c.autoencoder.latent_channels = 4
  return c
