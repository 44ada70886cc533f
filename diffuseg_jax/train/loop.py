"""The one training loop: fetch, shard, step, log, checkpoint; it knows tasks, not the pipeline.

`fit` runs `task`'s jitted `train_step` (train/task.py) from `state.step` to `task.num_steps` on batches from
`iterator`, logs the mean metrics every `log_every` steps to `writer`, saves the state and the iterator
position with `checkpointer`, and stops with `NonFiniteLossError` on a NaN/inf loss without ever writing a
checkpoint of the bad state. On SIGTERM all processes agree on a step, checkpoint it and raise
`preemption.Preempted` (train/preemption.py). Building the state (`task.init_or_restore`), the iterator and
the writer is the caller's job, so every argument is explicit.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from diffuseg_jax.data import pipeline
from diffuseg_jax.errors import NonFiniteLossError
from diffuseg_jax.train import preemption, sharding
from diffuseg_jax.train.checkpoint import StageCheckpointer
from diffuseg_jax.train.metric_writer import MetricWriter
from diffuseg_jax.train.task import Task, compile_step


@dataclasses.dataclass
class FitResult:
  state: Any
  steps_run: int
  images_per_second: float | None


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """How often the loop logs, checkpoints and (multi-process) agrees on a SIGTERM; whether it shows a bar."""

  log_every: int = 50
  checkpoint_every: int = 500
  preemption_check_every: int = preemption.DEFAULT_AGREE_EVERY
  select_every: int = 0  # call fit's `select` hook every this many steps and at the last step (0: never)
  show_progress: bool = True


@preemption.cooperative()  # SIGTERM in here only sets a flag: the loop picks the step to stop at
def fit(task: Task, state: Any, iterator, checkpointer: StageCheckpointer, writer: MetricWriter, *, mesh: Mesh,
        frozen: Any = None, settings: LoopSettings = LoopSettings(),
        select: Callable[[int, Any], None] | None = None) -> FitResult:
  """Train `state` (placed, replicated on `mesh`) up to `task.num_steps`; `frozen` is passed to every step
  (replicated, never donated). `iterator` yields per-process numpy batches of `task.batch_size` rows in total.
  `select(step, state)` (every process) sees the state every `settings.select_every` steps and at the last
  (choosing weights on validation data: selection.py)."""
  sharding.check_batch_size(task.batch_size, mesh, f'batch size of {task.name}')
  start = int(jax.device_get(state.step))
  if start >= task.num_steps:
    return FitResult(state, 0, None)
  step_fn = compile_step(task, mesh)
  log_every = max(1, int(settings.log_every))
  ckpt_every = max(1, int(settings.checkpoint_every))
  # The save is collective, so every process must stop at the same step: `should_stop` is that agreement
  # (a tiny collective; at least as often as the log steps, which sync with the host anyway).
  agree_every = min(log_every, int(settings.preemption_check_every))
  pending: list[dict] = []
  bar = tqdm(total=task.num_steps, initial=start, desc=task.name, disable=not settings.show_progress,
             dynamic_ncols=True, leave=True)
  t_last, n_last, ips = time.perf_counter(), start, None
  preemption.install_handler()
  try:
    for step in range(start, task.num_steps):
      batch = sharding.shard_batch(next(iterator), mesh)
      state, metrics = step_fn(state, batch, task.rng, frozen)
      pending.append(metrics)
      if len(pending) > 1:  # keep one step in flight: honest progress and images/s, no queue build-up
        jax.block_until_ready(pending[-2])
      done = step + 1
      is_last = done == task.num_steps
      stop = not is_last and preemption.should_stop(done, agree_every)
      if done % log_every == 0 or is_last or done % ckpt_every == 0 or stop:
        host = jax.device_get(pending)
        pending = []
        mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        if not all(math.isfinite(v) for v in mean.values()):
          bad = {k: v for k, v in mean.items() if not math.isfinite(v)}
          raise NonFiniteLossError(
              f'{task.name}: non-finite {bad} at step {done}; the last good checkpoint '
              f'(step {checkpointer.latest_step()}) is kept in {checkpointer.directory}. Lower the learning rate '
              f'(--config.{task.learning_rate_field}) or check the data.'
          )
        now = time.perf_counter()
        ips = (done - n_last) * task.batch_size / max(now - t_last, 1e-9)
        t_last, n_last = now, done
        writer.write(done, {**mean, 'images_per_second': ips})
        bar.set_postfix(loss=f'{mean.get("loss", float("nan")):.4f}', img_s=f'{ips:.0f}')
      bar.update(1)
      if select is not None and settings.select_every and (done % settings.select_every == 0 or is_last):
        select(done, state)  # before the checkpoint of this step: a resume never finds a selection ahead of it
      if done % ckpt_every == 0 or is_last or stop:
        checkpointer.save(done, state, pipeline.get_iterator_state(iterator), force=is_last)
        if stop:
          checkpointer.wait()
          raise preemption.Preempted(f'{task.name}: preempted, checkpoint saved at step {done}')
  finally:
    bar.close()
  return FitResult(state, task.num_steps - start, ips)
