"""The one training loop every stage uses: fetch, shard, step, log, checkpoint, resume.

A stage supplies a pure `step_fn(state, batch, rng, frozen) -> (state, metrics)`; this module compiles it
once with shardings (state replicated, batch on 'data', `donate_argnums=0`), resumes from the newest
checkpoint (state + grain iterator position), and stops with `NonFiniteLossError` on a NaN/inf loss without
ever writing a checkpoint of the bad state. On SIGTERM all processes agree on a step, checkpoint it and raise
`preemption.Preempted` (train/preemption.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from diffuseg_jax.data import pipeline
from diffuseg_jax.errors import NonFiniteLossError
from diffuseg_jax.train import preemption, sharding
from diffuseg_jax.train.checkpoint import StageCheckpointer
from diffuseg_jax.train.logging import MetricWriter


@dataclasses.dataclass
class FitResult:
  state: Any
  resumed_from: int | None
  steps_run: int
  images_per_second: float | None


@preemption.cooperative()  # SIGTERM in here only sets a flag: the loop picks the step to stop at
def fit(
    *,
    stage: str,
    ctx,
    state: Any,
    step_fn: Callable,
    arrays: dict[str, np.ndarray],
    batch_size: int,
    num_steps: int,
    rng: jax.Array,
    frozen: Any = None,
    augment: bool = False,
    checkpoint_dir: str | None = None,
) -> FitResult:
  """Train `state` for `num_steps` steps of `step_fn` on shuffled batches of `arrays` (resumable).

  ctx: the pipeline context (config, workdir, mesh). `state` must already be placed (replicated);
  `frozen` is a pytree of fixed parameters passed to every step (replicated, never donated).
  """
  config, mesh = ctx.config, ctx.mesh
  sharding.check_batch_size(batch_size, mesh, f'batch size of stage {stage}')
  ckpt = StageCheckpointer(
      checkpoint_dir or ctx.checkpoint_dir(stage),
      max_to_keep=config.checkpoint.max_to_keep,
      config_json=ctx.config_json,
  )
  data_seed = config.seed * 1_000_003 + zlib.crc32(stage.encode()) % 1_000_003  # per stage, fixed by config.seed
  iterator = pipeline.train_iterator(arrays, batch_size, seed=data_seed, augment=augment)
  resumed_from = None
  # Restore onto this run's mesh: with no target sharding orbax would fall back to the sharding it saved,
  # which fails when the device or process count changed since (a resumed job on other hardware).
  restored = ckpt.restore(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)), state))
  if restored is not None:
    state, data_state, resumed_from = restored
    state = jax.device_put(state, sharding.replicated(mesh))
    if data_state:
      pipeline.set_iterator_state(iterator, data_state)
  start = int(jax.device_get(state.step))
  if resumed_from is not None and ctx.is_main_process:
    print(f'[{stage}] resuming from checkpoint step {resumed_from} of {num_steps}', flush=True)
  if start >= num_steps:
    ckpt.close()
    return FitResult(state, resumed_from, 0, None)

  repl = sharding.replicated(mesh)
  batch_sh = sharding.batch_sharding(mesh)
  jitted = jax.jit(
      step_fn,
      in_shardings=(repl, batch_sh, repl, repl),
      out_shardings=(repl, repl),
      donate_argnums=0,
  )
  writer = MetricWriter(ctx.workdir, stage)
  log_every = max(1, int(config.train.log_every))
  ckpt_every = max(1, int(config.checkpoint.every_steps))
  pending: list[dict] = []
  bar = tqdm(
      total=num_steps, initial=start, desc=stage, disable=not ctx.show_progress, dynamic_ncols=True, leave=True
  )
  t_last, n_last, ips = time.perf_counter(), start, None
  preemption.install_handler()
  # The save is collective, so every process must stop at the same step: `should_stop` is that agreement
  # (a tiny collective; at least as often as the log steps, which sync with the host anyway).
  agree_every = min(log_every, int(config.checkpoint.preemption_check_every))
  try:
    for step in range(start, num_steps):
      batch = sharding.shard_batch(next(iterator), mesh)
      state, metrics = jitted(state, batch, rng, frozen)
      pending.append(metrics)
      if len(pending) > 1:  # keep one step in flight: honest progress and images/s, no queue build-up
        jax.block_until_ready(pending[-2])
      done = step + 1
      is_last = done == num_steps
      stop = not is_last and preemption.should_stop(done, agree_every)
      if done % log_every == 0 or is_last or done % ckpt_every == 0 or stop:
        host = jax.device_get(pending)
        pending = []
        mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        if not all(math.isfinite(v) for v in mean.values()):
          bad = {k: v for k, v in mean.items() if not math.isfinite(v)}
          raise NonFiniteLossError(
              f'stage {stage}: non-finite {bad} at step {done}; the last good checkpoint '
              f'(step {ckpt.latest_step()}) is kept in {ckpt.directory}. Lower the learning rate '
              f'(--config.{ctx.section_of(stage)}.learning_rate) or check the data.'
          )
        now = time.perf_counter()
        ips = (done - n_last) * batch_size / max(now - t_last, 1e-9)
        t_last, n_last = now, done
        writer.write(done, {**mean, 'images_per_second': ips})
        bar.set_postfix(loss=f'{mean.get("loss", float("nan")):.4f}', img_s=f'{ips:.0f}')
      bar.update(1)
      if done % ckpt_every == 0 or is_last or stop:
        ckpt.save(done, state, pipeline.get_iterator_state(iterator), force=is_last)
        if stop:
          ckpt.wait()
          raise preemption.Preempted(f'stage {stage}: preempted, checkpoint saved at step {done}')
  finally:
    bar.close()
    writer.close()
    ckpt.close()
  return FitResult(state, resumed_from, num_steps - start, ips)

