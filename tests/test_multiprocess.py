"""Two cooperating processes (launch/local.sh, 2 CPU devices each, gloo collectives) == one process.

Two launches of `--config.stages=teacher,synthesize` check the multi-process paths:
- preemption: SIGTERM to process 1 only, mid-teacher; both processes stop at one agreed step, checkpoint it
  (collectively) and exit 143. The second launch resumes there.
- teacher: data-parallel training over a global mesh of both processes' devices, each process feeding its
  own rows; losses and final parameters match a one-process run fed the same global batches (the
  concatenation of both processes' input shards), and process 0 alone writes the metrics.
- synthesize: the shards are split across processes (shard k -> process k % 2), each process writes its
  own, a shard finished by an earlier (killed) run is kept as it is, and process 0 merges the manifest
  after a barrier. Images match a one-process synthesis from the same checkpoints.
The one-process reference runs in this test process, on one device, with the same config.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import tiny_config, unit_path
from jax.sharding import Mesh

from diffuseg_jax import distributed
from diffuseg_jax.context import Context
from diffuseg_jax.data import pipeline as data_pipeline
from diffuseg_jax.errors import UserError
from diffuseg_jax.stages import autoencoder, diffusion, synthesize, teacher
from diffuseg_jax.synthetic_io import shard_paths
from diffuseg_jax.train import metric_writer
from diffuseg_jax.train import task as task_lib
from diffuseg_jax.train.checkpoint import StageCheckpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES = 2
STEPS = 16  # teacher steps: enough for a SIGTERM to land mid-training
EVERY = 4  # checkpoint interval
OVERRIDES = {
    'vae.teacher_steps': STEPS, 'checkpoint.every_steps': EVERY, 'train.log_every': 1,
    'sampling.shard_size': 8, 'sampling.batch_size': 8,  # 4 shards of the 32 masks: 2 per process
    'diffusion.channel_mult': (1,), 'diffusion.attention_levels': (),  # a smaller UNet compiles faster
}
NUM_SHARDS = 4


def _config():
  config = tiny_config()
  for key, value in OVERRIDES.items():
    section, field = key.split('.')
    config[section][field] = value
  return config


class _ProcessesInOne:
  """What P processes feed together, from one: each global batch = the P process-local batches in order."""

  def __init__(self, iterators):
    self._iterators = iterators

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for it in self._iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return {'processes': [it.get_state() for it in self._iterators]}

  def set_state(self, state):
    for it, s in zip(self._iterators, state['processes'], strict=True):
      it.set_state(s)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """One process, one device: the teacher (fed like 2 processes), then synthesis of all shards.

  Synthesis needs a trained student and diffusion UNet, but not good ones: the student (same FFD-VAE
  architecture) is a copy of the teacher, and the UNet an untrained one saved as the diffusion stage's final
  checkpoint. Skipping those two trainings halves this test's time.
  """
  workdir = str(tmp_path_factory.mktemp('one_process') / 'wd')
  os.makedirs(workdir)
  ctx = Context(config=_config(), workdir=workdir, mesh=Mesh(np.asarray(jax.devices()[:1]), ('data',)),
                show_progress=False)
  original = data_pipeline.train_iterator

  def as_two_processes(arrays, global_batch_size, seed, **kwargs):
    return _ProcessesInOne([original(arrays, global_batch_size, seed, process_index=p, process_count=PROCESSES,
                                     **kwargs) for p in range(PROCESSES)])

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(data_pipeline, 'train_iterator', as_two_processes)
    teacher.run(ctx)
  shutil.copytree(ctx.checkpoint_dir('teacher'), ctx.checkpoint_dir('student'))
  task = diffusion.task(ctx.config, diffusion.latent_shape(ctx, autoencoder.load_codec(ctx)))
  state = task_lib.init_state(task, ctx.mesh)  # the stage's own UNet and optimiser, untrained
  ckpt = StageCheckpointer(ctx.checkpoint_dir('diffusion'))
  ckpt.save(ctx.config.diffusion.steps, state, force=True)
  ckpt.close()
  ctx.complete('student', STEPS)
  ctx.complete('diffusion', ctx.config.diffusion.steps)
  synthesize.run(ctx)
  return workdir


@pytest.fixture(scope='module')
def two_processes(reference, tmp_path_factory):
  """Two processes on a workdir holding the reference's student and diffusion checkpoints and shard 0."""
  workdir = str(tmp_path_factory.mktemp('two_processes') / 'wd')
  for unit in ('student', 'diffusion'):
    shutil.copytree(os.path.join(reference, 'units', unit), os.path.join(workdir, 'units', unit))
  # Shard 0 as an earlier, killed run left it: finished, with no manifest yet.
  ctx = Context(config=_config(), workdir=workdir, mesh=Mesh(np.asarray(jax.devices()[:1]), ('data',)))
  src = os.path.join(unit_path(reference, 'synthesize'), 'synthetic')
  dst = os.path.join(ctx.unit_dir('synthesize'), 'synthetic')
  for path in shard_paths(src, 0):
    os.makedirs(os.path.join(dst, 'shards'), exist_ok=True)
    shutil.copy2(path, os.path.join(dst, 'shards', os.path.basename(path)))
  for row in open(shard_paths(src, 0)[1]):
    for rel in (json.loads(row)['image'], json.loads(row)['label']):
      os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
      shutil.copy2(os.path.join(src, rel), os.path.join(dst, rel))
  kept = os.stat(shard_paths(dst, 0)[0]).st_mtime_ns

  logs = os.path.join(workdir, '..', 'logs')
  command = ['launch/local.sh', str(PROCESSES), sys.executable, '-m', 'diffuseg_jax.main', '--config=configs/test.py',
             '--config.stages=teacher,synthesize', *[f'--config.{k}={v}' for k, v in OVERRIDES.items()],
             f'--workdir={workdir}', '--no_progress']
  env = {**os.environ, 'LOCAL_DEVICES': '2', 'JAX_PLATFORMS': 'cpu'}

  # Launch 1: SIGTERM to process 1 alone, mid-teacher. Both must stop at one agreed step and checkpoint it.
  launcher = subprocess.Popen(command, cwd=ROOT, env={**env, 'LAUNCH_LOG_DIR': f'{logs}/1'}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  _wait_for(lambda: os.path.isdir(os.path.join(unit_path(workdir, 'teacher') or '-', 'checkpoints', str(EVERY))),
            launcher)
  os.kill(_child_with_process_id(launcher.pid, 1), signal.SIGTERM)
  launcher.communicate(timeout=600)
  first = _read_logs(f'{logs}/1')
  assert launcher.returncode == 143, '\n'.join(v[-3000:] for v in first.values())
  stops = {int(m) for log in first.values() for m in re.findall(r'preempted, checkpoint saved at step (\d+)', log)}
  assert len(stops) == 1 and all('preempted' in log for log in first.values()), stops
  stop = stops.pop()
  assert EVERY <= stop < STEPS and os.path.isdir(os.path.join(unit_path(workdir, 'teacher'), 'checkpoints', str(stop)))

  # Launch 2: resume the teacher, then synthesise.
  proc = subprocess.run(command, cwd=ROOT, env={**env, 'LAUNCH_LOG_DIR': f'{logs}/2'}, capture_output=True,
                        text=True, timeout=600)
  second = _read_logs(f'{logs}/2')
  assert proc.returncode == 0, f'{proc.stderr[-2000:]}\n' + '\n'.join(v[-3000:] for v in second.values())
  return workdir, second, kept, stop


def _wait_for(condition, proc, timeout=300.0):
  deadline = time.monotonic() + timeout
  while not condition():
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f'gave up waiting (status {proc.poll()}): {proc.communicate()[0][-3000:]}')
    time.sleep(0.01)


