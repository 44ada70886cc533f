"""The top of a workdir always describes the current run: metrics.json, report.md, figures/, synthetic and
predictions/ are rebuilt from this run's units (units.py) after every stage, never left from another config.

metrics.json:
  data            image counts per split (report.data_counts)
  fingerprints    {unit: fingerprint} of every unit of this run (run_identity.py)
  ffd_vae         the student unit's diagnostics          + fingerprint
  autoencoder     the autoencoder unit's results          + fingerprint
  synthesize      the synthesize unit's results           + fingerprint
  evaluate        stages/evaluate.py `collect` (per-seed results and image quality carry their fingerprints)
A section is present only when its unit is complete in this run's fingerprint.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from diffuseg_jax import atomic, units

REPORT_FIGURES = ('segmentation_examples.png', 'loss_curves.png')  # drawn by report.write_report
SECTIONS = {'ffd_vae': 'student', 'autoencoder': 'autoencoder', 'synthesize': 'synthesize'}


def run_units(ctx) -> list[str]:
  """Every unit of this run, in pipeline order (the stages' `units`)."""
  from diffuseg_jax.pipeline import stage_module
  from diffuseg_jax.stages import STAGES

  return [u for name in STAGES for u in stage_module(name).units(ctx)]


def gather(ctx) -> dict[str, Any]:
  from diffuseg_jax.stages import evaluate

  out: dict[str, Any] = {}
  if ctx.data_counts is not None:
    out['data'] = ctx.data_counts
  out['fingerprints'] = {u: ctx.fingerprint(u) for u in run_units(ctx)}
  for section, unit in SECTIONS.items():
    values = ctx.unit_results(unit) if ctx.is_complete(unit) else None
    if values is not None:
      out[section] = {**values, 'fingerprint': ctx.fingerprint(unit)}
  collected = evaluate.collect(ctx)
  if collected is not None:
    out['evaluate'] = collected
  return out


def publish(ctx, *, report: bool = False) -> None:
  """Rewrites metrics.json, figures/, the `synthetic` link and predictions/ for this run (process 0); with
  `report`, report.md too (when this run has evaluation results; otherwise a stale one is removed)."""
  if not ctx.is_main_process:
    return
  metrics = gather(ctx)
  atomic.write_json(ctx.path('metrics.json'), metrics)
  _link(ctx, 'synthetic', units.unit_dir(ctx.workdir, 'synthesize', ctx.fingerprint('synthesize')), 'synthetic',
        ctx.is_complete('synthesize'))
  _publish_figures(ctx)
  _publish_predictions(ctx)
  if 'evaluate' not in metrics:
    # A report of other units (another config): removed, and written again once this run has evaluated.
    for path in [ctx.path('report.md')] + [ctx.path('figures', f) for f in REPORT_FIGURES]:
      if os.path.exists(path):
        os.remove(path)
  elif report:
    from diffuseg_jax import report as report_lib

    report_lib.write_report(ctx, metrics)


def _link(ctx, name: str, unit_path: str, inner: str, present: bool) -> None:
  """`<workdir>/<name>` -> `<unit_path>/<inner>` (relative symlink), or no link when not `present`. A real
  folder of that name (an earlier layout) is left alone."""
  link = ctx.path(name)
  if os.path.exists(link) and not os.path.islink(link):
    return
  if os.path.islink(link):
    os.remove(link)
  target = os.path.join(unit_path, inner)
  if present and os.path.exists(target):
    tmp = f'{link}.tmp-{os.getpid()}'
    os.symlink(os.path.relpath(target, os.path.dirname(link)), tmp)
    os.replace(tmp, link)


def _publish_figures(ctx) -> None:
  """figures/: copies of this run's units' figures (the report's own are added by report.write_report); a
  figure of a unit of another config is removed."""
  fig_dir = ctx.path('figures')
  os.makedirs(fig_dir, exist_ok=True)
  for name in os.listdir(fig_dir):
    if name not in REPORT_FIGURES and os.path.isfile(os.path.join(fig_dir, name)):
      os.remove(os.path.join(fig_dir, name))
  for unit in run_units(ctx):
    src = os.path.join(units.unit_dir(ctx.workdir, unit, ctx.fingerprint(unit)), 'figures')
    if ctx.is_complete(unit) and os.path.isdir(src):
      for name in os.listdir(src):
        shutil.copyfile(os.path.join(src, name), os.path.join(fig_dir, name))


def _publish_predictions(ctx) -> None:
  """predictions/<strategy> -> the first seed's evaluation unit's predictions (medical volumes only)."""
  from diffuseg_jax.stages import evaluate

  root = ctx.path('predictions')
  current = evaluate.prediction_units(ctx)
  if os.path.isdir(root):
    for name in os.listdir(root):
      if os.path.islink(os.path.join(root, name)) and name not in current:
        os.remove(os.path.join(root, name))
  for strategy, unit in current.items():
    path = units.unit_dir(ctx.workdir, unit, ctx.fingerprint(unit))
    if ctx.is_complete(unit) and os.path.isdir(os.path.join(path, 'predictions')):
      os.makedirs(root, exist_ok=True)
      _link(ctx, os.path.join('predictions', strategy), path, 'predictions', True)
