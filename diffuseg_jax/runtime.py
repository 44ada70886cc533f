"""Process-wide JAX settings chosen in code (each one overridable by the user's environment).

- A persistent XLA compilation cache (default ~/.cache/diffuseg_jax/xla; `JAX_COMPILATION_CACHE_DIR`
  overrides, an empty value disables): reruns, resumed jobs and the per-seed segmentation runs, which
  compile identical programs, then skip most compile time.
"""

from __future__ import annotations

import os

import jax

DEFAULT_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'diffuseg_jax', 'xla')


def configure() -> None:
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR', DEFAULT_CACHE)
  if cache:
    try:
      os.makedirs(cache, exist_ok=True)
    except OSError:
      return  # an unwritable cache folder only costs compile time
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