def _child_with_process_id(launcher_pid: int, process_id: int) -> int:
  """The pid of the launcher's child that runs as PROCESS_ID=`process_id` (Linux /proc)."""
  with open(f'/proc/{launcher_pid}/task/{launcher_pid}/children') as f:
    children = [int(pid) for pid in f.read().split()]
  for pid in children:
    with open(f'/proc/{pid}/environ', 'rb') as f:
      if f'PROCESS_ID={process_id}'.encode() in f.read().split(b'\0'):
        return pid
  raise AssertionError(f'no child with PROCESS_ID={process_id} among {children}')


def _read_logs(folder) -> dict[int, str]:
  return {p: open(os.path.join(folder, f'process_{p}.log')).read() for p in range(PROCESSES)}


def _final_params(workdir, stage):
  folder = os.path.join(unit_path(workdir, stage), 'checkpoints')
  path = os.path.join(folder, str(max(int(s) for s in os.listdir(folder) if s.isdigit())), 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  state = checkpointer.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                                                tree))
  return state['params']


def _initial_teacher_params(workdir):
  ctx = Context(config=_config(), workdir=workdir, mesh=Mesh(np.asarray(jax.devices()[:1]), ('data',)))
  return jax.tree.map(np.asarray, task_lib.init_state(teacher.task(ctx.config, ctx.data.spec), ctx.mesh).params)


