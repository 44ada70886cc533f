"""The synthesis writer thread: order, bounded queue, nothing lost on an exception, errors surface; and the
dealing of unfinished shards over processes."""

import threading
import time

import pytest

from diffuseg_jax import atomic, background_writer, synthetic_io
from diffuseg_jax.stages import synthesize


def test_writes_run_in_order_and_all_finish_before_the_block_ends():
  done = []
  with background_writer.BackgroundWriter(depth=2) as writer:
    for i in range(20):
      writer.submit(lambda i=i: (time.sleep(0.001), done.append(i)))
  assert done == list(range(20))
  assert writer.busy_seconds > 0


def test_submit_blocks_while_depth_writes_wait():
  release = threading.Event()
  started = threading.Event()
  writer = background_writer.BackgroundWriter(depth=1)
  writer.submit(lambda: (started.set(), release.wait(5)))  # the writer holds this one
  assert started.wait(5)
  writer.submit(lambda: None)  # fills the queue (depth 1)
  third_in = threading.Event()
  thread = threading.Thread(target=lambda: (writer.submit(lambda: None), third_in.set()))
  thread.start()
  assert not third_in.wait(0.3), 'submit returned although the queue was full'
  release.set()
  assert third_in.wait(5)
  thread.join()
  writer.close()


def test_an_exception_in_the_block_still_writes_what_was_submitted():
  done = []

  class Stop(BaseException):  # like train.preemption.Preempted: not an Exception
    pass

  with pytest.raises(Stop):
    with background_writer.BackgroundWriter(depth=4) as writer:
      for i in range(3):
        writer.submit(lambda i=i: (time.sleep(0.02), done.append(i)))
      raise Stop()
  assert done == [0, 1, 2]


def test_a_failed_write_is_raised_in_the_caller_and_later_writes_are_skipped():
  done = []

  def fail():
    raise OSError('disk full')

  with pytest.raises(OSError, match='disk full'):
    with background_writer.BackgroundWriter(depth=8) as writer:
      writer.submit(fail)
      writer.submit(lambda: done.append('after'))
  assert done == []


def test_depth_must_be_positive():
  with pytest.raises(ValueError, match='depth=0'):
    background_writer.BackgroundWriter(depth=0)


@pytest.mark.parametrize('processes', [1, 2, 3, 4])
def test_unfinished_shards_are_dealt_evenly_over_processes(tmp_path, monkeypatch, processes):
  finished = {0, 2, 4, 6, 7}  # a resumed job: mostly the even shards (process 0's under k mod 2) are done
  for k in finished:
    atomic.write_text(synthetic_io.shard_paths(str(tmp_path), k)[1], '')
  monkeypatch.setattr(synthesize.jax, 'process_count', lambda: processes)
  monkeypatch.setattr(synthesize.multihost_utils, 'sync_global_devices', lambda name: None)
  dealt = []
  for p in range(processes):
    monkeypatch.setattr(synthesize.jax, 'process_index', lambda p=p: p)
    dealt.append(synthesize.shards_of_this_process(str(tmp_path), 11))
  flat = sorted(k for d in dealt for k in d)
  assert flat == sorted(set(range(11)) - finished)  # every unfinished shard exactly once
  sizes = [len(d) for d in dealt]
  assert max(sizes) - min(sizes) <= 1
