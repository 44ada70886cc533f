"""Host work for the next batch, done on a background thread while the caller waits on the accelerator.

  for item in prefetch(make_batches(), depth=1):   # make_batches() runs up to `depth` items ahead
    outputs = program(*item)                        # a GPU may hold the caller here until the program is near done

Why: on a GPU, dispatching a program with a loop in it (the sampler's `lax.scan`) returns only once the loop's
kernels are queued, which for a 50-step UNet is close to the program's end. Rendering and copying the next
batch on the calling thread after the dispatch returns would leave the GPU idle meanwhile; on a thread, it
overlaps the program. Items come out in order; an exception in the producer is raised in the caller at the
item where it happened; leaving the loop early stops the producer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar('T')
_DONE = object()


def prefetch(items: Iterable[T], depth: int = 1) -> Iterator[T]:
  """The items of `items` in order, produced by a daemon thread at most `depth` items ahead of the caller."""
  if depth < 1:
    raise ValueError(f'depth={depth} must be >= 1')
  slots: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def put(entry) -> bool:
    while not stop.is_set():
      try:
        slots.put(entry, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce() -> None:
    try:
      for item in items:
        if not put((True, item)):
          return
      put((True, _DONE))
    except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
      put((False, e))

  thread = threading.Thread(target=produce, name='prefetch', daemon=True)
  thread.start()
  try:
    while True:
      ok, item = slots.get()
      if not ok:
        raise item
      if item is _DONE:
        return
      yield item
  finally:
    stop.set()
