"""A background thread that runs file writes while the accelerator keeps sampling.

  with BackgroundWriter(depth=2) as writer:
    writer.submit(write_shard, root, k, images, ...)   # returns at once unless `depth` writes are waiting

Writes run in submission order on one thread. `submit` blocks while `depth` writes wait, so host memory holds
at most depth + 1 finished shards. Leaving the block waits for every submitted write, also when the block
ends with an exception (a SIGTERM, a failed batch): finished work is written, never dropped, and the
exception goes on. A failed write is re-raised in the caller at its next `submit` or at the end of the block.
Each write is atomic on its own (synthetic_io writes to a temporary name, then renames), so a hard kill
leaves whole shards or none.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

_STOP = object()


class BackgroundWriter:
  """One writer thread fed by a bounded queue; `busy_seconds` is the time it spent writing."""

  def __init__(self, depth: int = 2):
    if depth < 1:
      raise ValueError(f'depth={depth} must be >= 1')
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._error: BaseException | None = None
    self._thread = threading.Thread(target=self._work, name='background-writer', daemon=True)
    self.busy_seconds = 0.0
    self.wait_seconds = 0.0  # time `submit` and the end of the block waited for the writer
    self._thread.start()

  def _work(self) -> None:
    while True:
      item = self._queue.get()
      if item is _STOP:
        return
      fn, args, kwargs = item
      if self._error is None:  # after a failure, later writes are skipped: the caller re-raises it
        start = time.perf_counter()
        try:
          fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
          self._error = e
        self.busy_seconds += time.perf_counter() - start

  def _raise_pending(self) -> None:
    if self._error is not None:
      error, self._error = self._error, None
      raise error

  def submit(self, fn: Callable[..., Any], *args, **kwargs) -> None:
    """Queues fn(*args, **kwargs); blocks while the queue is full; re-raises an earlier write's error."""
    self._raise_pending()
    start = time.perf_counter()
    self._queue.put((fn, args, kwargs))
    self.wait_seconds += time.perf_counter() - start

  def close(self) -> None:
    """Waits for every queued write; re-raises the first error of one."""
    if self._thread.is_alive():
      start = time.perf_counter()
      self._queue.put(_STOP)
      self._thread.join()
      self.wait_seconds += time.perf_counter() - start
    self._raise_pending()

  def __enter__(self) -> BackgroundWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
      return
    try:
      self.close()  # the block failed: still write what was finished, then let its exception go on
    except BaseException as e:  # noqa: BLE001 - the block's own exception is the one raised; say this one too
      logging.getLogger(__name__).error('background writer: a queued write failed too: %r', e)
