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


def compute_dtype(config):
  """config.train.compute_dtype as a jnp dtype (networks compute in it; params stay float32)."""
  return COMPUTE_DTYPES[config.train.compute_dtype]
