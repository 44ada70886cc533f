"""The stage graph: DiffuSeg's seven stages, run in order, each skipped when its output already exists.

  teacher -> student -> autoencoder -> diffusion -> synthesize -> segment -> evaluate

`config.stages` (comma-separated) selects a subset; the order is always the pipeline order. Each stage
module in `diffuseg_jax/stages/` (named in `stages.STAGES`) exposes `is_done(ctx) -> bool` and `run(ctx) -> None`;
training stages resume from their newest checkpoint, synthesis from its finished shards.
"""

from __future__ import annotations

import importlib
import os
import time

import jax
import ml_collections

from diffuseg_jax import atomic, logs, report
from diffuseg_jax.config_validation import check_networks, parse_stages, validate
from diffuseg_jax.context import Context
from diffuseg_jax.stages import STAGES
from diffuseg_jax.train.sharding import make_mesh


def stage_module(name: str):
  return importlib.import_module(f'diffuseg_jax.stages.{name}')


def run(config: ml_collections.ConfigDict, workdir: str, *, show_progress: bool = True) -> Context:
  validate(config)
  selected = parse_stages(config.stages, STAGES)
  ctx = Context(config=config, workdir=workdir, mesh=make_mesh(config.mesh), show_progress=show_progress)
  check_networks(config, ctx.data.spec)  # load and check the data, then every network, before any output
  _prepare_workdir(workdir)
  logs.setup(workdir)
  counts = report.data_counts(ctx.data)
  ctx.update_results('data', counts)  # process 0 only
  if ctx.is_main_process:
    atomic.write_text(ctx.path('config.json'), config.to_json_best_effort(indent=2) + '\n')
    logs.say(f'diffuseg_jax: workdir {os.path.abspath(workdir)}; {jax.device_count()} device(s) '
         f'({jax.devices()[0].platform}), {jax.process_count()} process(es); stages: {", ".join(selected)}')
    logs.say(f'data: {counts["num_source"]} source, {counts["num_target"]} target (training), '
             f'{counts["num_test"]} test images' + ('; few-shot target' if counts['few_shot_target'] else ''))
  for name in selected:
    module = stage_module(name)
    if module.is_done(ctx):
      note = getattr(module, 'skip_note', None)
      logs.say(f'[{name}] ' + (note(ctx) if note else f'already done in {workdir}: skipped'))
      continue
    start = time.perf_counter()
    logs.say(f'[{name}] running')
    module.run(ctx)
    logs.say(f'[{name}] done in {time.perf_counter() - start:.1f} s')
  return ctx


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


