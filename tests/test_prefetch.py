"""The synthesize stage's batch pipeline: host work prefetched on a thread, dispatch before copy back, and a
steady-state rate that is right when a dispatch blocks (as a GPU's does for a program with a loop)."""

import threading
import time

import numpy as np
import pytest

from diffuseg_jax.prefetch import prefetch
from diffuseg_jax.stages import synthesize as stage


def test_prefetch_keeps_order_and_runs_on_another_thread():
  seen = []

  def items():
    for i in range(5):
      seen.append(threading.current_thread().name)
      yield i

  assert list(prefetch(items(), depth=2)) == [0, 1, 2, 3, 4]
  assert set(seen) == {'prefetch'}


def test_prefetch_raises_the_producers_error_at_its_place():
  def items():
    yield 1
    raise KeyError('bad row')

  got = []
  with pytest.raises(KeyError, match='bad row'):
    for item in prefetch(items()):
      got.append(item)
  assert got == [1]


def test_prefetch_stops_the_producer_when_the_caller_leaves():
  produced = []

  def items():
    for i in range(1000):
      produced.append(i)
      yield i

  stream = prefetch(items(), depth=1)
  assert next(stream) == 0
  stream.close()
  time.sleep(0.5)
  assert len(produced) <= 3  # the one handed out, the one in the slot, the one waiting to go in


def test_prefetch_depth_must_be_positive():
  with pytest.raises(ValueError, match='depth'):
    list(prefetch([1], depth=0))


class BlockingProgram:
  """A stand-in for a GPU program whose dispatch returns only when it is done: each call holds the caller for
  `seconds` and returns host arrays (images = the batch index, err = 0)."""

  def __init__(self, seconds: float):
    self.seconds = seconds

  def __call__(self, b, n):
    time.sleep(self.seconds)
    return np.full((n, 2), b, np.float32), np.zeros(n, np.float32)


def test_dispatch_in_order_yields_every_batch_in_order_with_its_inputs():
  timing = stage.StageTiming()
  items = ((('meta', b), (b, 3)) for b in range(4))
  out = list(stage.dispatch_in_order(BlockingProgram(0.0), items, timing))
  assert [meta for meta, _, _, _ in out] == [('meta', b) for b in range(4)]
  assert [inputs for _, inputs, _, _ in out] == [(b, 3) for b in range(4)]
  for b, (_, _, images, err) in enumerate(out):
    np.testing.assert_array_equal(images, np.full((3, 2), b))
    assert err.shape == (3,)
  assert timing.first_batch_done is not None


def test_steady_rate_matches_the_program_rate_when_dispatch_blocks():
  """With a blocking dispatch, a first copy back made after the next dispatch would start the window one batch
  late: 4 batches of 0.2 s would read as 3 batches' images over 2 batches' time (1.5x). Here the window starts
  when the first batch is done, so the rate is the program's (loose bound: a busy CI machine only slows it)."""
  seconds, n, num = 0.2, 8, 4
  timing = stage.StageTiming()
  items = prefetch(((b, (b, n)) for b in range(num)), depth=1)
  for _, _, images, _ in stage.dispatch_in_order(BlockingProgram(seconds), items, timing):
    timing.batch_done(len(images))
  assert timing.batches == num and timing.images == num * n and timing.images_after_first == (num - 1) * n
  steady = timing.images_after_first / (timing.last_batch_done - timing.first_batch_done)
  assert steady <= 1.15 * n / seconds
