"""Preemption and kills, end to end through the entry point (teacher stage of the tiny config, 2 CPU devices).

- SIGTERM mid-training: exit status 143 and a checkpoint at the step it stopped at.
- SIGKILL at two points (right after a checkpoint appears, and while steps run): each kill loses at most one
  checkpoint interval.
- After all three, the rerun finishes with the same final train state (params, EMA, optimiser state), bit
  for bit, as an uninterrupted run: the data iterator position is part of every checkpoint.

Subprocesses share a persistent compilation cache, so only the first one compiles.
"""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import subprocess_env, unit_path

from diffuseg_jax.train import metric_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
EVERY = 4  # checkpoint (and log) interval


def _command(workdir):
  return [sys.executable, '-m', 'diffuseg_jax.main', '--config=configs/test.py', '--config.stages=teacher',
          f'--config.vae.teacher_steps={STEPS}', f'--config.checkpoint.every_steps={EVERY}',
          f'--config.train.log_every={EVERY}', '--no_progress', f'--workdir={workdir}']


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp('xla_cache')
  return subprocess_env(2, JAX_COMPILATION_CACHE_DIR=str(cache))


def _start(workdir, env):
  """The run in a subprocess; its stderr goes to a file (a full pipe would stall it), see `_finish`."""
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  log = open(f'{workdir}.stderr-{time.monotonic_ns()}.txt', 'w+')  # noqa: SIM115 - closed by _finish
  proc = subprocess.Popen(_command(workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
  proc.log = log
  return proc


def _stderr(proc) -> str:
  proc.log.seek(0)
  return proc.log.read()


def _steps(workdir) -> list[int]:
  """Finished checkpoints (orbax renames a step folder into place only once it is complete)."""
  folder = os.path.join(unit_path(workdir, 'teacher') or '-', 'checkpoints')
  return sorted(int(s) for s in os.listdir(folder) if s.isdigit()) if os.path.isdir(folder) else []


def _wait_for_checkpoint(proc, workdir, after: int, timeout: float = 240.0) -> int:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    newer = [s for s in _steps(workdir) if s > after]
    if newer:
      return newer[0]
    if proc.poll() is not None:
      pytest.fail(f'run ended (status {proc.returncode}) before a checkpoint after step {after}:\n'
                  f'{_stderr(proc)[-3000:]}')
    time.sleep(0.01)
  proc.kill()
  pytest.fail(f'no checkpoint after step {after} within {timeout} s')


def _finish(proc, timeout: float = 300.0) -> tuple[int, str]:
  proc.wait(timeout=timeout)
  err = _stderr(proc)
  proc.log.close()
  return proc.returncode, err


def _final_state(workdir) -> dict:
  """The train state (params, EMA, optimiser state, step) of the newest checkpoint, as numpy arrays."""
  path = os.path.join(unit_path(workdir, 'teacher'), 'checkpoints', str(max(_steps(workdir))), 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  return checkpointer.restore(path, restore_args=jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))


def _assert_bitwise_equal(a: dict, b: dict) -> None:
  leaves_a = jax.tree_util.tree_leaves_with_path(a)
  leaves_b = jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 100
  for (path, x), y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


class _Reference:
  """The uninterrupted run: started once the first interrupted run has filled the compilation cache, and
  then run alongside the interrupted ones."""

  def __init__(self, workdir, env):
    self.workdir, self._env, self._proc, self._state = workdir, env, None, None

  def start(self) -> None:
    if self._proc is None:
      self._proc = _start(self.workdir, self._env)

  def state(self) -> dict:
    self.start()
    if self._state is None:
      rc, err = _finish(self._proc)
      assert rc == 0, err[-3000:]
      assert _steps(self.workdir)[-1] == STEPS
      self._state = _final_state(self.workdir)
    return self._state


@pytest.fixture(scope='module')
def reference(tmp_path_factory, env):
  ref = _Reference(tmp_path_factory.mktemp('reference') / 'wd', env)
  yield ref
  if ref._proc is not None and ref._proc.poll() is None:
    ref._proc.kill()


def test_sigterm_and_sigkills_then_resume_reaches_the_uninterrupted_state_bitwise(tmp_path, env, reference):
  """One workdir through SIGTERM, SIGKILL right after a checkpoint, SIGKILL mid-steps, then completion."""
  workdir = tmp_path / 'wd'
  # SIGTERM mid-training: status 143, a checkpoint at the step the run stopped at, a one-line hint.
  proc = _start(workdir, env)
  _wait_for_checkpoint(proc, workdir, after=0)
  proc.send_signal(signal.SIGTERM)
  reference.start()  # the compilation cache is warm now
  rc, err = _finish(proc)
  assert rc == 143, err[-3000:]
  match = re.search(r'preempted, checkpoint saved at step (\d+)', err)
  assert match, err[-3000:]
  stop = int(match.group(1))
  assert EVERY <= stop < STEPS and _steps(workdir)[-1] == stop
  assert 'rerun the same command to resume' in err and 'Traceback' not in err
  logged = [row['step'] for row in metric_writer.read_training_log(unit_path(workdir, 'teacher'), 'teacher')]
  assert logged[-1] == stop  # the stop step's metrics are flushed with its checkpoint

  # SIGKILL the moment the resumed run has written a checkpoint (the next save may be under way).
  proc = _start(workdir, env)
  _wait_for_checkpoint(proc, workdir, after=stop)
  proc.kill()
  _finish(proc)
  _assert_lost_at_most_one_interval(workdir)

  # SIGKILL between checkpoints, while steps run.
  before = max(_steps(workdir))
  proc = _start(workdir, env)
  _wait_for_checkpoint(proc, workdir, after=before)
  time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  _finish(proc)
  _assert_lost_at_most_one_interval(workdir)
  assert max(_steps(workdir)) > before

  rc, err = _finish(_start(workdir, env))
  assert rc == 0, err[-3000:]
  assert _steps(workdir)[-1] == STEPS
  _assert_bitwise_equal(_final_state(workdir), reference.state())


def _assert_lost_at_most_one_interval(workdir) -> None:
  """The newest complete checkpoint is at most one interval behind the newest logged step."""
  logged = [row['step'] for row in metric_writer.read_training_log(unit_path(workdir, 'teacher'), 'teacher')]
  assert logged and _steps(workdir), 'nothing was trained before the kill'
  assert max(_steps(workdir)) >= max(logged) - EVERY, (max(_steps(workdir)), max(logged))
