"""Measurement helpers shared by the benchmark harnesses: timing, memory, FLOP counts, the matmul ceiling.

Timing protocol (both harnesses): every implementation is warmed up once, then the timed runs of all
implementations are interleaved (A B C A B C ...), so that load from other processes on a shared machine
hits every implementation alike; each run ends with a blocking wait for its result.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffuseg_jax import runtime


def prepare_process() -> None:
  """Process settings chosen before torch is first imported and before JAX starts its backends (each
  overridable from the environment).

  XLA_FLAGS: the pipeline's CPU flags (diffuseg_jax/runtime.py) unless the user's XLA_FLAGS names them.

  OMP_WAIT_POLICY=PASSIVE: PyTorch's OpenMP workers otherwise spin after every parallel region. With XLA's
  own thread pool in the same process, and on any machine with other load, the spinning threads steal the
  cores the next op needs: on a busy 2-core machine a small torch UNet step ran ~10x slower with spinning
  (0.15-0.43 s vs 0.013 s). Set OMP_WAIT_POLICY=ACTIVE to measure torch with spinning.
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


@dataclasses.dataclass
class Timing:
  """Wall times in seconds of the timed runs of one implementation, each producing `images` images."""

  images: int
  seconds: list[float] = dataclasses.field(default_factory=list)

  def images_per_second(self) -> tuple[float, float, float]:
    """(median, min, max) images/s over the runs."""
    rates = [self.images / s for s in self.seconds]
    return statistics.median(rates), min(rates), max(rates)


@dataclasses.dataclass
class Measurement:
  """What `measure` records for one implementation."""

  timing: Timing
  first_call_s: float  # the warm-up call (includes any compilation done lazily on first call)
  output: Any  # the warm-up call's result
  peak_rss: int = 0  # highest process RSS seen during its timed runs (bytes)
  rss_delta: int = 0  # ... minus the RSS when the run started
  device_peak: int | None = None  # accelerator peak bytes (torch: per implementation; JAX: process-wide)

  def row(self) -> dict[str, Any]:
    return {**rate_cell(self.timing), 'first_call_s': self.first_call_s, 'peak_rss_MiB': mib(self.peak_rss),
            'rss_delta_MiB': mib(self.rss_delta), 'device_peak_MiB': mib(self.device_peak)}


def measure(runs: dict[str, Callable[[], Any]], images: int, repeats: int) -> dict[str, Measurement]:
  """Warm every callable up once, then time `repeats` interleaved rounds (A B C A B C ...).

  Each callable must block until its result is ready. Names starting with 'torch' get torch's CUDA peak
  memory (reset per run) when on GPU; the others JAX's process-wide device peak.
  """
  out = {}
  for name, fn in runs.items():
    t0 = time.perf_counter()
    result = fn()
    out[name] = Measurement(Timing(images), time.perf_counter() - t0, result)
  cuda = torch_device() == 'cuda'
  for _ in range(repeats):
    for name, fn in runs.items():
      m = out[name]
      is_torch = name.startswith('torch')
      if cuda and is_torch:
        torch_or_none().cuda.reset_peak_memory_stats()
      with RssSampler() as rss:
        t0 = time.perf_counter()
        fn()
        m.timing.seconds.append(time.perf_counter() - t0)
      m.peak_rss, m.rss_delta = max(m.peak_rss, rss.peak), max(m.rss_delta, rss.peak - rss.baseline)
      if cuda and is_torch:
        m.device_peak = max(m.device_peak or 0, torch_or_none().cuda.max_memory_allocated())
      elif not is_torch:
        m.device_peak = device_peak_bytes()
  return out


def _current_rss_bytes() -> int:
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
  except (OSError, ValueError, IndexError):
    return 0


