"""Both harnesses in one run; the last printed line is the one-line summary for config (b), batch 16:

  sampler_vs_torch=... train_vs_torch=... scan_vs_loop=... matmul_frac=... rss_vs_torch=... baseline=...

  python -m benchmarks [--quick] [--repeats=N] [--no-torch] [--json-dir=DIR]
  python -m benchmarks --same-process      # the old method, for comparison (baseline=same_process)

Default: every implementation is timed in its own fresh process (benchmarks/worker.py), PyTorch once with
OMP_WAIT_POLICY=ACTIVE and once with PASSIVE, the faster one in the ratios (baseline=separate_processes).
"""

from __future__ import annotations

import argparse
import os

from benchmarks import common


def main(argv=None) -> dict[str, float | str | None]:
  p = argparse.ArgumentParser(description='sampler + train-step throughput, ours vs PyTorch')
  p.add_argument('--quick', action='store_true', help='tiny sizes (seconds)')
  p.add_argument('--repeats', type=int, default=None, help='timed runs per implementation (default 5; quick 2)')
  p.add_argument('--no-torch', action='store_true')
  p.add_argument('--same-process', action='store_true',
                 help='the old method: all implementations in one process, torch with OMP_WAIT_POLICY=PASSIVE')
  p.add_argument('--json-dir', default=None, help='write sampler.json and train_step.json here')
  args = p.parse_args(argv)
  if args.json_dir:
    os.makedirs(args.json_dir, exist_ok=True)
  if args.same_process:
    common.prepare_process()  # before torch is imported
  from benchmarks import sampler, train_step

  common_args = ([f'--repeats={args.repeats}'] if args.repeats else []) + ['--quick'] * args.quick
  common_args += ['--no-torch'] * args.no_torch + ['--same-process'] * args.same_process
  json_arg = lambda name: [f'--json={os.path.join(args.json_dir, name)}'] if args.json_dir else []
  print('== sampler ==', flush=True)
  s = sampler.main(common_args + json_arg('sampler.json'))['summary']
  print('== train step ==', flush=True)
  t = train_step.main(common_args + json_arg('train_step.json'))['summary']
  values = {'sampler_vs_torch': s['sampler_vs_torch'], 'train_vs_torch': t['train_vs_torch'],
            'scan_vs_loop': s['scan_vs_loop'], 'matmul_frac': s['matmul_frac']}
  if 'rss_vs_torch' in s:
    values['rss_vs_torch'] = s['rss_vs_torch']
  values['baseline'] = s['baseline']
  print(common.summary_line(values), flush=True)
  return values


if __name__ == '__main__':
  main()
