"""Choosing a network's weights on the validation split, never on the test split (the paper's early stopping).

With `segmentation.select='val'` and a labelled validation split, the segment stage scores the EMA weights
every `segmentation.select_every` steps (and at the last step) by their mean foreground Dice on the
validation images, and keeps the best weights so far in the run's unit folder. With `vae.select='val'` the
teacher and the student are chosen the same way, each by its segmentation head's Dice on the (target-domain)
validation images, every `vae.select_every` steps:

  selection.json          {'selected_on': 'val', 'num_images', 'every', 'scores': {step: dice}, 'best_step',
                           'best_val_dice', 'crc32': checksum of the weights file}
  selected_params.npz     the best EMA weights, one array per parameter path

Both are written atomically before the checkpoint of the same step, so a run killed at any moment resumes
with a selection that matches what it trained; a step scored again after a resume (same data, same weights)
replaces its own score. Evaluation then reads the selected weights (`load_selected`). Without validation
labels, or with select='last', the final EMA weights are used and `selection.json` says why.

The validation score is pooled over all validation pixels per class (2 |P n G| / (|P| + |G|)), averaged over
the foreground classes present in the labels or predictions: cheap, and defined for any number of images.
"""

from __future__ import annotations

import io
import os
import zlib
from typing import Any

import jax
import numpy as np

from diffuseg_jax import atomic, units
from diffuseg_jax.errors import UserError
from diffuseg_jax.train import sharding

SELECTION_FILE = 'selection.json'
PARAMS_FILE = 'selected_params.npz'


def pooled_foreground_dice(pred: np.ndarray, label: np.ndarray, num_classes: int) -> float:
  """Mean over foreground classes present in `label` or `pred` of the Dice pooled over all pixels; 1.0 when
  neither has any foreground (nothing to find, nothing found)."""
  scores = []
  for k in range(1, num_classes):
    p, g = pred == k, label == k
    total = int(p.sum()) + int(g.sum())
    if total:
      scores.append(2.0 * int(np.logical_and(p, g).sum()) / total)
  return float(np.mean(scores)) if scores else 1.0


def wants_validation(ctx, field: str = 'segmentation.select') -> str | None:
  """None when the stage whose choice is `field` selects on the validation split, else the reason it uses the
  last step."""
  section, name = field.split('.')
  if getattr(getattr(ctx.config, section), name) == 'last':
    return f'{field}=last'
  val = ctx.data.val
  if val is None or len(val) == 0 or not val.labelled:
    return 'no labelled validation split'
  return None


class BestOnValidation:
  """`fit`'s selection hook: `self(step, state)` scores state.ema_params on the validation split and keeps the
  best weights (see the module docstring). Every process calls it (the inference is collective); process 0
  writes. `predict(params, images) -> int labels [N, H, W]`: the network's segmentation (default: a segmenter's,
  `evaluate.predict`); `every`: how often it is called (recorded; default segmentation.select_every)."""

  def __init__(self, ctx, unit: str, model, *, predict=None, every: int | None = None):
    self.ctx, self.model, self.folder = ctx, model, ctx.unit_dir(unit)
    self.predict, self.every = predict, int(ctx.config.segmentation.select_every if every is None else every)
    self.val = ctx.data.val
    previous = units.read_json(os.path.join(self.folder, SELECTION_FILE)) or {}
    self.scores = {int(k): float(v) for k, v in previous.get('scores', {}).items()}
    self.best_step = previous.get('best_step')
    self.best = previous.get('best_val_dice')
    self.crc32 = previous.get('crc32')

  def score(self, params) -> float:
    if self.predict is not None:
      pred = self.predict(params, self.val.images)
    else:
      from diffuseg_jax.stages import evaluate  # the evaluation's own prediction (evaluate imports segment)

      pred = evaluate.predict(self.ctx, self.model, params, self.val.images)
    return pooled_foreground_dice(pred, self.val.labels, self.ctx.data.num_classes)

  def __call__(self, step: int, state: Any) -> None:
    dice = self.score(state.ema_params)
    self.scores[step] = dice
    if self.best is None or dice > self.best or step == self.best_step:
      self.best, self.best_step = dice, step
      if self.ctx.is_main_process:
        self.crc32 = _save_params(os.path.join(self.folder, PARAMS_FILE), state.ema_params)
    if self.ctx.is_main_process:
      atomic.write_json(os.path.join(self.folder, SELECTION_FILE), self.summary())

  def summary(self) -> dict:
    return {'selected_on': 'val', 'num_images': len(self.val), 'every': self.every,
            'scores': {str(k): v for k, v in sorted(self.scores.items())}, 'best_step': self.best_step,
            'best_val_dice': self.best, 'crc32': self.crc32}


