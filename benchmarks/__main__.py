"""Both harnesses in one run; the last printed line is the one-line summary for config (b), batch 16:

  sampler_vs_torch=... train_vs_torch=... scan_vs_loop=... matmul_frac=...

  python -m benchmarks [--quick] [--repeats=N] [--json-dir=DIR]
"""

from __future__ import annotations

import argparse
import os

from benchmarks import common


def main(argv=None) -> dict[str, float | None]:
  common.prepare_process()  # before torch is imported
  from benchmarks import sampler, train_step

  p = argparse.ArgumentParser(description='sampler + train-step throughput, ours vs PyTorch')
  p.add_argument('--quick', action='store_true', help='tiny sizes (seconds)')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--no-torch', action='store_true')
  p.add_argument('--json-dir', default=None, help='write sampler.json and train_step.json here')
  args = p.parse_args(argv)
  common_args = [f'--repeats={args.repeats}'] + ['--quick'] * args.quick + ['--no-torch'] * args.no_torch
  json_arg = lambda name: [f'--json={os.path.join(args.json_dir, name)}'] if args.json_dir else []
  print('== sampler ==', flush=True)
  s = sampler.main(common_args + json_arg('sampler.json'))['summary']
  print('== train step ==', flush=True)
  t = train_step.main(common_args + json_arg('train_step.json'))['summary']
  values = {'sampler_vs_torch': s['sampler_vs_torch'], 'train_vs_torch': t['train_vs_torch'],
            'scan_vs_loop': s['scan_vs_loop'], 'matmul_frac': s['matmul_frac']}
  print(common.summary_line(values), flush=True)
  return values


if __name__ == '__main__':
  main()
