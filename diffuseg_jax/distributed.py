"""Multi-process start-up: one `jax.distributed.initialize()` per process, before any computation.

How a process finds the others (first match wins):

1. Coordinator variables, set by `launch/local.sh`, `launch/multinode_gpu.sh`, `launch/slurm.sbatch` or by
   hand: `JAX_COORDINATOR_ADDRESS` (or `COORDINATOR_ADDRESS`) = host:port of process 0, plus
   `NUM_PROCESSES` and `PROCESS_ID` (or `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`; under SLURM they default to
   `SLURM_NTASKS` / `SLURM_PROCID`).
2. A SLURM step with more than one task: process 0 is task 0 on the step's first node, port
   `JAX_COORDINATOR_PORT` or 61440 + job id % 4096.
3. Anything else is a single process (a laptop, one node driven by one process): nothing to do.

Devices: a process uses every accelerator of its node (the one-task-per-node layout of `launch/`).
jax's own SLURM detection would instead pin each process to GPU number `SLURM_LOCALID`, which leaves all
GPUs but one idle with one task per node, so it is bypassed; with several tasks per node each task still
gets GPU `SLURM_LOCALID`. `JAX_LOCAL_DEVICE_IDS` or `CUDA_VISIBLE_DEVICES` restrict the devices by hand.

jax's preemption service is switched off: it would take over SIGTERM, which `train/preemption.py` handles.
Multi-process CPU runs (`launch/local.sh`) use gloo collectives (jax's default) and no compilation cache.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import jax

from diffuseg_jax.errors import UserError

COORDINATOR_VARS = ('JAX_COORDINATOR_ADDRESS', 'COORDINATOR_ADDRESS')
NUM_PROCESSES_VARS = ('NUM_PROCESSES', 'JAX_NUM_PROCESSES', 'SLURM_NTASKS')
PROCESS_ID_VARS = ('PROCESS_ID', 'JAX_PROCESS_ID', 'SLURM_PROCID')
PORT_VARS = ('JAX_COORDINATOR_PORT', 'COORDINATOR_PORT')


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
  """What `jax.distributed.initialize` is called with; `local_device_ids=None` means all local devices."""

  coordinator_address: str
  num_processes: int
  process_id: int
  local_device_ids: tuple[int, ...] | None = None


def launch_spec(env: Mapping[str, str]) -> LaunchSpec | None:
  """The multi-process launch described by `env` (see the module docstring), or None for one process."""
  address = _first(env, COORDINATOR_VARS)
  slurm = _slurm_multitask(env)
  if address is None and not slurm:
    return None
  if address is None:
    port = _first(env, PORT_VARS) or str(61440 + int(env['SLURM_JOB_ID']) % 4096)
    nodes = env.get('SLURM_STEP_NODELIST') or env.get('SLURM_JOB_NODELIST') or env.get('SLURM_NODELIST')
    if not nodes:
      raise UserError('SLURM run with several tasks but no SLURM_STEP_NODELIST: set JAX_COORDINATOR_ADDRESS')
    address = f'{first_slurm_host(nodes)}:{port}'
  if ':' not in address:
    raise UserError(f'coordinator address {address!r} must be host:port')
  count = _int_var(env, NUM_PROCESSES_VARS, 'process count')
  index = _int_var(env, PROCESS_ID_VARS, 'process id')
  if count < 1 or not 0 <= index < count:
    raise UserError(f'process id {index} must lie in [0, {count}) (NUM_PROCESSES / PROCESS_ID)')
  return LaunchSpec(address, count, index, _slurm_local_devices(env) if slurm else None)


def maybe_initialize(env: Mapping[str, str] | None = None) -> LaunchSpec | None:
  """Joins the other processes when launched as several (no-op otherwise); returns what it used."""
  spec = launch_spec(os.environ if env is None else env)
  if spec is None:
    return None
  jax.config.update('jax_enable_preemption_service', False)
  jax.distributed.initialize(
      coordinator_address=spec.coordinator_address,
      num_processes=spec.num_processes,
      process_id=spec.process_id,
      local_device_ids=list(spec.local_device_ids) if spec.local_device_ids else None,
      cluster_detection_method='deactivate',  # everything is given: jax must not re-pin devices
  )
  if jax.default_backend() == 'cpu':
    # JAX caches multi-process CPU programs for process 0 only (their cache key holds the device
    # assignment), so process 0 would skip compiles the others still run, and wait for them at the first
    # collective longer than gloo's fixed 30 s connection deadline. Compiling everywhere keeps them in step.
    jax.config.update('jax_enable_compilation_cache', False)
  return spec


def first_slurm_host(nodelist: str) -> str:
  """First host of a SLURM node list: 'gpu[003-007,012],cpu1' -> 'gpu003', 'node7,node8' -> 'node7'."""
  m = re.match(r'([^,\[]+)(?:\[([^\]]+)\])?', nodelist.strip())
  if not m:
    raise UserError(f'cannot read the SLURM node list {nodelist!r}; set JAX_COORDINATOR_ADDRESS')
  prefix, ranges = m.group(1), m.group(2)
  return prefix + re.split(r'[,-]', ranges)[0] if ranges else prefix


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
  return next((env[n] for n in names if env.get(n)), None)


def _int_var(env: Mapping[str, str], names: tuple[str, ...], what: str) -> int:
  value = _first(env, names)
  if value is None:
    raise UserError(f'a coordinator address is set but no {what}: set {" or ".join(names[:2])}')
  try:
    return int(value)
  except ValueError:
    raise UserError(f'{what} {value!r} (from {"/".join(names)}) is not an integer') from None


def _slurm_multitask(env: Mapping[str, str]) -> bool:
  return 'SLURM_JOB_ID' in env and 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', '1')) > 1


def _slurm_local_devices(env: Mapping[str, str]) -> tuple[int, ...] | None:
  """One GPU per task when SLURM packs several tasks on a node that each see all its GPUs; else all."""
  nodes = int(env.get('SLURM_STEP_NUM_NODES') or env.get('SLURM_JOB_NUM_NODES') or env.get('SLURM_NNODES') or 1)
  tasks = int(env.get('SLURM_STEP_NUM_TASKS') or env.get('SLURM_NTASKS') or 1)
  visible = env.get('CUDA_VISIBLE_DEVICES')
  if tasks <= nodes or (visible is not None and len(visible.split(',')) <= 1):
    return None
  return (int(env.get('SLURM_LOCALID', '0')),)