def peak_rss_bytes() -> int:
  """Process RSS high-water mark since start (bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == 'darwin' else peak * 1024


class RssSampler:
  """Highest process RSS seen while the context is open (polled every `interval` s; Linux /proc).

  The process-wide high-water mark only grows, so with several implementations in one process it cannot say
  which one used the memory; the sampled peak of a window can (minus the baseline, which is reported too).
  """

  def __init__(self, interval: float = 0.005):
    self.interval, self.peak, self.baseline = interval, 0, 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._poll, daemon=True)

  def _poll(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _current_rss_bytes())
      time.sleep(self.interval)

  def __enter__(self) -> RssSampler:
    self.baseline = self.peak = _current_rss_bytes()
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _current_rss_bytes())


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
  f(a, b).block_until_ready()
  best = min(_time(lambda: f(a, b).block_until_ready()) for _ in range(repeats))
  return 2.0 * n**3 / best / 1e9


def torch_matmul_gflops(n: int, repeats: int = 5, dtype: str = 'float32') -> float | None:
  torch = torch_or_none()
  if torch is None:
    return None
  dev = torch_device()
  a = torch.randn(n, n, device=dev, dtype=getattr(torch, dtype))
  b = torch.randn(n, n, device=dev, dtype=getattr(torch, dtype))
  torch_sync(torch.mm(a, b))
  best = min(_time(lambda: torch_sync(torch.mm(a, b))) for _ in range(repeats))
  return 2.0 * n**3 / best / 1e9


def _time(fn: Callable[[], Any]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


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
    return contextlib.nullcontext()
  import torch

  return torch.autocast(device_type=torch_device(), dtype=getattr(torch, dtype))


def torch_sync(out=None):
  """Block until torch work is done (CUDA is asynchronous; CPU eager is not)."""
  torch = torch_or_none()
  if torch is not None and torch.cuda.is_available():
    torch.cuda.synchronize()
  return out


def environment() -> dict[str, Any]:
  """Machine and library versions for the results header."""
  torch = torch_or_none()
  try:
    import diffusers
    diffusers_version = diffusers.__version__
  except ImportError:
    diffusers_version = None
  dev = jax.devices()[0]
  return {
      'date': datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC'),
      'host': platform.node(),
      'platform': platform.platform(),
      'cpu': _cpu_model(),
      'cpu_count': os.cpu_count(),
      'load_average': os.getloadavg() if hasattr(os, 'getloadavg') else None,
      'python': platform.python_version(),
      'jax': jax.__version__,
      'jax_backend': jax.default_backend(),
      'jax_device': getattr(dev, 'device_kind', str(dev)),
      'jax_device_count': jax.device_count(),
      'XLA_FLAGS': os.environ.get('XLA_FLAGS', ''),
      'OMP_WAIT_POLICY': os.environ.get('OMP_WAIT_POLICY'),
      'torch': getattr(torch, '__version__', None),
      'torch_threads': torch.get_num_threads() if torch is not None else None,
      'diffusers': diffusers_version,
  }


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def progress_line(what: str, rows: Sequence[dict[str, Any]]) -> None:
  """One line per measured case as it finishes (the table comes at the end; a killed run keeps these)."""
  print(f'{what}: ' + ', '.join(f"{r['impl']} {r['img_s']:.4g} img/s (compile {r.get('compile_s') or 0:.1f} s)"
                                for r in rows), flush=True)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
  """A markdown table of `rows` (dicts) restricted to `columns`; floats printed with 3 significant digits."""
  def cell(v):
    if v is None:
      return '-'
    if isinstance(v, float):
      return f'{v:.3g}' if abs(v) < 1e4 else f'{v:.0f}'
    return str(v)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(cell(r.get(c)) for c in columns) + ' |' for r in rows]
  return '\n'.join(lines)


def rate_cell(timing: Timing | None) -> dict[str, Any]:
  if timing is None or not timing.seconds:
    return {'img_s': None, 'img_s_range': None}
  med, lo, hi = timing.images_per_second()
  return {'img_s': med, 'img_s_range': f'{lo:.3g}-{hi:.3g}'}


def mib(n: int | None) -> float | None:
  return None if n is None else n / 2**20


def ratio(a: float | None, b: float | None) -> float | None:
  return None if a is None or b is None or b == 0 else a / b


def write_json(path: str | None, payload: dict[str, Any]) -> None:
  if path:
    with open(path, 'w') as f:
      json.dump(payload, f, indent=1, default=str)


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

def add_harness_args(p: argparse.ArgumentParser) -> None:
  """Options every harness takes: repeats, quick, no-torch, dtype, matmul-n, json."""
  p.add_argument('--repeats', type=int, default=5, help='timed runs per implementation (after a warm-up)')
  p.add_argument('--quick', action='store_true', help='tiny networks, batch 2, 2 runs (what the smoke test runs)')
  p.add_argument('--no-torch', action='store_true', help='skip the PyTorch reference')
  p.add_argument('--dtype', default='float32', choices=tuple(DTYPES),
                 help='compute dtype of the networks (params float32); torch runs under autocast to it')
  p.add_argument('--matmul-n', type=int, default=None, help='matmul ceiling n (default 2048 CPU, 8192 GPU)')
  p.add_argument('--json', default=None, help='also write the results here')


def matmul_n(args: argparse.Namespace) -> int:
  """The matmul ceiling's n: --matmul-n, else 256 for --quick, 8192 on GPU, 2048 otherwise."""
  if args.matmul_n:
    return args.matmul_n
  if args.quick:
    return 256
  return 8192 if jax.default_backend() == 'gpu' else 2048


def new_result(n: int, dtype: str, torch) -> dict[str, Any]:
  """The result skeleton: environment, empty rows and checks, and the matmul ceilings measured now."""
  return {'env': environment(), 'rows': [], 'checks': {},
          'ceiling': {'matmul_n': n, 'dtype': dtype, 'jax_gflop_s': matmul_ceiling_gflops(n, dtype=DTYPES[dtype]),
                      'torch_gflop_s': torch_matmul_gflops(n, dtype=dtype) if torch else None}}


def finish_result(result: dict[str, Any], summary: Callable[[list[dict[str, Any]]], dict]) -> dict[str, Any]:
  """The ceiling measured again after the run (it drifts on a busy machine) and the summary values."""
  c = result['ceiling']
  c['jax_gflop_s_after'] = matmul_ceiling_gflops(c['matmul_n'], dtype=DTYPES[c['dtype']])
  result['summary'] = summary(result['rows'])
  return result


def summary_line(values: dict[str, float | None]) -> str:
  return ' '.join(f'{k}={"n/a" if v is None else f"{v:.3f}"}' for k, v in values.items())


def report(result: dict[str, Any], columns: Sequence[str], check_name: str, json_path: str | None) -> None:
  """Prints the ceilings, the equivalence checks, the table and (last) the summary line; writes the json."""
  c = result['ceiling']
  print(f"matmul ceiling ({c['matmul_n']}^2 {c.get('dtype', 'float32')}): jax {c['jax_gflop_s']:.1f} GFLOP/s (after: "
        f"{c['jax_gflop_s_after']:.1f}), torch {c['torch_gflop_s'] or float('nan'):.1f} GFLOP/s")
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
