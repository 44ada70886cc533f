"""Your own data in the generic folder layout (see diffuseg_jax/data/folder.py for the layout).

Run:  python -m diffuseg_jax.main --config=configs/folder.py --config.data.root=PATH --workdir=runs/folder
Variants:
  python -m diffuseg_jax.main --config=configs/folder.py:quick --config.data.root=PATH \
      --workdir=runs/folder_quick  # quick: minutes on a CPU, 8 cases per split, 32 x 32 pixel diffusion
  python -m diffuseg_jax.main --config=configs/folder.py:gpu --config.data.root=PATH \
      --workdir=runs/folder_gpu  # gpu: the sizes for a real GPU run (default.py's gpu variant)
  python -m diffuseg_jax.main --config=configs/folder.py:sd --config.data.root=PATH --config.sd_path=/path/to/sd \
      --workdir=runs/folder_sd  # sd: Stable Diffusion from a local folder (default.py's sd variant)

Strategies: transfer, diffuseg and diffuseg_st (DiffuSeg + self-training on the target images); with
<root>/target/labels/ add the oracle rows with --config.segmentation.strategies=transfer,self,semi,diffuseg,diffuseg_st.

`default.py` is loaded from this file's own folder (not through `import configs...`), so the config works
whatever the current directory is, and from tests, without `configs/` being a package or on sys.path.
"""

from diffuseg_jax.config_files import apply_variant, load_sibling

default = load_sibling(__file__)

# quick at 32 x 32: pixel-space diffusion costs 4x less than at 64.
VARIANTS = {'quick': default.quick_at(32), 'gpu': default.gpu, 'sd': default.sd}


def get_config(arg: str | None = None):
  config = default.get_config()
  # Source slices without foreground teach nothing about shape.
  config.data.update(name='folder', image_size=64, empty_slices='drop_source')
  config = apply_variant(config, arg, VARIANTS, __file__)
  # Target labels are optional in the folder layout and the oracle strategies (self, semi) need them: they are
  # yours to add (--config.segmentation.strategies=transfer,self,semi,diffuseg,diffuseg_st) when
  # <root>/target/labels exists.
  config.segmentation.strategies = 'transfer,diffuseg,diffuseg_st'
  return config
