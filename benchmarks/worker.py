"""One framework per process: the timing processes of both harnesses, and the parent's side that starts them.

    python -m benchmarks.worker SPEC.json OUT.json      # what `Session.spawn` runs; not meant to be typed

Roles (spec['role']):
  check  JAX and PyTorch together: builds each case's weights and inputs, writes them to an .npz for the other
         processes, and runs the equivalence checks (an AssertionError there fails the whole run before any
         timing starts). OMP_WAIT_POLICY=PASSIVE (common.prepare_process); nothing is timed.
  jax    times one JAX implementation of one case; never imports torch; OMP_WAIT_POLICY is not set.
  torch  times the PyTorch reference of one case with the weights of the .npz; never imports jax; runs with
         PyTorch's default threads and the OMP_WAIT_POLICY the parent gives it (ACTIVE or PASSIVE).
  numpy  the numpy matmul ceiling only (imports neither framework).
Every timing process also measures its own framework's [n, n] matmul ceiling (after its timed runs) and
reports its peak RSS (ru_maxrss, read right after the timed runs), and which of jax/torch it had imported.
This module imports neither framework itself; a role imports its own.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from typing import Any

from benchmarks import measure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(spec: dict[str, Any]) -> dict[str, Any]:
  role, n = spec['role'], spec.get('matmul_n')
  if role == 'numpy':
    return {'ceiling_gflop_s': measure.numpy_matmul_gflops(n)}
  if role == 'torch':
    from benchmarks import torch_side

    fn = torch_side.sampler_worker if spec['harness'] == 'sampler' else torch_side.train_worker
    out = fn(spec)
    out['peak_rss'] = measure.peak_rss_bytes()
    out['ceiling_gflop_s'] = torch_side.matmul_gflops(n, spec['torch_device'], spec['dtype'])
    return out
  if role not in ('jax', 'check'):
    raise ValueError(f'unknown role {role!r}')
  from benchmarks import common

  if role == 'check':
    common.prepare_process()  # both frameworks in this process: torch's OpenMP threads must not spin
  else:
    from diffuseg_jax import runtime

    runtime.set_xla_flags()
  harness = importlib.import_module(f"benchmarks.{spec['harness']}")
  if role == 'check':
    return harness.check_worker(spec)
  out = harness.jax_worker(spec)
  out['peak_rss'] = measure.peak_rss_bytes()
  out['ceiling_gflop_s'] = common.matmul_ceiling_gflops(n, dtype=common.DTYPES[spec['dtype']])
  return out


def main(argv=None) -> int:
  spec_path, out_path = argv if argv is not None else sys.argv[1:]
  with open(spec_path) as f:
    spec = json.load(f)
  try:
    result, status = _run(spec), 0
  except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
    result, status = {'error': f'{type(e).__name__}: {e}', 'error_type': type(e).__name__,
                      'traceback': traceback.format_exc()}, 1
  result['modules'] = measure.loaded_frameworks()
  measure.write_json(out_path, result)
  return status


# --- the parent's side -------------------------------------------------------------------------------------

# Environment of each role's process (None removes the variable): JAX gets no OpenMP setting at all (XLA's CPU
# backend does not use OpenMP); the check process sets PASSIVE itself.
ROLE_ENV = {'jax': {'OMP_WAIT_POLICY': None}, 'check': {'OMP_WAIT_POLICY': None},
            'numpy': {'OMP_WAIT_POLICY': None}}


def _children_cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def torch_env(policy: str) -> dict[str, str]:
  return {'OMP_WAIT_POLICY': policy.upper()}


class Session:
  """A folder for the specs, .npz files, outputs and logs of the processes of one run, and the record of
  every process started (`processes`). The folder is a temporary one unless `work_dir` is given (kept)."""

  def __init__(self, work_dir: str | None = None):
    self.keep = bool(work_dir)
    self.dir = os.path.abspath(work_dir) if work_dir else tempfile.mkdtemp(prefix='benchmarks-')
    os.makedirs(self.dir, exist_ok=True)
    self.processes: list[dict[str, Any]] = []

  def path(self, name: str) -> str:
    return os.path.join(self.dir, name)

  def spawn(self, name: str, spec: dict[str, Any], env: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """Runs `python -m benchmarks.worker` on `spec` in a fresh process and returns what it reported. Raises
    the worker's AssertionError (a failed equivalence check) as an AssertionError, anything else as a
    RuntimeError, with the worker's traceback."""
    spec_path, out_path, log_path = (self.path(f'{name}.{ext}') for ext in ('spec.json', 'out.json', 'log'))
    measure.write_json(spec_path, spec)
    environ = dict(os.environ)
    for k, v in {**ROLE_ENV.get(spec['role'], {}), **(env or {})}.items():
      if v is None:
        environ.pop(k, None)
      else:
        environ[k] = v
    environ['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, environ.get('PYTHONPATH')) if p)
    t0, cpu0 = time.perf_counter(), _children_cpu_s()
    with open(log_path, 'w') as log:
      rc = subprocess.run([sys.executable, '-m', 'benchmarks.worker', spec_path, out_path], env=environ,
                          stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    wall, cpu = time.perf_counter() - t0, _children_cpu_s() - cpu0
    result = {}
    if os.path.exists(out_path):
      with open(out_path) as f:
        result = json.load(f)
    if rc != 0 or 'error' in result:
      with open(log_path) as f:
        tail = ''.join(f.readlines()[-30:])
      error = AssertionError if result.get('error_type') == 'AssertionError' else RuntimeError
      raise error(f"{name} process failed (exit {rc}): {result.get('error', '')}\n"
                  f"{result.get('traceback') or tail}")
    self.processes.append({'name': name, 'role': spec['role'], 'impl': spec.get('impl', spec['role']),
                           'modules': result.get('modules'), 'wall_s': wall, 'cpu_s': cpu,
                           'OMP_WAIT_POLICY': environ.get('OMP_WAIT_POLICY'),
                           'peak_rss_MiB': measure.mib(result.get('peak_rss')),
                           'ceiling_gflop_s': result.get('ceiling_gflop_s')})
    return result

  def close(self) -> None:
    if not self.keep:
      shutil.rmtree(self.dir, ignore_errors=True)

  def __enter__(self) -> Session:
    return self

  def __exit__(self, *exc):
    self.close()


if __name__ == '__main__':
  sys.exit(main())
