"""The entry point: user mistakes give one clear line and a non-zero exit, never a traceback."""

import os
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize('args, expected', [
    (['--config=configs/test.py', '--config.train.no_such_field=1'], 'no_such_field'),
    (['--config=configs/test.py', '--config.sampling.blend_mode=fancy'], 'blend_mode'),
    (['--config=configs/test.py', '--config.stages=teacher,painting'], 'painting'),
    (['--config=configs/test.py', '--config.vae.batch_size=0'], 'batch_size'),
    (['--config=configs/folder.py'], 'data.root'),
    (['--config=configs/folder.py', '--config.data.root=/no/such/folder'], '/no/such/folder'),
    (['--config=configs/no_such_config.py'], 'no_such_config'),
])
def test_user_mistakes_give_one_line(tmp_path, args, expected):
  proc = run_main(*args, f'--workdir={tmp_path}/wd')
  line = _one_error_line(proc)
  assert expected in line


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  proc = run_main('--config=configs/test.py', f'--workdir={blocker}/wd')
  assert 'not writable' in _one_error_line(proc) or 'workdir' in _one_error_line(proc)


def test_help_is_fast_and_clean():
  proc = run_main('--helpshort')
  assert proc.returncode in (0, 1)  # absl exits 1 after printing help
  assert '--config' in proc.stdout + proc.stderr and 'Traceback' not in proc.stderr
