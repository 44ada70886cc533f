"""Measurement helpers that import neither JAX nor PyTorch (numpy and the standard library only).

Every timing process of the separate-process method (benchmarks/worker.py) uses these, so that a PyTorch
process never loads JAX and a JAX process never loads PyTorch: another framework's thread pools, allocator
and import-time state would be in the measurement otherwise. benchmarks/common.py re-exports them.

Timing protocol: every implementation in a process is warmed up once, then the timed runs of its
implementations are interleaved (A B C A B C ...); each run ends with a blocking wait for its result.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

FRAMEWORKS = ('jax', 'torch')


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


def measure(runs: dict[str, Callable[[], Any]], images: int, repeats: int,
            before_run: Callable[[str], None] | None = None,
            device_peak: Callable[[str], int | None] | None = None) -> dict[str, Measurement]:
  """Warm every callable up once, then time `repeats` interleaved rounds (A B C A B C ...).

  Each callable must block until its result is ready. `before_run(name)` runs before each timed run
  (e.g. to reset an accelerator's peak counter), `device_peak(name)` after it (the peak to record).
  """
  out = {}
  for name, fn in runs.items():
    t0 = time.perf_counter()
    result = fn()
    out[name] = Measurement(Timing(images), time.perf_counter() - t0, result)
  for _ in range(repeats):
    for name, fn in runs.items():
      m = out[name]
      if before_run is not None:
        before_run(name)
      with RssSampler() as rss:
        t0 = time.perf_counter()
        fn()
        m.timing.seconds.append(time.perf_counter() - t0)
      m.peak_rss, m.rss_delta = max(m.peak_rss, rss.peak), max(m.rss_delta, rss.peak - rss.baseline)
      peak = device_peak(name) if device_peak is not None else None
      if peak is not None:
        m.device_peak = max(m.device_peak or 0, peak)
  return out


def current_rss_bytes() -> int:
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
      self.peak = max(self.peak, current_rss_bytes())
      time.sleep(self.interval)

  def __enter__(self) -> RssSampler:
    self.baseline = self.peak = current_rss_bytes()
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, current_rss_bytes())


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """The fastest of `repeats` calls of `fn` (after one untimed warm-up call)."""
  fn()
  return min(elapsed(fn) for _ in range(repeats))


def elapsed(fn: Callable[[], Any]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def matmul_gflops(n: int, seconds: float) -> float:
  return 2.0 * n**3 / seconds / 1e9


def numpy_matmul_gflops(n: int, repeats: int = 5) -> float:
  """Best-of-`repeats` GFLOP/s of a float32 [n, n] @ [n, n] in numpy (its bundled BLAS, default threads)."""
  rng = np.random.default_rng(0)
  a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
  return matmul_gflops(n, best_seconds(lambda: a @ b, repeats))


def loaded_frameworks() -> list[str]:
  """Which of JAX and PyTorch this process has imported: what each timing process reports about itself."""
  return sorted(m for m in sys.modules if m in FRAMEWORKS)


def host_environment() -> dict[str, Any]:
  """The machine and Python of the results header (each framework process adds its own versions)."""
  return {
      'date': datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC'),
      'host': platform.node(),
      'platform': platform.platform(),
      'cpu': _cpu_model(),
      'cpu_count': os.cpu_count(),
      'load_average': os.getloadavg() if hasattr(os, 'getloadavg') else None,
      'python': platform.python_version(),
      'numpy': np.__version__,
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


# --- parameter trees through .npz files (what the PyTorch processes get instead of JAX arrays) ---------------

def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, np.ndarray]:
  """A nested mapping of arrays as {'a/b/c': array} (linen parameter names contain no '/')."""
  out = {}
  for k, v in tree.items():
    key = f'{prefix}{k}'
    if isinstance(v, Mapping):
      out.update(flatten(v, key + '/'))
    else:
      out[key] = np.asarray(v)
  return out


def unflatten(flat: Mapping[str, np.ndarray], prefix: str) -> dict[str, Any]:
  """The nested dict of the entries of `flat` under `prefix` ('params/' -> the parameter tree)."""
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    if not key.startswith(prefix):
      continue
    *parents, leaf = key[len(prefix):].split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = np.asarray(value)
  return tree


def load_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


# --- tables and summaries ---------------------------------------------------------------------------------

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


def geomean(values: Sequence[float | None]) -> float | None:
  values = [v for v in values if v]
  return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summary_line(values: Mapping[str, Any]) -> str:
  """`key=value ...`: floats with 3 decimals, None as n/a, strings as they are."""
  def fmt(v):
    if v is None:
      return 'n/a'
    return v if isinstance(v, str) else f'{v:.3f}'
  return ' '.join(f'{k}={fmt(v)}' for k, v in values.items())


def write_json(path: str | None, payload: dict[str, Any]) -> None:
  if path:
    with open(path, 'w') as f:
      json.dump(payload, f, indent=1, default=str)
