"""Test-session setup: 8 virtual CPU devices, so that sharding over a mesh is exercised without accelerators.

These variables must be set before jax is first imported, which is why they live at conftest import time.
"""

import os

_DEVICE_FLAG = '--xla_force_host_platform_device_count=8'

if _DEVICE_FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = ' '.join(filter(None, [os.environ.get('XLA_FLAGS', ''), _DEVICE_FLAG]))
os.environ['JAX_PLATFORMS'] = 'cpu'

# One persistent XLA compilation cache for the whole session (inherited by subprocess tests): the pipeline
# tests compile many identical programs (per stage, per seed, per dataset), which then compile only once.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import tempfile

  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='diffuseg_xla_cache_')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
