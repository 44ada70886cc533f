"""Training curves out: `metrics.jsonl` (one JSON object per logged step) and TensorBoard event files.

Only process 0 writes. Each line: {"stage": ..., "step": ..., "<metric>": float, ...}.
"""

from __future__ import annotations

import json
import os

import jax


class MetricWriter:
  def __init__(self, workdir: str, stage: str):
    self.stage = stage
    self._enabled = jax.process_index() == 0
    self._jsonl = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if self._enabled:
      from tensorboardX import SummaryWriter  # local: only process 0 needs it

      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard', stage))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self._enabled:
      return
    row = {'stage': self.stage, 'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self._jsonl, 'a') as f:  # one short line per append: a reader never sees half a record
      f.write(json.dumps(row) + '\n')
    for k, v in metrics.items():
      self._tb.add_scalar(f'{self.stage}/{k}', float(v), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def read_training_log(workdir: str, stage: str | None = None) -> list[dict]:
  """The rows of `metrics.jsonl` (of one task name when `stage` is given), skipping a line cut by a kill."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a line cut by a SIGKILL mid-write
        continue
      if stage is None or row.get('stage') == stage:
        rows.append(row)
  return rows
