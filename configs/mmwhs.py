"""MM-WHS MR -> CT: whole-heart segmentation, 7 substructures (paper Table IV, Fig. 10).

  python -m diffuseg_jax.main --config=configs/mmwhs.py --config.data.root=/path/to/MM-WHS \
      --workdir=runs/mmwhs  # full
  python -m diffuseg_jax.main --config=configs/mmwhs.py:quick --config.data.root=/path/to/MM-WHS \
      --workdir=runs/mmwhs_quick  # quick: minutes on a CPU, 4 volumes per split, 64 x 64 slices
  python -m diffuseg_jax.main --config=configs/mmwhs.py:gpu --config.data.root=/path/to/MM-WHS \
      --workdir=runs/mmwhs_gpu  # gpu: the sizes for a real GPU run (default.py's gpu variant)
  python -m diffuseg_jax.main --config=configs/mmwhs.py:sd --config.data.root=/path/to/MM-WHS \
      --config.sd_path=/path/to/sd --workdir=runs/mmwhs_sd  # sd: Stable Diffusion from a local folder

`data.root` holds {mr,ct}_train_NNNN_{image,label}.nii.gz anywhere below it (diffuseg_jax/data/mmwhs.py).
Axial slices (canonical axis 2) at 128 x 128; classes background, LV, RV, LA, RA, Myo, Ao, PA. CT -> MR:
--config.data.source=ct --config.data.target=mr.

Sized for the release: 20 MR + 20 CT labelled volumes. Source: every MR volume's axial slices that show the
heart, about 70 of about 130 each: about 1400; target: CT split by volume 14 / 2 / 4, every axial slice
(177-363 a volume, about 260): about 3600 target, 520 val, 1000 test slices. default.py's batches and
steps fit (no batch holds a slice twice; neighbouring CT slices about 0.5 mm apart are near copies, so an
epoch sees each anatomy several times):
  teacher / student  batch 64, 1500 steps: 69 epochs of the MR slices, 27 of the CT slices
  autoencoder        batch 32, 2000 steps: 18 epochs of the CT slices
  diffusion          batch 64, 4000 steps: 71 epochs of the CT slices
  synthesis          one pair per MR mask (about 1400), each with its own CT reference
  segmentation       batch 64, 800 steps: 37 epochs of the pairs (transfer: of the MR slices)
gpu: batches of 128 and default.py's gpu steps.
"""

from diffuseg_jax.config_files import apply_variant, load_sibling

default = load_sibling(__file__)
RELEASED_SPLITS = {'source': 1400, 'target': 3600, 'val': 520, 'test': 1000}  # slices (about), as above

# quick: whole-heart CT volumes are large, so 4 of them per split (they load in seconds).
VARIANTS = {**default.LATENT_SLICE_VARIANTS, 'quick': default.quick_at(64, max_cases=4)}


def get_config(arg: str | None = None):
  c = default.latent_slices(default.get_config(), 'mmwhs', source='mr', target='ct', slice_axis=2,
                            empty_slices='drop_source')  # most axial slices miss the heart; keep target/test whole
  return apply_variant(c, arg, VARIANTS, __file__)
