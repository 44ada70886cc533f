"""Process-wide JAX settings chosen in code (each one overridable by the user's environment).

- XLA CPU flags (`CPU_XLA_FLAGS`), added to `XLA_FLAGS` unless the user's `XLA_FLAGS` already names the flag:
  `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` keeps convolutions out of XLA's YNNPACK
  path, whose convolutions are slower than the default kernels for these networks. Measured on a 2-core CPU
  (benchmarks/, batch 16, alternating processes, two rounds each): train steps of the mnist_m networks
  +5..+40 %, of the mscmr ones +25..+45 %, the mscmr sampler 12.5-13.3 -> 19.4 img/s (see
  benchmarks/RESULTS.md). The flags only touch the CPU backend; on GPU they change nothing.
- A persistent XLA compilation cache (default ~/.cache/diffuseg_jax/xla; `JAX_COMPILATION_CACHE_DIR`
  overrides, an empty value disables): reruns, resumed jobs and the per-seed segmentation runs, which
  compile identical programs, then skip most compile time.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

DEFAULT_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'diffuseg_jax', 'xla')


CPU_XLA_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=-individual_convolution',)


def set_xla_flags(environ=os.environ) -> None:
  """Append CPU_XLA_FLAGS to XLA_FLAGS (each unless already named there; none when DIFFUSEG_CPU_XLA_FLAGS=0,
  e.g. for a jaxlib that does not know them: XLA aborts on an unknown flag). Effective only before JAX's
  backends start, i.e. before the first computation or device query."""
  if environ.get('DIFFUSEG_CPU_XLA_FLAGS', '1') == '0':
    return
  current = environ.get('XLA_FLAGS', '')
  for flag in CPU_XLA_FLAGS:
    if flag.split('=')[0] not in current:
      current = f'{current} {flag}'.strip()
  environ['XLA_FLAGS'] = current


def configure() -> None:
  set_xla_flags()
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR', DEFAULT_CACHE)
  if cache:
    try:
      os.makedirs(cache, exist_ok=True)
    except OSError:
      return  # an unwritable cache folder only costs compile time
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
AUTO, INHERIT = 'auto', 'inherit'
# The network sections with their own `compute_dtype` (INHERIT: train.compute_dtype's).
DTYPE_SECTIONS = ('vae', 'autoencoder', 'diffusion', 'segmentation')


def auto_dtype(config, section: str, backend: str | None = None) -> str:
  """What train.compute_dtype='auto' gives `section` on `backend` (default: this process's).

  Measured on an H200 (benchmarks/RESULTS.md): bfloat16 doubles the FFD-VAE's train steps (+84 % at batch
  64, +106 % at 256) but slows the small diffusion UNet's (-20 % at batch 64: casts cost more than its narrow
  convolutions save); a Stable-Diffusion-sized UNet is the size bfloat16 is made for. CPUs emulate bfloat16,
  so they keep float32. Unmeasured networks (KL autoencoder, segmenter) keep float32.
  """
  backend = backend or jax.default_backend()
  if backend not in ('gpu', 'cuda', 'rocm', 'tpu'):
    return 'float32'
  if section == 'vae' or (section == 'diffusion' and config.diffusion.get('pretrained_unet_path')):
    return 'bfloat16'
  return 'float32'


def dtype_name(config, section: str | None = None) -> str:
  """The compute dtype name of `section`'s network: its own field, else train.compute_dtype ('auto' resolved)."""
  own = config[section].get('compute_dtype', INHERIT) if section and section in config else INHERIT
  name = config.train.compute_dtype if own in (INHERIT, None) else own
  return auto_dtype(config, section) if name == AUTO and section else ('float32' if name == AUTO else name)


def compute_dtype(config, section: str | None = None):
  """The jnp compute dtype of `section`'s network (params stay float32); no section: train.compute_dtype."""
  return COMPUTE_DTYPES[dtype_name(config, section)]


def resolve_compute_dtypes(config) -> None:
  """With train.compute_dtype='auto', writes each inheriting section's dtype on this backend into the config
  (in place, before fingerprints): the run records, and is identified by, what it computes in."""
  if config.train.compute_dtype != AUTO:
    return
  for section in DTYPE_SECTIONS:
    if section in config and config[section].get('compute_dtype', INHERIT) in (INHERIT, None):
      config[section].compute_dtype = auto_dtype(config, section)
