"""What every stage sees: the config, the workdir, the device mesh, the data (loaded once), and the glue
between the pipeline and the training core: `train(task, arrays)` and `load(task)` put a task's checkpoints,
data order and logs in its unit folder, `<workdir>/units/<unit>/<fingerprint>/` (run_identity.py, units.py),
and `read_results()` is this run's results, gathered from its units."""

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

from diffuseg_jax import atomic, logs, units
from diffuseg_jax.data import DomainData, load_domain_data, pipeline
from diffuseg_jax.errors import UserError
from diffuseg_jax.run_identity import Identities
from diffuseg_jax.train import task as task_lib
from diffuseg_jax.train.checkpoint import StageCheckpointer
from diffuseg_jax.train.loop import FitResult, LoopSettings, fit
from diffuseg_jax.train.metric_writer import MetricWriter, read_training_log


@dataclasses.dataclass
class Context:
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  show_progress: bool = True
  # Finished tasks' EMA params, so that later stages of one run restore each checkpoint once
  # (see train.task.load_final; keyed by checkpoint folder and its newest step).
  restored: dict = dataclasses.field(default_factory=dict, repr=False)
  stages: tuple[str, ...] = ()  # the stages this run executes (set by the pipeline)
  data_counts: dict | None = None  # metrics.json["data"] (set by the pipeline)
  verified: set = dataclasses.field(default_factory=set, repr=False)  # unit folders found complete this run

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

  def with_config(self, config: ml_collections.ConfigDict) -> Context:
    """This run's context under another config of the same data and workdir (a first round, relabel.py):
    the loaded data and the caches of restored parameters and verified units are shared."""
    other = dataclasses.replace(self, config=config)
    other.__dict__['data'] = self.data  # the cached_property's slot: the data are loaded once
    return other

  # --- units (run_identity.py, units.py) ------------------------------------------------------------------

  @functools.cached_property
  def identities(self) -> Identities:
    return Identities(self.config)

  def fingerprint(self, unit: str) -> str:
    return self.identities(unit).fingerprint

  def unit_dir(self, unit: str) -> str:
    """This run's folder of `unit`, `<workdir>/units/<unit>/<fingerprint>` (created with its identity.json
    by process 0 the first time it is asked for)."""
    path = units.unit_dir(self.workdir, unit, self.fingerprint(unit))
    if self.is_main_process:
      units.write_identity(path, self.identities(unit))
    return path

  def is_complete(self, unit: str) -> bool:
    """The unit's outputs are all in place (a training unit's final checkpoint verified, once per run)."""
    path = units.unit_dir(self.workdir, unit, self.fingerprint(unit))
    if path not in self.verified:
      if not units.completion(path).complete:
        return False
      self.verified.add(path)
    return True

  def complete(self, unit: str, checkpoint_step: int | None = None) -> None:
    """Marks `unit` complete (process 0), last: after every output of it is written."""
    if self.is_main_process:
      units.mark_complete(self.unit_dir(unit), checkpoint_step)
      self.verified.add(self.unit_dir(unit))

  def unit_results(self, unit: str) -> dict | None:
    return units.read_json(os.path.join(units.unit_dir(self.workdir, unit, self.fingerprint(unit)),
                                        'results.json'))

  def save_unit_results(self, unit: str, values: dict[str, Any]) -> None:
    if self.is_main_process:
      atomic.write_json(os.path.join(self.unit_dir(unit), 'results.json'), values)

  def checkpoint_dir(self, unit: str) -> str:
    """`<unit folder>/checkpoints`: a training unit's (`Task.checkpoint`) checkpoint folder."""
    return os.path.join(self.unit_dir(unit), 'checkpoints')

  def rng(self, name: str) -> jax.Array:
    """A stage's root key: independent across stages, fixed by config.seed."""
    return task_lib.named_rng(self.config.seed, name)

  # --- tasks ---------------------------------------------------------------------------------------------

  def is_trained(self, task: task_lib.Task) -> bool:
    """The task's unit is complete: its final checkpoint is in place and verified (units.completion)."""
    return self.is_complete(task.checkpoint)

  def train(self, task: task_lib.Task, arrays: dict[str, np.ndarray], *, frozen: Any = None,
            augment: bool = False, intensity: bool = False, curves: str = 'monotone', bias_blur: bool = False,
            complete: bool = True,
            select: Any = None, select_every: int = 0) -> FitResult:
    """Trains `task` on shuffled batches of `arrays`, resuming from its newest checkpoint (state and data
    position); the data order is fixed by config.seed and the task's name. A final checkpoint damaged since
    it was written is set aside first (training then resumes from the one before). `complete`: mark the
    unit complete when training ends (False for units with more outputs to write: the caller marks it).
    `augment`: random flips / 90-degree rotations; `intensity`: random intensity curves (of family `curves`,
    data/intensity.py) + noise on 'image', with `bias_blur` also a random bias field and blur.
    `select`, `select_every`: `fit`'s weight-selection hook (selection.py)."""
    cfg = self.config
    unit_path = self.unit_dir(task.checkpoint)
    state_of_unit = units.completion(unit_path)
    if state_of_unit.damaged:
      if self.is_main_process:
        moved = units.set_aside_damaged(unit_path, state_of_unit.step)
        logs.say(f'[{task.name}] the final checkpoint is damaged ({state_of_unit.damaged}): moved to {moved}; '
                 'training again from the previous checkpoint')
      _sync(f'set_aside_{task.checkpoint}')
    iterator = pipeline.train_iterator(arrays, task.batch_size, seed=task_lib.data_seed(cfg.seed, task.name),
                                       augment=augment, intensity=intensity, curves=curves,
                                       bias_blur=bias_blur)
    checkpointer = StageCheckpointer(self.checkpoint_dir(task.checkpoint), max_to_keep=cfg.checkpoint.max_to_keep,
                                     config_json=self.config_json)
    writer = None
    try:
      state, data_state, resumed_from = task_lib.init_or_restore(task, self.mesh, checkpointer)
      if data_state:
        pipeline.set_iterator_state(iterator, data_state)
      if resumed_from is not None:
        logs.say(f'[{task.name}] resuming from checkpoint step {resumed_from} of {task.num_steps}')
      writer = MetricWriter(unit_path, task.name)
      settings = LoopSettings(log_every=cfg.train.log_every, checkpoint_every=cfg.checkpoint.every_steps,
                              preemption_check_every=cfg.checkpoint.preemption_check_every,
                              show_progress=self.show_progress and cfg.train.progress, select_every=select_every)
      result = fit(task, state, iterator, checkpointer, writer, mesh=self.mesh, frozen=frozen, settings=settings,
                   select=select)
    finally:
      if writer is not None:
        writer.close()
      checkpointer.close()
    if complete:
      self.complete(task.checkpoint, task.num_steps)
    # Later stages of this run read these weights (`load`): hand them the ones in memory, which the final
    # checkpoint holds bit for bit, instead of restoring the whole state from disk again.
    final = (os.path.abspath(self.checkpoint_dir(task.checkpoint)), task.num_steps)
    self.restored[final] = result.state.ema_params
    return result

  def load(self, task: task_lib.Task) -> Any:
    """EMA params of a finished task (restored once per run and checkpoint); a final checkpoint that changed
    since it was written is never used."""
    path = units.unit_dir(self.workdir, task.checkpoint, self.fingerprint(task.checkpoint))
    state_of_unit = units.Completion(True) if path in self.verified else units.completion(path)
    if state_of_unit.damaged:
      raise UserError(f'{task.name}: {state_of_unit.damaged}; rerun the same command to train it again')
    return task_lib.load_final(task, self.mesh, self.checkpoint_dir(task.checkpoint), self.restored)

  def training_log(self, unit: str) -> list[dict]:
    """The rows of a training unit's metrics.jsonl in this run."""
    return read_training_log(units.unit_dir(self.workdir, unit, self.fingerprint(unit)))

  # --- metrics.json --------------------------------------------------------------------------------------

  def read_results(self) -> dict[str, Any]:
    """This run's results, gathered from its units (metrics.json has the same; see results.py)."""
    from diffuseg_jax import results

    return results.gather(self)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
