"""Your own data in the generic folder layout (see diffuseg_jax/data/folder.py for the layout).

Run:  python -m diffuseg_jax.main --config=configs/folder.py --config.data.root=PATH --workdir=runs/folder

`default.py` is loaded from this file's own folder (not through `import configs...`), so the config works
whatever the current directory is, and from tests, without `configs/` being a package or on sys.path.
"""

from diffuseg_jax.config_files import load_sibling


def get_config():
  config = load_sibling(__file__).get_config()
  config.data.name = 'folder'
  config.data.image_size = 64
  config.data.empty_slices = 'drop_source'  # source slices without foreground teach nothing about shape
  return config
