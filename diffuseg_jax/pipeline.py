"""The stage graph: DiffuSeg's seven stages, run in order, each skipped when its units are complete.

  teacher -> student -> autoencoder -> diffusion -> synthesize -> segment -> evaluate

`config.stages` (comma-separated) selects a subset; the order is always the pipeline order. Each stage
module in `diffuseg_jax/stages/` (named in `stages.STAGES`) exposes `units(ctx)` and `run(ctx)`. A unit's
outputs live under its fingerprint (run_identity.py, units.py): before any work the run prints, per unit,
whether it reuses, resumes, redoes or runs it and why (the fields that differ from the last one kept);
training resumes from the newest checkpoint, synthesis from its finished shards. After each stage the top
of the workdir (metrics.json, figures, links) is rebuilt for this run (results.py), report.md at the end.
"""

from __future__ import annotations

import importlib
import os
import time

import jax
import ml_collections
from jax.experimental import multihost_utils

from diffuseg_jax import atomic, logs, preflight, relabel, report, results, runtime, stable_diffusion, units
from diffuseg_jax.config_validation import check_networks, parse_stages, validate
from diffuseg_jax.context import Context
from diffuseg_jax.stages import STAGES
from diffuseg_jax.train.sharding import make_mesh


def stage_module(name: str):
  return importlib.import_module(f'diffuseg_jax.stages.{name}')


def run(config: ml_collections.ConfigDict, workdir: str, *, show_progress: bool = True) -> Context:
  stable_diffusion.resolve(config)  # a pretrained schedule's values, before any check or fingerprint
  runtime.resolve_compute_dtypes(config)  # train.compute_dtype=auto: each network's dtype on this backend
  validate(config)
  selected = parse_stages(config.stages, STAGES)
  _check_workdir_can_be_made(workdir)  # before the data: loading a large set to then fail on a typo costs minutes
  ctx = Context(config=config, workdir=workdir, mesh=make_mesh(config.mesh), show_progress=show_progress,
                stages=tuple(selected))
  preflight.check_data(ctx)  # load the data: one line per split, and stop on data no stage could use
  second_round = relabel.resolve_auto(ctx)  # 'auto' needs the data (a validation split?); before any fingerprint
  check_networks(config, ctx.data.spec)  # load and check the data, then every network, before any output
  _prepare_workdir(workdir)
  logs.setup(workdir)
  counts = report.data_counts(ctx.data)
  ctx.data_counts = counts
  if ctx.is_main_process:
    atomic.write_text(ctx.path('config.json'), config.to_json_best_effort(indent=2) + '\n')
    logs.say(f'diffuseg_jax: workdir {os.path.abspath(workdir)}; {jax.device_count()} device(s) '
         f'({jax.devices()[0].platform}), {jax.process_count()} process(es); stages: {", ".join(selected)}')
    logs.say(f'data: {counts["num_source"]} source, {counts["num_target"]} target (training), '
             f'{counts["num_test"]} test images' + ('; few-shot target' if counts['few_shot_target'] else ''))
    if second_round:
      logs.say(second_round)
    say_plan(ctx, selected)
  results.publish(ctx)
  for name in selected:
    if run_stage(ctx, name):
      results.publish(ctx)
  results.publish(ctx, report=True)
  return ctx


def run_stage(ctx: Context, name: str, label: str = '') -> bool:
  """Runs stage `name` unless every one of its units is complete for ctx's config; whether it ran. `label`
  leads its log lines (a first round: relabel.py)."""
  module = stage_module(name)
  tag = f'[{label}] [{name}]' if label else f'[{name}]'
  if all(ctx.is_complete(u) for u in module.units(ctx)):
    note = getattr(module, 'skip_note', None)
    logs.say(f'{tag} ' + (note(ctx) if note else 'complete for this config: reused'))
    return False
  start = time.perf_counter()
  logs.say(f'{tag} running')
  module.run(ctx)
  if jax.process_count() > 1:  # process 0 writes results and completion markers: others read them next
    multihost_utils.sync_global_devices(f'stage {tag} done')
  logs.say(f'{tag} done in {time.perf_counter() - start:.1f} s')
  return True


def say_plan(ctx: Context, selected: list[str]) -> None:
  """One line per unit of the selected stages: reuse | resume | redo | run, and why."""
  if os.path.isdir(ctx.path('checkpoints')) and not os.path.isdir(ctx.path(units.UNITS_DIR)):
    logs.say(f'note: {ctx.workdir} holds checkpoints/ of an earlier layout; they are not reused (units/ holds '
             'this version\'s outputs)')
  for name in selected:
    for unit in stage_module(name).units(ctx):
      action, why = units.plan_line(ctx.workdir, ctx.identities(unit))
      logs.say(f'plan: {unit:28s} {action:6s} {why}')


def _check_workdir_can_be_made(workdir: str) -> None:
  """A UserError now, creating nothing, if `workdir` could not be made or written: its nearest existing
  ancestor must be a writable folder. (`_prepare_workdir` then makes it and proves it with a file.)"""
  from diffuseg_jax.errors import UserError

  path = os.path.abspath(workdir)
  while not os.path.lexists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise UserError(f'workdir {workdir!r} is not writable: {path!r} is not a folder')
  if not os.access(path, os.W_OK | os.X_OK):
    raise UserError(f'workdir {workdir!r} is not writable: no permission to write in {path!r}')


def _prepare_workdir(workdir: str) -> None:
  from diffuseg_jax.errors import UserError

  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write-test-{os.getpid()}')
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f'workdir {workdir!r} is not writable: {e.strerror}') from None


