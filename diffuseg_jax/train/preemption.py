"""SIGTERM (what schedulers send before killing a job) -> every process checkpoints at the same step and stops.

The entry point gives the first Ctrl-C (SIGINT) the same meaning (`install_handler(interrupt=True)`): the
user gets a resumable checkpoint instead of a traceback; a second Ctrl-C exits at once (status 130), for a
user who will not wait for the save.

`install_handler()` (called once by the entry point, and again by `fit`) makes SIGTERM set a flag. Inside a
training loop (`cooperative()`), `should_stop(step)` turns that flag into one decision shared by all
processes, after which the loop saves and raises `Preempted`. Outside a training loop SIGTERM raises
`Preempted` at once: every output is written atomically and synthesis keeps its finished shards, so stopping
anywhere is safe, and the scheduler's grace period is not spent on work that a rerun redoes anyway.

Multi-process agreement: a signal reaches processes at different steps (or only some of them), but an
orbax save is collective, so all must stop at the same step. Every `every` steps the processes all-gather
their flags (one tiny collective, a host sync like a log step) and stop if any was asked to. One process
needs no agreement and checks its flag after every step.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from collections.abc import Iterator

import jax
import numpy as np

INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C'd command
# Steps between two agreements in multi-process runs: the worst-case delay before a SIGTERM takes effect is
# this many steps plus one checkpoint save; keep it well inside the scheduler's grace period.
DEFAULT_AGREE_EVERY = 10


class Preempted(BaseException):
  """Raised once the current stage has stopped on SIGTERM (its checkpoint, if it trains, written).

  A BaseException, like KeyboardInterrupt: raised asynchronously by the signal handler, it must not be
  swallowed by an `except Exception` (e.g. the one that treats a failing restore as a corrupt checkpoint).
  """

  @property
  def stage(self) -> str | None:
    """The training task that saved a checkpoint and stopped (None: stopped outside a training loop)."""
    m = _SAVED_AT.match(str(self))
    return m and m['stage']

  @property
  def step(self) -> int | None:
    """The step of that checkpoint."""
    m = _SAVED_AT.match(str(self))
    return m and int(m['step'])


# How `train/loop.py` words a stop after its checkpoint.
_SAVED_AT = re.compile(r'(?P<stage>[^:\s]+): preempted, checkpoint saved at step (?P<step>\d+)')

_requested = threading.Event()
_signals: list[int] = []  # the signals received, in order
_cooperative_depth = [0]  # training loops running now (the handler always runs on the main thread)


def _handler(signum, frame) -> None:  # noqa: ARG001
  if signum == signal.SIGINT and signal.SIGINT in _signals:
    os.write(2, b'\ninterrupted again: stopped at once; the last saved checkpoint is kept\n')
    os._exit(INTERRUPTED_EXIT)
  _signals.append(signum)
  _requested.set()
  if not _cooperative_depth[0]:
    raise Preempted(f'stopped by {signal.Signals(signum).name}')


def install_handler(*, interrupt: bool = False) -> None:
  """SIGTERM (and SIGINT with `interrupt`) -> `requested()` (+ `Preempted` outside `cooperative()`);
  idempotent, main thread only. Only the entry point takes over SIGINT: a library user keeps Ctrl-C's
  usual KeyboardInterrupt."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _handler)
    if interrupt:
      signal.signal(signal.SIGINT, _handler)


def interrupted() -> bool:
  """True once this process has received SIGINT through the handler (Ctrl-C), not only SIGTERM."""
  return signal.SIGINT in _signals


def requested() -> bool:
  """True once this process has received SIGTERM (or, from the entry point, SIGINT)."""
  return _requested.is_set()


@contextlib.contextmanager
def cooperative() -> Iterator[None]:
  """Inside: SIGTERM only sets the flag; the loop polls `should_stop` and stops at a step it chooses."""
  _cooperative_depth[0] += 1
  try:
    yield
  finally:
    _cooperative_depth[0] -= 1


def should_stop(step: int, every: int = DEFAULT_AGREE_EVERY) -> bool:
  """Whether to checkpoint and stop after `step`; the same answer on every process.

  Must be called by all processes after every step (collective every `every` steps when multi-process).
  """
  if jax.process_count() == 1:
    return requested()
  if step % max(1, int(every)):
    return False
  from jax.experimental import multihost_utils  # local: only multi-process runs need it

  flags = multihost_utils.process_allgather(np.asarray(requested(), np.int32))
  return bool(np.any(flags))