def train_choosing(ctx, t, arrays, *, field: str, every: int, predict=None, **train_kwargs):
  """ctx.train for task `t`, choosing its weights on the validation split when `field` ('segmentation.select',
  'vae.select') says 'val' and the data has labelled validation images: returns the BestOnValidation hook (its
  best_step, best); else records why the final weights are kept and returns None. `predict`: as for
  BestOnValidation."""
  reason = wants_validation(ctx, field)
  if reason is not None:
    record_last_step(ctx, t.checkpoint, reason)
    ctx.train(t, arrays, **train_kwargs)
    return None
  chooser = BestOnValidation(ctx, t.checkpoint, t.model, predict=predict, every=every)
  ctx.train(t, arrays, select=chooser, select_every=int(every), **train_kwargs)
  return chooser


def load_chosen(ctx, t) -> Any:
  """EMA params of the finished task `t`: those chosen on the validation split, or the final ones."""
  final = ctx.load(t)  # also checks that the unit is intact
  selected = load_selected(ctx, t.checkpoint, t.init_params, t.rng)
  return final if selected is None else selected


def record_last_step(ctx, unit: str, reason: str) -> None:
  """selection.json of a run that keeps its final weights, with the reason."""
  if ctx.is_main_process:
    atomic.write_json(os.path.join(ctx.unit_dir(unit), SELECTION_FILE),
                      {'selected_on': 'last step', 'reason': reason, 'best_step': None})


def read(ctx, unit: str) -> dict | None:
  return units.read_json(os.path.join(ctx.unit_dir(unit), SELECTION_FILE))


def load_selected(ctx, unit: str, init_params, rng) -> Any | None:
  """The validation-selected weights of `unit`, replicated on the run's mesh; None when the run keeps its final
  weights. `init_params(rng)` gives the parameter tree they must fit (shapes checked)."""
  chosen = read(ctx, unit)
  if not chosen or chosen.get('selected_on') != 'val' or chosen.get('best_step') is None:
    return None
  path = os.path.join(ctx.unit_dir(unit), PARAMS_FILE)
  try:
    with open(path, 'rb') as f:
      blob = f.read()
  except OSError as e:
    raise UserError(f'{unit}: the validation-selected weights are missing ({e}); remove {ctx.unit_dir(unit)} '
                    'and rerun to train it again') from None
  if zlib.crc32(blob) != chosen['crc32']:
    raise UserError(f'{unit}: {path} changed since it was written; remove {ctx.unit_dir(unit)} and rerun to train '
                    'it again')
  with np.load(io.BytesIO(blob)) as arrays:
    saved = dict(arrays)
  abstract = jax.eval_shape(init_params, rng)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  values = []
  for path_keys, leaf in leaves:
    key = jax.tree_util.keystr(path_keys)
    if key not in saved or saved[key].shape != leaf.shape:
      raise UserError(f'{unit}: {PARAMS_FILE} does not fit the current network at {key}; remove '
                      f'{ctx.unit_dir(unit)} and rerun to train it again')
    values.append(saved[key].astype(leaf.dtype))
  return jax.device_put(jax.tree_util.tree_unflatten(treedef, values), sharding.replicated(ctx.mesh))


def _save_params(path: str, params) -> int:
  """Writes params (one array per path) atomically; returns the file's CRC-32."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  arrays = {jax.tree_util.keystr(k): np.asarray(_local(v)) for k, v in leaves}
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  blob = buffer.getvalue()
  with atomic.atomic_path(path) as tmp, open(tmp, 'wb') as f:
    f.write(blob)
  return zlib.crc32(blob)


def _local(x):
  """A replicated array's value on this process (also when it spans several processes)."""
  return x.addressable_data(0) if isinstance(x, jax.Array) else x