def test_both_processes_joined_one_global_mesh(two_processes):
  _, logs, _, _ = two_processes
  assert '4 device(s) (cpu), 2 process(es)' in logs[0]
  assert 'diffuseg_jax: workdir' not in logs[1]  # process 1 prints nothing of its own


def test_sigterm_to_one_process_stopped_both_at_one_step(two_processes):
  """Checked while launching (the fixture): exit 143, one stop step in both logs, its checkpoint complete.
  Here: the stop was mid-training, and the rerun resumed from exactly that checkpoint."""
  workdir, _, _, stop = two_processes
  assert EVERY <= stop < STEPS
  steps = [r['step'] for r in metric_writer.read_training_log(unit_path(workdir, 'teacher'), 'teacher')]
  assert steps == list(range(1, STEPS + 1))  # each step once: nothing lost, nothing redone


def test_teacher_matches_one_process(reference, two_processes):
  workdir, _, _, _ = two_processes
  rows = metric_writer.read_training_log(unit_path(workdir, 'teacher'), 'teacher')
  ref_rows = metric_writer.read_training_log(unit_path(reference, 'teacher'), 'teacher')
  assert [r['step'] for r in rows] == [r['step'] for r in ref_rows]  # written once: by process 0 only
  np.testing.assert_allclose([r['loss'] for r in rows], [r['loss'] for r in ref_rows], rtol=1e-5)
  ours, ref = _final_params(workdir, 'teacher'), _final_params(reference, 'teacher')
  diff = np.concatenate([np.abs(a - b).ravel() for a, b in
                         zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True)])
  moved = np.concatenate([np.abs(a - b).ravel() for a, b in
                          zip(jax.tree.leaves(ref), jax.tree.leaves(_initial_teacher_params(reference)), strict=True)])
  # AdamW (lr 1e-3) normalises each gradient: where a gradient is float noise (e.g. a conv bias before a
  # GroupNorm) a different reduction order gives a different update of up to ~lr. Elsewhere the runs agree to
  # float precision; a wrong global batch or a missing cross-process mean would move most weights by ~lr.
  assert np.median(moved) > 1e-4
  assert np.quantile(diff, 0.99) < 1e-6 and diff.max() < 3e-3, (np.quantile(diff, 0.99), diff.max())


def test_synthesis_split_across_processes_matches_one_process(reference, two_processes):
  workdir, _, kept, _ = two_processes
  root, ref_root = os.path.join(workdir, 'synthetic'), os.path.join(unit_path(reference, 'synthesize'), 'synthetic')
  assert os.stat(shard_paths(root, 0)[0]).st_mtime_ns == kept  # finished before: not redone
  for k in range(NUM_SHARDS):
    ours, ref = np.load(shard_paths(root, k)[0]), np.load(shard_paths(ref_root, k)[0])
    np.testing.assert_array_equal(ours['mask_index'], ref['mask_index'])
    np.testing.assert_array_equal(ours['label'], ref['label'])
    np.testing.assert_allclose(ours['image'], ref['image'], atol=1e-4)
  with open(os.path.join(root, 'manifest.jsonl')) as f, open(os.path.join(ref_root, 'manifest.jsonl')) as g:
    assert f.read() == g.read()
  metrics = json.load(open(os.path.join(workdir, 'metrics.json')))
  assert metrics['synthesize']['num_images'] == 32
  assert not [f for f in os.listdir(os.path.join(root, 'images')) if '.tmp' in f]


# --- launch plumbing (no jax in the child processes: fast) -------------------------------------------------


