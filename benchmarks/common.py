"""Measurement helpers shared by the benchmark harnesses: timing, memory, FLOP counts, the matmul ceiling.

The framework-free helpers live in benchmarks/measure.py (re-exported here), so that the timing processes of
the separate-process method (benchmarks/worker.py) import only their own framework. This module imports JAX
(and PyTorch only inside the functions for the in-process mode, `--same-process`).

Timing protocol (both harnesses): every implementation is warmed up once, then the timed runs of the
implementations in one process are interleaved (A B C A B C ...), so that load from other processes on a
shared machine hits them alike; each run ends with a blocking wait for its result.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import measure as _measure
from benchmarks.measure import (  # noqa: F401 - re-exported
    Measurement,
    RssSampler,
    Timing,
    format_table,
    geomean,
    host_environment,
    mib,
    peak_rss_bytes,
    progress_line,
    rate_cell,
    ratio,
    summary_line,
    write_json,
)
from diffuseg_jax import runtime


def prepare_process() -> None:
  """Settings of a process that runs PyTorch and JAX together (the `--same-process` mode and the equivalence
  check), chosen before torch is first imported and before JAX starts its backends (each overridable from
  the environment).

  XLA_FLAGS: the pipeline's CPU flags (diffuseg_jax/runtime.py) unless the user's XLA_FLAGS names them.

  OMP_WAIT_POLICY=PASSIVE: PyTorch's OpenMP workers otherwise spin after every parallel region. With XLA's
  own thread pool in the same process, and on any machine with other load, the spinning threads steal the
  cores the next op needs: on a busy 2-core machine a small torch UNet step ran ~10x slower with spinning
  (0.15-0.43 s vs 0.013 s). The default mode (separate processes) does not need this: there each PyTorch
  timing process runs alone, once with ACTIVE and once with PASSIVE.
  """
  os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
  runtime.set_xla_flags()  # the XLA CPU flags the pipeline runs with (diffuseg_jax/runtime.py)


def torch_or_none():
  """The torch module, or None when the optional `bench` extra is not installed."""
  try:
    import torch
  except ImportError:
    return None
  return torch


def measure(runs: dict[str, Callable[[], Any]], images: int, repeats: int) -> dict[str, Measurement]:
  """`measure.measure` for one process holding JAX and maybe PyTorch implementations (`--same-process`).

  Names starting with 'torch' get torch's CUDA peak memory (reset per run) when on GPU; the others JAX's
  process-wide device peak.
  """
  cuda = torch_device() == 'cuda'

  def before(name):
    if cuda and name.startswith('torch'):
      torch_or_none().cuda.reset_peak_memory_stats()

  def peak(name):
    if name.startswith('torch'):
      return torch_or_none().cuda.max_memory_allocated() if cuda else None
    return device_peak_bytes()

  return _measure.measure(runs, images, repeats, before, peak)


def device_peak_bytes() -> int | None:
  """Peak bytes in use on the first JAX device (accelerators only; None on CPU)."""
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != 'cpu' else None
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def xla_flops(program) -> float | None:
  """FLOPs of one execution of an XLA program, from XLA's cost analysis (None if unavailable).

  Pass the `Lowered` program (jit(f).lower(...)): its analysis runs on the HLO before backend passes and is
  the same on every device. A GPU-`Compiled` program's analysis misses the convolutions, which become cuDNN
  custom calls there (an H200 run reported ~1/18 of the true FLOPs); on CPU both agree to 0.2 %."""
  try:
    cost = program.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = cost.get('flops') if cost else None
  return float(flops) if flops and flops > 0 else None


DTYPES = runtime.COMPUTE_DTYPES  # the pipeline's train.compute_dtype choices


def matmul_ceiling_gflops(n: int, repeats: int = 5, dtype: Any = jnp.float32) -> float:
  """Best-of-`repeats` GFLOP/s of a jitted [n, n] @ [n, n] in `dtype` on the default device: a dense-compute
  ceiling for this machine, measured in the same process (and load) as the benchmark."""
  key = jax.random.key(0)
  a = jax.random.normal(key, (n, n), dtype)
  b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), dtype)
  f = jax.jit(jnp.matmul)
  return _measure.matmul_gflops(n, _measure.best_seconds(lambda: f(a, b).block_until_ready(), repeats))


def torch_matmul_gflops(n: int, repeats: int = 5, dtype: str = 'float32') -> float | None:
  if torch_or_none() is None:
    return None
  from benchmarks import torch_side

  return torch_side.matmul_gflops(n, torch_device(), dtype, repeats)


def torch_device():
  torch = torch_or_none()
  on_gpu = torch is not None and torch.cuda.is_available() and jax.default_backend() == 'gpu'
  return 'cuda' if on_gpu else 'cpu'


def equivalence_tolerance() -> float:
  """Relative tolerance of the ours-vs-torch checks: 1e-3 on CPU; 5e-2 on GPUs, where both stacks run float32
  convolutions (and XLA also matmuls) in TF32 by default, whose 10-bit mantissa gives ~1e-3 per op."""
  return 1e-3 if jax.default_backend() == 'cpu' else 5e-2


def torch_autocast(dtype: str):
  """The torch counterpart of our compute dtype: autocast to bfloat16 (params stay float32), else nothing."""
  if dtype == 'float32':
    import contextlib

    return contextlib.nullcontext()
  from benchmarks import torch_side

  return torch_side.autocast(torch_device(), dtype)


def torch_sync(out=None):
  """Block until torch work is done (CUDA is asynchronous; CPU eager is not)."""
  torch = torch_or_none()
  if torch is not None and torch.cuda.is_available():
    torch.cuda.synchronize()
  return out


def jax_environment() -> dict[str, Any]:
  """JAX's part of the results header (a JAX timing process reports it; imports no torch)."""
  dev = jax.devices()[0]
  return {'jax': jax.__version__, 'jax_backend': jax.default_backend(),
          'jax_device': getattr(dev, 'device_kind', str(dev)), 'jax_device_count': jax.device_count(),
          'XLA_FLAGS': os.environ.get('XLA_FLAGS', '')}


