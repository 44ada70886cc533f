"""What every stage sees: the config, the workdir, the device mesh, the data (loaded once), and helpers
for atomic outputs (`metrics.json`) and per-stage checkpoint folders."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import zlib
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from diffuseg_jax import atomic
from diffuseg_jax.data import DomainData, load_domain_data

# Config section holding each training stage's optimiser settings (for error messages).
STAGE_SECTIONS = {
    'teacher': 'vae',
    'student': 'vae',
    'autoencoder': 'autoencoder',
    'diffusion': 'diffusion',
    'segment': 'segmentation',
}


@dataclasses.dataclass
class Context:
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  show_progress: bool = True
  # Finished stages' restored states, so that later stages of one run restore each checkpoint once
  # (see train.init.restore_final_ema_params; keyed by checkpoint folder and its newest step).
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

  def checkpoint_dir(self, stage: str) -> str:
    return self.path('checkpoints', stage)

  def section_of(self, stage: str) -> str:
    return STAGE_SECTIONS.get(stage.split('_')[0], stage)

  def rng(self, stage: str) -> jax.Array:
    """A stage's root key: independent across stages, fixed by config.seed."""
    return jax.random.fold_in(jax.random.key(self.config.seed), zlib.crc32(stage.encode()) & 0x7FFFFFFF)

  def read_metrics(self) -> dict[str, Any]:
    path = self.path('metrics.json')
    if not os.path.exists(path):
      return {}
    with open(path) as f:
      return json.load(f)

  def update_metrics(self, section: str, values: dict[str, Any]) -> None:
    """metrics.json[section] = values, written atomically (process 0 only)."""
    if not self.is_main_process:
      return
    metrics = self.read_metrics()
    metrics[section] = values
    atomic.write_json(self.path('metrics.json'), metrics)
