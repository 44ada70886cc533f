"""MSCMRseg bSSFP (C0) -> LGE (DE): cardiac ventricle segmentation (paper section IV, Fig. 6 and 9).

  python -m diffuseg_jax.main --config=configs/mscmr.py --config.data.root=/path/to/MSCMRseg \
      --workdir=runs/mscmr  # full
  python -m diffuseg_jax.main --config=configs/mscmr.py:quick --config.data.root=/path/to/MSCMRseg \
      --workdir=runs/mscmr_quick  # quick: minutes on a CPU, 8 subjects per split, 64 x 64 slices
  python -m diffuseg_jax.main --config=configs/mscmr.py:gpu --config.data.root=/path/to/MSCMRseg \
      --workdir=runs/mscmr_gpu  # gpu: the sizes for a real GPU run (default.py's gpu variant)
  python -m diffuseg_jax.main --config=configs/mscmr.py:sd --config.data.root=/path/to/MSCMRseg \
      --config.sd_path=/path/to/sd --workdir=runs/mscmr_sd  # sd: Stable Diffusion from a local folder

`data.root` holds subjectN_{C0,T2,DE}.nii.gz and subjectN_{C0,T2,DE}_manual.nii.gz anywhere below it (see
diffuseg_jax/data/mscmr.py). Short-axis slices at 128 x 128; classes background, LV, RV, Myo. Latent
diffusion in a KL autoencoder with factor 4: 32 x 32 x 4 latents. Another source sequence:
--config.data.source=T2.

Sized for the release: 45 subjects, split 31 / 5 / 9 (train / val / test). Source: the C0 volumes (8-12
slices) of the 31 train subjects, slices with a label: about 300; target: their DE volumes (10-18 slices),
about 460 slices; val about 75, test about 135. default.py's batches fit (no batch holds a slice twice):
  teacher / student  batch 64, 1500 steps: 320 epochs of the C0 slices, 210 of the DE slices
  autoencoder        batch 32, 2000 steps: 140 epochs of the DE slices
  diffusion          batch 64, 4000 steps: 560 epochs of the DE slices
  synthesis          2000 pairs: each C0 mask about 7 times, each with its own DE reference and noise
  segmentation       batch 64, 800 steps: 25 epochs of the 2000 pairs (transfer: 170 epochs of C0)
gpu: batches of 128 (below the C0 slices: 2.3 batches an epoch).
"""

from diffuseg_jax.config_files import apply_variant, load_sibling

default = load_sibling(__file__)
RELEASED_SPLITS = {'source': 300, 'target': 460, 'val': 75, 'test': 135}  # slices (about), as above


def get_config(arg: str | None = None):
  c = default.latent_slices(default.get_config(), 'mscmr', source='C0', target='DE',
                            empty_slices='drop_source')  # masks without any structure synthesise background only
  c.sampling.num_masks = 2000
  return apply_variant(c, arg, default.LATENT_SLICE_VARIANTS, __file__)