def environment() -> dict[str, Any]:
  """Machine and library versions for the results header of the in-process mode (imports torch)."""
  torch = torch_or_none()
  try:
    import diffusers
    diffusers_version = diffusers.__version__
  except ImportError:
    diffusers_version = None
  return {**host_environment(), **jax_environment(),
          'OMP_WAIT_POLICY': os.environ.get('OMP_WAIT_POLICY'),
          'torch': getattr(torch, '__version__', None),
          'torch_threads': torch.get_num_threads() if torch is not None else None,
          'diffusers': diffusers_version}


def host_params(init_fn: Callable[[jax.Array], Any], seed: int = 0):
  """Random float32 parameters with the tree of `init_fn(key)` (e.g. `lambda k: model.init(k, x)['params']`),
  drawn on the host with numpy: kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.05^2), everything else
  (biases, the null condition) N(0, 0.05^2).

  Why not the modules' own init: on XLA CPU, compiling a network's init (one threefry per leaf) took ~40 s
  on a busy 2-core machine, longer than the benchmark itself; only the tree is traced here. Every leaf is
  non-zero (an untrained CondUNet's output conv is zero, which would make an equivalence check trivial).
  """
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    names = [str(getattr(k, 'key', k)) for k in path]
    shape = leaf.shape
    if names[-1] == 'kernel':
      fan_in = shape[0] if any(n in ('query', 'key', 'value') for n in names) else int(np.prod(shape[:-1]))
      return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    base = 1.0 if names[-1] == 'scale' else 0.0
    return (base + 0.05 * rng.standard_normal(shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(lambda p, x: jnp.asarray(draw(p, x)), abstract)


def param_count(params) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


# --- the harness shared by sampler.py and train_step.py -----------------------------------------------------

OMP_POLICIES = ('active', 'passive')
BASELINES = {False: 'separate_processes', True: 'same_process'}  # keyed by --same-process


def add_harness_args(p: argparse.ArgumentParser) -> None:
  """Options every harness takes: repeats, quick, no-torch, dtype, matmul-n, json, and the method's."""
  p.add_argument('--repeats', type=int, default=None,
                 help='timed runs per implementation, after a warm-up (default 5; --quick: 2)')
  p.add_argument('--quick', action='store_true',
                 help='tiny networks; batch 2 and 2 runs unless given (what the smoke test runs)')
  p.add_argument('--no-torch', action='store_true', help='skip the PyTorch reference')
  p.add_argument('--dtype', default='float32', choices=tuple(DTYPES),
                 help='compute dtype of the networks (params float32); torch runs under autocast to it')
  p.add_argument('--matmul-n', type=int, default=None, help='matmul ceiling n (default 2048 CPU, 8192 GPU)')
  p.add_argument('--json', default=None, help='also write the results here')
  p.add_argument('--same-process', action='store_true',
                 help='the old method: all implementations interleaved in this one process, torch with '
                      'OMP_WAIT_POLICY=PASSIVE (default: one process per framework, see benchmarks/worker.py)')
  p.add_argument('--omp-policies', default=','.join(OMP_POLICIES),
                 help='OMP_WAIT_POLICY values PyTorch is timed with, one process each; the faster one is '
                      'the torch number of the ratios')
  p.add_argument('--work-dir', default=None,
                 help="keep the processes' specs, .npz inputs, outputs and logs here (default: a temporary "
                      'folder, removed at the end)')


def omp_policies(args: argparse.Namespace) -> tuple[str, ...]:
  return names(args.omp_policies.lower(), OMP_POLICIES, 'OMP_WAIT_POLICY values')


def matmul_n(args: argparse.Namespace) -> int:
  """The matmul ceiling's n of this process's JAX backend (see `resolve_matmul_n`)."""
  return resolve_matmul_n(args.matmul_n, args.quick, None)


def resolve_matmul_n(n: int | None, quick: bool, backend: str | None) -> int:
  """The matmul ceiling's n: `n` (--matmul-n), else 256 for --quick, 8192 on GPU, 2048 otherwise. `backend`:
  JAX's default backend as reported by a process that started it (None: start it here and ask)."""
  if n:
    return n
  if quick:
    return 256
  return 8192 if (backend or jax.default_backend()) == 'gpu' else 2048


def importable(*modules: str) -> bool:
  """Whether all `modules` can be imported (without importing them: the parent of the timing processes
  loads neither framework's runtime)."""
  import importlib.util

  return all(importlib.util.find_spec(m) is not None for m in modules)


def new_result(n: int, dtype: str, torch) -> dict[str, Any]:
  """The result skeleton of the in-process mode: environment, empty rows and checks, and the matmul
  ceilings measured now."""
  return {'method': BASELINES[True], 'env': environment(), 'rows': [], 'checks': {},
          'ceiling': {'matmul_n': n, 'dtype': dtype, 'jax_gflop_s': matmul_ceiling_gflops(n, dtype=DTYPES[dtype]),
                      'torch_gflop_s': torch_matmul_gflops(n, dtype=dtype) if torch else None}}


def finish_result(result: dict[str, Any], summary: Callable[..., dict]) -> dict[str, Any]:
  """The ceiling measured again after the run (it drifts on a busy machine) and the summary values."""
  c = result['ceiling']
  c['jax_gflop_s_after'] = matmul_ceiling_gflops(c['matmul_n'], dtype=DTYPES[c['dtype']])
  result['summary'] = summary(result['rows'], baseline=BASELINES[True])
  return result


# --- the separate-process method (benchmarks/worker.py), the parent's side ----------------------------------

def framework_of(process: Mapping[str, Any]) -> str | None:
  """'numpy', 'jax', 'torch_active', 'torch_passive' (whose ceiling a process measured); None: the check."""
  role = process['role']
  if role == 'torch':
    return f"torch_{(process.get('OMP_WAIT_POLICY') or 'default').lower()}"
  return role if role in ('numpy', 'jax') else None


def ceilings(processes: Sequence[Mapping[str, Any]], n: int, dtype: str) -> dict[str, Any]:
  """The matmul ceilings of a run: per framework, the median and range over its processes (each measured its
  own), and the best of all. numpy's is float32 whatever `dtype` (numpy has no bfloat16)."""
  out: dict[str, Any] = {'matmul_n': n, 'dtype': dtype}
  for p in processes:
    kind = framework_of(p)
    if kind and p.get('ceiling_gflop_s'):
      out.setdefault(kind, []).append(p['ceiling_gflop_s'])
  best = None
  for kind in [k for k in out if k not in ('matmul_n', 'dtype')]:
    values = out[kind]
    out[kind] = {'gflop_s': float(np.median(values)), 'min': min(values), 'max': max(values),
                 'processes': len(values)}
    best = max(best or 0.0, max(values))
  out['best_gflop_s'] = best
  return out


def best_torch(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
  """The fastest torch row of one case (the OpenMP policy that won there): the torch number of the ratios."""
  torch_rows = [r for r in rows if r['impl'].startswith('torch') and r.get('img_s')]
  return max(torch_rows, key=lambda r: r['img_s'], default=None)


def finish_rows(rows: Sequence[dict[str, Any]], case_fields: Sequence[str], best_ceiling: float | None) -> None:
  """Fills the per-case columns in place: gflop_s (the JAX cost analysis' FLOPs per image, the same for every
  implementation of a case), frac_of_matmul (against the ceiling measured in the row's own process),
  frac_of_best_matmul (against the best ceiling of the run), vs_torch (against the case's best torch row)."""
  cases: dict[tuple, list[dict[str, Any]]] = {}
  for r in rows:
    cases.setdefault(tuple(r[f] for f in case_fields), []).append(r)
  for case_rows in cases.values():
    jax_row = next((r for r in case_rows if r.get('gflop_per_image')), {})
    best = best_torch(case_rows)
    for r in case_rows:
      per_image = jax_row.get('gflop_per_image')
      r['step_gflop'] = r.get('step_gflop') or jax_row.get('step_gflop')
      r['gflop_s'] = per_image * r['img_s'] if per_image and r.get('img_s') else None
      r['frac_of_matmul'] = ratio(r['gflop_s'], r.get('matmul_gflop_s'))
      r['frac_of_best_matmul'] = ratio(r['gflop_s'], best_ceiling)
      r['vs_torch'] = ratio(r.get('img_s'), best['img_s']) if best else None


def worker_row(out: Mapping[str, Any]) -> dict[str, Any]:
  """A timing process's row: its timings, `peak_rss_MiB` = that process's peak RSS (ru_maxrss right after
  its timed runs), its own matmul ceiling, and which frameworks it had imported."""
  return {**out['row'], 'peak_rss_MiB': mib(out['peak_rss']), 'matmul_gflop_s': out['ceiling_gflop_s'],
          'modules': out['modules']}


def shared_torch_env(out: Mapping[str, Any]) -> dict[str, Any]:
  """A torch process's environment minus its OMP_WAIT_POLICY (each torch row's impl names that)."""
  return {k: v for k, v in out['env'].items() if k != 'OMP_WAIT_POLICY'}


def report(result: dict[str, Any], columns: Sequence[str], check_name: str, json_path: str | None) -> None:
  """Prints the ceilings, the equivalence checks, the table and (last) the summary line; writes the json."""
  c = result['ceiling']
  if result.get('method') == BASELINES[False]:
    kinds = [k for k in ('numpy', 'jax', 'torch_active', 'torch_passive', 'torch_default') if k in c]
    print(f"matmul ceiling ({c['matmul_n']}^2 {c['dtype']}, numpy float32; each in its own framework's "
          'processes, median [min-max] GFLOP/s): ' + ', '.join(
              f"{k} {c[k]['gflop_s']:.1f} [{c[k]['min']:.1f}-{c[k]['max']:.1f}]" for k in kinds))
    procs = result['processes']
    print(f"{len(procs)} processes; imported frameworks: " + ', '.join(
        sorted({f"{p['role']}={'+'.join(p['modules']) or 'none'}" for p in procs})))
  else:
    print(f"matmul ceiling ({c['matmul_n']}^2 {c.get('dtype', 'float32')}): jax {c['jax_gflop_s']:.1f} GFLOP/s "
          f"(after: {c['jax_gflop_s_after']:.1f}), torch {c['torch_gflop_s'] or float('nan'):.1f} GFLOP/s")
  for name, checks in result['checks'].items():
    if checks:
      print(f'{name}: {check_name} == ours: ' + ', '.join(f'{k}={v:.1e}' for k, v in checks.items()))
  print(format_table(result['rows'], columns))
  write_json(json_path, result)
  print(summary_line(result['summary']), flush=True)


def names(value: str, choices: Sequence[str], what: str) -> tuple[str, ...]:
  """A comma-separated option (e.g. --configs) as a tuple of names from `choices`; exits on an unknown one."""
  picked = tuple(v for v in value.split(',') if v)
  bad = [v for v in picked if v not in choices]
  if bad or not picked:
    raise SystemExit(f'error: unknown {what} {bad}; choose from {list(choices)}')
  return picked
