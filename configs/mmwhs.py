"""MM-WHS MR -> CT: whole-heart segmentation, 7 substructures (paper Table IV, Fig. 10).

  python -m diffuseg_jax.main --config=configs/mmwhs.py --config.data.root=/path/to/MM-WHS \
      --workdir=runs/mmwhs  # full
  python -m diffuseg_jax.main --config=configs/mmwhs.py:quick --config.data.root=/path/to/MM-WHS \
      --workdir=runs/mmwhs_quick  # quick: minutes on a CPU, 4 volumes per split, 64 x 64 slices
  python -m diffuseg_jax.main --config=configs/mmwhs.py:gpu --config.data.root=/path/to/MM-WHS \
      --workdir=runs/mmwhs_gpu  # gpu: the sizes for a real GPU run (default.py's gpu variant)

`data.root` holds {mr,ct}_train_NNNN_{image,label}.nii.gz anywhere below it (diffuseg_jax/data/mmwhs.py).
Axial slices (canonical axis 2) at 128 x 128; classes background, LV, RV, LA, RA, Myo, Ao, PA. CT -> MR:
--config.data.source=ct --config.data.target=mr.
"""

from diffuseg_jax.config_files import apply_variant, load_sibling

default = load_sibling(__file__)

# quick: whole-heart CT volumes are large, so 4 of them per split (they load in seconds).
VARIANTS = {**default.LATENT_SLICE_VARIANTS, 'quick': default.quick_at(64, max_cases=4)}


def get_config(arg: str | None = None):
  c = default.latent_slices(default.get_config(), 'mmwhs', source='mr', target='ct', slice_axis=2,
                            empty_slices='drop_source')  # most axial slices miss the heart; keep target/test whole
  return apply_variant(c, arg, VARIANTS, __file__)
