"""The quality benchmark: DiffuSeg against transfer and the oracle on several cross-domain settings.

  python -m benchmarks.quality [--preset=cpu|quick|smoke] [--settings=mnist_m,multiclass,dense_tissue,thin_vessels]
                               [--workdir=runs/quality] [--seeds=0,1,2] [--set FIELD=VALUE ... --label NAME]

`--set` changes a config field of every setting (a candidate improvement, e.g. `--set
diffusion.mask_condition=pseudo_labels`); in the same --workdir only what it changes is recomputed (the
FFD-VAE, transfer and the oracle are reused), and `--label` names its summary file and table.

Settings: the embedded MNIST -> MNIST-M-style set (configs/mnist_m.py), and three generated ones
(benchmarks/quality_data.py: a multi-class anatomy-like phantom, dense brain-like tissue classes with a
reversed contrast, thin vessels with a fundus-like target). Each runs the whole pipeline with the strategies
transfer, self (the oracle: target labels), diffuseg and diffuseg_st, every segmenter with each seed; the
generative stages are trained once per setting. Weights are chosen on each setting's labelled validation
split (the generated settings have one; MNIST-M-style has none: final weights), never on the test split.

Prints a table per setting (Dice mean ± std over seeds, HD95) and, last, the one-line summary (means over
settings): diffuseg_minus_transfer=... frac_of_oracle=... st_minus_transfer=... st_frac_of_oracle=...
settings=N. Workdirs are kept per setting (run identity: a rerun with another seed or strategy trains only
what is new); `summary.json` in --workdir holds every number. `--preset=smoke` runs everything at test sizes
in a few minutes (it checks the harness, its numbers mean nothing). `--preset=quick` runs every setting with
configs/mnist_m.py:quick's networks and step counts (the teacher's 3 x longer) on the CPU preset's data
(6-20 min per setting on 2 cores): a screen for candidates, whose winners are then run with the CPU preset.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import sys
import time

STRATEGIES = ('transfer', 'self', 'diffuseg', 'diffuseg_st')
SETTINGS = ('mnist_m', 'multiclass', 'dense_tissue', 'thin_vessels')
# Rows per split of the generated settings (and their image size), per preset.
GENERATED = {
    'cpu': ({'source': 1000, 'target': 1000, 'val': 50, 'test': 200}, 32),
    'smoke': ({'source': 16, 'target': 16, 'val': 4, 'test': 8}, 16),
}
GENERATED['quick'] = GENERATED['cpu']
# The generated data folder each preset reads: quick screens candidates on the CPU preset's very images.
DATA_OF_PRESET = {'cpu': 'cpu', 'quick': 'cpu', 'smoke': 'smoke'}


def parse_overrides(items: list[str]) -> dict[str, object]:
  """['a.b=1', 'c.d=x'] -> {'a.b': 1, 'c.d': 'x'} (values read as Python literals where they are one)."""
  out = {}
  for item in items:
    key, sep, raw = item.partition('=')
    if not sep or not key:
      raise ValueError(f'--set {item!r}: expected FIELD=VALUE, e.g. diffusion.mask_condition=pseudo_labels')
    try:
      out[key.strip()] = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      out[key.strip()] = raw
  return out


def apply_overrides(config, overrides: dict[str, object]) -> None:
  for key, value in overrides.items():
    *path, field = key.split('.')
    node = config
    for part in path:
      node = node[part]
    if field not in node:
      raise KeyError(f'--set {key}: the config has no field {key}')
    node[field] = value


def setting_config(name: str, preset: str, data_root: str | None, seeds: tuple[int, ...], overrides=None):
  """The run config of one setting: the embedded preset for mnist_m, the same sizes on generated folders."""
  from diffuseg_jax.config_files import load_config

  if preset == 'smoke':
    config = load_config('test')
    default = load_config('default')  # configs/test.py runs the paper's loop; the harness measures the default
    config.diffusion.mask_condition = default.diffusion.mask_condition
    config.sampling.blend_until = default.sampling.blend_until
    config.diffusion.pseudo_labels_from = default.diffusion.pseudo_labels_from
    config.segmentation.steps = 6
    config.segmentation.select_every = 3
  elif preset == 'quick':  # configs/mnist_m.py:quick's networks and steps: a screen of candidates in minutes
    config = load_config('mnist_m:quick')
    config.segmentation.select_every = 40
    # 3 x the preset's 120 teacher steps: the teacher's weights are chosen on the validation split (vae.select),
    # and 120 steps end before its accuracy on the target peaks on some settings (QUALITY.md); mnist_m:quick
    # keeps 120 for its 5-minute budget (360 moved its DiffuSeg Dice from 0.659 to 0.663).
    config.vae.teacher_steps = 360
  else:
    config = load_config('mnist_m')
  if name != 'mnist_m':
    config.data.update(name='folder', root=str(data_root), image_size=GENERATED[preset][1],
                       empty_slices='drop_source')
  config.segmentation.update(strategies=','.join(STRATEGIES), seeds=tuple(seeds))
  config.train.progress = False
  apply_overrides(config, overrides or {})
  return config


def run_setting(name: str, preset: str, workdir: pathlib.Path, seeds: tuple[int, ...], overrides=None) -> dict:
  """Runs (or resumes) one setting; returns metrics.json['evaluate']['strategies'] and the wall time."""
  from benchmarks import quality_data
  from diffuseg_jax import pipeline

  data_root = None
  if name != 'mnist_m':
    counts, size = GENERATED[preset]
    data_root = workdir / 'data' / f'{name}_{DATA_OF_PRESET[preset]}'
    if not (data_root / 'labels.json').exists():
      quality_data.write_setting(name, data_root, counts, size, seed=0)
  config = setting_config(name, preset, data_root, seeds, overrides)
  start = time.perf_counter()
  ctx = pipeline.run(config, str(workdir / f'{name}_{preset}'), show_progress=False)
  strategies = ctx.read_results()['evaluate']['strategies']
  return {'strategies': strategies, 'seconds': time.perf_counter() - start}


def summarise(results: dict[str, dict]) -> dict[str, float | int | None]:
  """Means over settings of DiffuSeg (and diffuseg_st) minus transfer, and of their fraction of the oracle."""

  def dice(setting, strategy):
    r = results[setting]['strategies'].get(strategy)
    return None if r is None else r['dice_mean']

  out: dict[str, float | int | None] = {'settings': len(results)}
  for key, strategy in (('diffuseg', 'diffuseg'), ('st', 'diffuseg_st')):
    gains, fracs = [], []
    for setting in results:
      d, t, o = dice(setting, strategy), dice(setting, 'transfer'), dice(setting, 'self')
      if d is not None and t is not None:
        gains.append(d - t)
      if d is not None and o:
        fracs.append(d / o)
    out[f'{key}_minus_transfer'] = sum(gains) / len(gains) if gains else None
    out[f'{key}_frac_of_oracle'] = sum(fracs) / len(fracs) if fracs else None
  return out


def table(results: dict[str, dict]) -> list[str]:
  lines = ['| setting | strategy | Dice | HD95 | seeds |', '|---|---|---|---|---|']
  for setting, r in results.items():
    for strategy in STRATEGIES:
      s = r['strategies'].get(strategy)
      if s is None:
        continue
      hd95 = '-' if s.get('hd95_mean') is None else f'{s["hd95_mean"]:.2f}'
      lines.append(f'| {setting} | {strategy} | {s["dice_mean"]:.3f} ± {s["dice_std"]:.3f} | {hd95} | '
                   f'{len(s["seeds"])} |')
  return lines


def summary_line(summary: dict) -> str:
  fmt = lambda v: 'n/a' if v is None else (str(v) if isinstance(v, int) else f'{v:.3f}')  # noqa: E731
  return (f'diffuseg_minus_transfer={fmt(summary["diffuseg_minus_transfer"])} '
          f'frac_of_oracle={fmt(summary["diffuseg_frac_of_oracle"])} '
          f'st_minus_transfer={fmt(summary["st_minus_transfer"])} '
          f'st_frac_of_oracle={fmt(summary["st_frac_of_oracle"])} settings={summary["settings"]}')


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description='DiffuSeg vs transfer and the oracle on several cross-domain settings')
  p.add_argument('--preset', choices=tuple(GENERATED), default='cpu')
  p.add_argument('--settings', default=','.join(SETTINGS))
  p.add_argument('--workdir', default='runs/quality')
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                 help='a config field for every setting (repeatable): a candidate improvement')
  p.add_argument('--label', default='', help='names the summary file of a --set run: summary_<preset>_<label>.json')
  args = p.parse_args(argv)
  try:
    overrides = parse_overrides(args.set)
  except ValueError as e:
    p.error(str(e))
  names = [s.strip() for s in args.settings.split(',') if s.strip()]
  unknown = [s for s in names if s not in SETTINGS]
  if unknown or not names:
    p.error(f'--settings: unknown {unknown}; choose from {",".join(SETTINGS)}')
  try:
    seeds = tuple(int(s) for s in args.seeds.split(','))
  except ValueError:
    p.error(f'--seeds={args.seeds!r}: comma-separated integers')
  workdir = pathlib.Path(os.path.expanduser(args.workdir))
  workdir.mkdir(parents=True, exist_ok=True)
  results = {}
  for name in names:
    print(f'== {name} ({args.preset}) ==', flush=True)
    results[name] = run_setting(name, args.preset, workdir, seeds, overrides)
    print(f'== {name}: {results[name]["seconds"] / 60:.1f} min', flush=True)
  summary = summarise(results)
  label = f'_{args.label}' if args.label else ''
  (workdir / f'summary_{args.preset}{label}.json').write_text(json.dumps(
      {'preset': args.preset, 'seeds': seeds, 'overrides': overrides, 'results': results, 'summary': summary},
      indent=1) + '\n')
  if overrides:
    print('overrides: ' + ', '.join(f'{k}={v!r}' for k, v in overrides.items()))
  print('\n'.join(table(results)))
  print(summary_line(summary), flush=True)
  return summary


if __name__ == '__main__':
  sys.exit(0 if main() else 1)
