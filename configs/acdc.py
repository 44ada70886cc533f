"""ACDC cine MR -> MSCMRseg LGE (DE): ventricle segmentation across datasets, one class list.

  python -m diffuseg_jax.main --config=configs/acdc.py --config.data.root=/path/to/ACDC \
      --config.data.target_root=/path/to/MSCMRseg --workdir=runs/acdc_mscmr

Variants, with the same flags:
  --config=configs/acdc.py:quick  minutes on a CPU, 8 patients / subjects per split, 64 x 64 slices
  --config=configs/acdc.py:gpu    the sizes for a real GPU run (default.py's gpu variant)
  --config=configs/acdc.py:sd --config.sd_path=/path/to/sd  Stable Diffusion from a local folder (default.py's sd)

Source: every ACDC patient's ED and ES frames (labels 1 RV, 2 Myo, 3 LV); target / val / test: the MSCMRseg
DE volumes split by subject. Both are mapped to background, LV, RV, Myo (diffuseg_jax/data/acdc.py). ACDC
alone (same-domain baseline, split by patient): --config.data.target=acdc and no target_root.

Sized for the releases: ACDC 150 patients (100 training + 50 testing), 2 frames of about 9.5 slices each: about
2700 source slices with a label; MSCMRseg 45 subjects split 31 / 5 / 9, DE volumes of 10-18 slices: about
460 target, 75 val, 135 test slices. default.py's batches fit (no batch holds a slice twice); the steps
follow the source, 9x MSCMRseg's C0 slices:
  teacher            batch 64, 3000 steps: 71 epochs of the ACDC slices (42 batches an epoch)
  student            batch 64, 1500 steps: 210 epochs of the DE slices
  autoencoder        batch 32, 2000 steps: 140 epochs of the DE slices
  diffusion          batch 64, 4000 steps: 560 epochs of the DE slices
  synthesis          one pair per ACDC mask (about 2700), each with its own DE reference
  segmentation       batch 64, 1500 steps: 36 epochs of the pairs (transfer: of the ACDC slices)
gpu: batches of 128, default.py's gpu steps (teacher 5000: 240 epochs).
"""

from diffuseg_jax.config_files import apply_variant, load_sibling

default = load_sibling(__file__)
RELEASED_SPLITS = {'source': 2700, 'target': 460, 'val': 75, 'test': 135}  # slices (about), as above


def get_config(arg: str | None = None):
  c = default.latent_slices(default.get_config(), 'acdc', target='DE', empty_slices='drop_source')
  c.vae.teacher_steps = 3000
  c.segmentation.steps = 1500
  return apply_variant(c, arg, default.LATENT_SLICE_VARIANTS, __file__)
