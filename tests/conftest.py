"""Test-session setup: 8 virtual CPU devices, so that sharding over a mesh is exercised without accelerators.

These variables must be set before jax is first imported, which is why they live at conftest import time.
"""

import os

_DEVICE_FLAG = '--xla_force_host_platform_device_count=8'
# The suite's programs are tiny and each runs a few steps: XLA's CPU backend optimisation (LLVM -O2 and its
# expensive passes) costs more compile time than it saves in run time (measured: the tiny pipeline 179 s ->
# 135 s). Results stay within the tests' float tolerances; a flag the user already set is left alone.
_FAST_COMPILE_FLAGS = ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true')

for _flag in (_DEVICE_FLAG, *_FAST_COMPILE_FLAGS):
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = ' '.join(filter(None, [os.environ.get('XLA_FLAGS', ''), _flag]))
os.environ['JAX_PLATFORMS'] = 'cpu'

from diffuseg_jax import runtime  # noqa: E402 - importing jax starts no backend; XLA_FLAGS is read later

runtime.set_xla_flags()  # the CPU flags of the main command, also for in-process pipeline tests

# One persistent XLA compilation cache for the whole session (inherited by subprocess tests): the pipeline
# tests compile many identical programs (per stage, per seed, per dataset), which then compile only once.
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ  # made here (the main process): removed at the end
if _OWN_CACHE:
  import tempfile

  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='diffuseg_xla_cache_')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
# jax was imported above (diffuseg_jax.runtime), so it has already read its environment: set the cache in its
# config too, or in-process pipeline runs would compile every program again.
import jax  # noqa: E402

jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs',
                  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))

# No Python source locations in the lowered programs (JAX's defaults record up to 100 frames per op, for
# profiles and HLO dumps that the tests never read): the tiny pipeline traces, lowers and compiles in 63 s
# instead of 71 s (measured on 2 CPU cores). Errors raised while tracing keep their Python tracebacks.
os.environ.setdefault('JAX_TRACEBACK_IN_LOCATIONS_LIMIT', '0')  # the variables: for the subprocess tests
os.environ.setdefault('JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS', '0')
jax.config.update('jax_traceback_in_locations_limit', int(os.environ['JAX_TRACEBACK_IN_LOCATIONS_LIMIT']))
jax.config.update('jax_include_full_tracebacks_in_locations',
                  os.environ['JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS'].lower() in ('1', 'true'))


# The longest modules first (measured with --durations on 2 CPU cores, 2026-12-03: 500, 300, 230, 150-200 s
# down to about 30 s): the parallel workers take modules in the order collected (pyproject.toml turns off
# xdist's reordering by test count), so a long one started last would leave the other worker idle at the end.
LONGEST_FIRST = ('test_pipeline_e2e.py', 'test_medical_e2e.py', 'test_retina_e2e.py', 'test_benchmarks_smoke.py',
                 'test_multiprocess.py', 'test_preemption.py', 'test_stable_diffusion.py', 'test_cli.py',
                 'test_few_shot.py', 'test_selection.py', 'test_sd_benchmark_smoke.py', 'test_models.py',
                 'test_diffusers_adapter.py', 'test_metrics_image_quality.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order


def pytest_sessionfinish(session):
  """Remove the session's compilation cache (a new one per session, never reused) if this process made it; workers
  inherit the variable, so only the main process, which outlives them, removes it."""
  if _OWN_CACHE:
    import shutil

    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
