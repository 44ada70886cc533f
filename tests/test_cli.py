"""The entry point: user mistakes give one clear line and a non-zero exit, never a traceback."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, cwd=ROOT):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  return subprocess.run([sys.executable, '-m', 'diffuseg_jax.main', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


def _one_error_line(proc):
  lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr, proc.stderr
  assert len(lines) == 1, proc.stderr
  return lines[0]


# Bad overrides, values and data: tests/test_bad_inputs.py (every case of README's troubleshooting table).


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  proc = run_main('--config=configs/test.py', f'--workdir={blocker}/wd')
  assert f"workdir '{blocker}/wd' is not writable: '{blocker}' is not a folder" in _one_error_line(proc)
  assert 'data source' not in proc.stdout + proc.stderr  # found before the data is loaded


def test_help_is_fast_and_clean():
  proc = run_main('--helpshort')
  assert proc.returncode in (0, 1)  # absl exits 1 after printing help
  assert '--config' in proc.stdout + proc.stderr and 'Traceback' not in proc.stderr


def _checkpoint_steps(workdir) -> list[int]:
  """Finished checkpoint steps in any `checkpoints/` folder under `workdir` (orbax renames a step folder into
  place once it is complete)."""
  return sorted(int(d) for root, dirs, _ in os.walk(workdir) if os.path.basename(root) == 'checkpoints'
                for d in dirs if d.isdigit())


def test_ctrl_c_saves_a_checkpoint_and_prints_one_line(tmp_path):
  """The first Ctrl-C is SIGTERM's checkpoint-and-stop: exit 130, one line naming the step and the stage."""
  workdir = str(tmp_path / 'wd')
  env = subprocess_env(2)
  with open(tmp_path / 'stderr.txt', 'w+') as err:  # a file: a full pipe would stall the run
    proc = subprocess.Popen(
        [sys.executable, '-m', 'diffuseg_jax.main', '--config=configs/test.py', '--config.stages=teacher',
         '--config.vae.teacher_steps=100000', '--config.checkpoint.every_steps=2', '--no_progress',
         f'--workdir={workdir}'], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 240
    while not _checkpoint_steps(workdir) and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    err.seek(0)
    text = err.read()
  # Saving every 2 steps, orbax may warn that a save waited for the previous one: a library warning, kept.
  lines = [line for line in text.splitlines() if line.strip() and not re.match(r'W\d{4} .*checkpoint_manager', line)]
  assert proc.returncode == 130, text
  assert 'Traceback' not in text and len(lines) == 1, text
  match = re.fullmatch(r'interrupted at step (\d+) of stage teacher; rerun the same command to resume', lines[0])
  assert match, text
  assert int(match.group(1)) in _checkpoint_steps(workdir)


def test_second_ctrl_c_exits_at_once(monkeypatch, capfd):
  from diffuseg_jax.train import preemption

  monkeypatch.setattr(preemption, '_signals', [])
  monkeypatch.setattr(preemption, '_requested', threading.Event())
  exits = []
  monkeypatch.setattr(preemption.os, '_exit', exits.append)
  with pytest.raises(preemption.Preempted, match='stopped by SIGINT') as info:
    preemption._handler(signal.SIGINT, None)  # outside a training loop: stop now
  assert info.value.stage is None and preemption.interrupted()
  monkeypatch.setattr(preemption, '_signals', [])
  with preemption.cooperative():
    preemption._handler(signal.SIGINT, None)  # inside one: only the flag, the loop saves and stops
    assert preemption.requested() and not exits
    preemption._handler(signal.SIGINT, None)
  assert exits == [preemption.INTERRUPTED_EXIT]
  assert 'interrupted again: stopped at once' in capfd.readouterr().err


def test_preempted_names_the_step_and_stage_of_the_loop_message():
  from diffuseg_jax.train.preemption import Preempted

  e = Preempted('segment_transfer_seed0: preempted, checkpoint saved at step 12')
  assert (e.stage, e.step) == ('segment_transfer_seed0', 12)