def _local(num, code, **env):
  return subprocess.Popen(['launch/local.sh', str(num), sys.executable, '-c', code], cwd=ROOT, text=True,
                          env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_local_launcher_sets_the_coordinator_variables():
  code = ('import os; e = os.environ; os.write(1, " ".join([e["PROCESS_ID"], e["NUM_PROCESSES"], '
          'e["JAX_COORDINATOR_ADDRESS"], e["XLA_FLAGS"].split()[-1], "\\n"]).encode())')  # one write: no interleaving
  out, _ = _local(3, code, LOCAL_DEVICES='2').communicate(timeout=60)
  rows = sorted(line.split() for line in out.splitlines())
  assert [r[:2] for r in rows] == [['0', '3'], ['1', '3'], ['2', '3']]
  assert len({r[2] for r in rows}) == 1 and rows[0][2].startswith('127.0.0.1:')
  assert {r[3] for r in rows} == {'--xla_force_host_platform_device_count=2'}


def test_local_launcher_fails_when_one_process_fails_and_stops_the_others():
  code = ('import os, signal, sys, time\n'
          'signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stuck in a collective: only SIGKILL helps\n'
          'sys.exit(3) if os.environ["PROCESS_ID"] == "1" else time.sleep(60)')
  proc = _local(2, code, LAUNCH_GRACE_S='1')
  proc.communicate(timeout=30)
  assert proc.returncode == 3


def test_local_launcher_forwards_sigterm():
  code = ('import os, signal, sys, time\n'
          'signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n'
          'os.write(1, b"ready\\n")\n'
          'time.sleep(60)')
  proc = _local(2, code)
  ready = [proc.stdout.readline() for _ in range(2)]
  assert ready == ['ready\n', 'ready\n']
  proc.send_signal(signal.SIGTERM)
  proc.communicate(timeout=30)
  assert proc.returncode == 143


# --- distributed.launch_spec ------------------------------------------------------------------------------


def test_launch_spec_single_process_and_coordinator_variables():
  assert distributed.launch_spec({}) is None
  assert distributed.launch_spec({'SLURM_JOB_ID': '7', 'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'}) is None
  spec = distributed.launch_spec({'JAX_COORDINATOR_ADDRESS': 'h:1234', 'NUM_PROCESSES': '4', 'PROCESS_ID': '3'})
  assert spec == distributed.LaunchSpec('h:1234', 4, 3, None)
  with pytest.raises(UserError, match='NUM_PROCESSES'):
    distributed.launch_spec({'COORDINATOR_ADDRESS': 'h:1234', 'PROCESS_ID': '0'})
  with pytest.raises(UserError, match='must lie in'):
    distributed.launch_spec({'COORDINATOR_ADDRESS': 'h:1', 'NUM_PROCESSES': '2', 'PROCESS_ID': '2'})
  with pytest.raises(UserError, match='host:port'):
    distributed.launch_spec({'COORDINATOR_ADDRESS': 'h', 'NUM_PROCESSES': '2', 'PROCESS_ID': '0'})


@pytest.mark.parametrize('nodelist, host', [
    ('node7', 'node7'), ('node7,node8', 'node7'), ('gpu[003-007,012],cpu1', 'gpu003'), ('a[12,3]', 'a12'),
])
def test_first_slurm_host(nodelist, host):
  assert distributed.first_slurm_host(nodelist) == host


def test_launch_spec_slurm_one_task_per_node_uses_every_gpu():
  env = {'SLURM_JOB_ID': '4097', 'SLURM_PROCID': '1', 'SLURM_NTASKS': '2', 'SLURM_LOCALID': '0',
         'SLURM_STEP_NUM_NODES': '2', 'SLURM_STEP_NODELIST': 'gpu[01-02]', 'CUDA_VISIBLE_DEVICES': '0,1,2,3'}
  assert distributed.launch_spec(env) == distributed.LaunchSpec('gpu01:61441', 2, 1, None)
  # Several tasks per node, each seeing every GPU: one GPU per task.
  packed = {**env, 'SLURM_NTASKS': '8', 'SLURM_PROCID': '5', 'SLURM_LOCALID': '1'}
  assert distributed.launch_spec(packed).local_device_ids == (1,)
  # ... unless SLURM already bound one GPU to each task.
  assert distributed.launch_spec({**packed, 'CUDA_VISIBLE_DEVICES': '1'}).local_device_ids is None
  # The sbatch script's explicit coordinator wins; id and count still come from SLURM.
  given = distributed.launch_spec({**env, 'JAX_COORDINATOR_ADDRESS': 'head:999'})
  assert (given.coordinator_address, given.num_processes, given.process_id) == ('head:999', 2, 1)
