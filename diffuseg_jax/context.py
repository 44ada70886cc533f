"""What every stage sees: the config, the workdir, the device mesh, the data (loaded once), and the glue
between the pipeline and the training core: `train(task, arrays)` and `load(task)` put a task's checkpoints,
data order and logs where this run keeps them."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from diffuseg_jax import atomic, logs
from diffuseg_jax.data import DomainData, load_domain_data, pipeline
from diffuseg_jax.train import task as task_lib
from diffuseg_jax.train.checkpoint import StageCheckpointer
from diffuseg_jax.train.loop import FitResult, LoopSettings, fit
from diffuseg_jax.train.metric_writer import MetricWriter


@dataclasses.dataclass
class Context:
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  show_progress: bool = True
  # Finished tasks' EMA params, so that later stages of one run restore each checkpoint once
  # (see train.task.load_final; keyed by checkpoint folder and its newest step).
  restored: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def is_main_process(self) -> bool:
    return jax.process_index() == 0

  @functools.cached_property
  def data(self) -> DomainData:
    return load_domain_data(self.config.data, self.config.seed)

  @functools.cached_property
  def config_json(self) -> dict:
    return json.loads(self.config.to_json_best_effort())

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def checkpoint_dir(self, name: str) -> str:
    """`<workdir>/checkpoints/<name>`: a stage's (or task's, `Task.checkpoint`) checkpoint folder."""
    return self.path('checkpoints', name)

  def rng(self, name: str) -> jax.Array:
    """A stage's root key: independent across stages, fixed by config.seed."""
    return task_lib.named_rng(self.config.seed, name)

  # --- tasks ---------------------------------------------------------------------------------------------

  def is_trained(self, task: task_lib.Task) -> bool:
    return task_lib.final_step_reached(self.checkpoint_dir(task.checkpoint), task.num_steps)

  def train(self, task: task_lib.Task, arrays: dict[str, np.ndarray], *, frozen: Any = None,
            augment: bool = False) -> FitResult:
    """Trains `task` on shuffled batches of `arrays`, resuming from its newest checkpoint (state and data
    position); the data order is fixed by config.seed and the task's name."""
    cfg = self.config
    iterator = pipeline.train_iterator(arrays, task.batch_size, seed=task_lib.data_seed(cfg.seed, task.name),
                                       augment=augment)
    checkpointer = StageCheckpointer(self.checkpoint_dir(task.checkpoint), max_to_keep=cfg.checkpoint.max_to_keep,
                                     config_json=self.config_json)
    writer = None
    try:
      state, data_state, resumed_from = task_lib.init_or_restore(task, self.mesh, checkpointer)
      if data_state:
        pipeline.set_iterator_state(iterator, data_state)
      if resumed_from is not None:
        logs.say(f'[{task.name}] resuming from checkpoint step {resumed_from} of {task.num_steps}')
      writer = MetricWriter(self.workdir, task.name)
      settings = LoopSettings(log_every=cfg.train.log_every, checkpoint_every=cfg.checkpoint.every_steps,
                              preemption_check_every=cfg.checkpoint.preemption_check_every,
                              show_progress=self.show_progress and cfg.train.progress)
      return fit(task, state, iterator, checkpointer, writer, mesh=self.mesh, frozen=frozen, settings=settings)
    finally:
      if writer is not None:
        writer.close()
      checkpointer.close()

  def load(self, task: task_lib.Task) -> Any:
    """EMA params of a finished task (restored once per run and checkpoint)."""
    return task_lib.load_final(task, self.mesh, self.checkpoint_dir(task.checkpoint), self.restored)

  # --- metrics.json --------------------------------------------------------------------------------------

  def read_results(self) -> dict[str, Any]:
    """metrics.json: every stage's results by section ({} before the first)."""
    path = self.path('metrics.json')
    if not os.path.exists(path):
      return {}
    with open(path) as f:
      return json.load(f)

  def update_results(self, section: str, values: dict[str, Any]) -> None:
    """metrics.json[section] = values, written atomically (process 0 only)."""
    if not self.is_main_process:
      return
    metrics = self.read_results()
    metrics[section] = values
    atomic.write_json(self.path('metrics.json'), metrics)
