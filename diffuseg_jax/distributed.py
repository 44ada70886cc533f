"""Multi-process start-up: `jax.distributed.initialize()` when launched by SLURM or with coordinator vars.

Single-process runs (a laptop, one node driven by one process) need nothing and skip this entirely.
"""

from __future__ import annotations

import os

import jax

COORDINATOR_VARS = ('JAX_COORDINATOR_ADDRESS', 'COORDINATOR_ADDRESS')


def launched_multiprocess() -> bool:
  if any(os.environ.get(v) for v in COORDINATOR_VARS):
    return True
  # SLURM with more than one task: jax's SLURM cluster detection fills in everything.
  return int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in os.environ


def maybe_initialize() -> None:
  if not launched_multiprocess():
    return
  address = next((os.environ[v] for v in COORDINATOR_VARS if os.environ.get(v)), None)
  if address is not None:
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=int(os.environ['NUM_PROCESSES']),
        process_id=int(os.environ['PROCESS_ID']),
    )
  else:
    jax.distributed.initialize()
