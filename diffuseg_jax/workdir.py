"""What a workdir keeps: every unit fingerprint with its size and how its config differs from the current
run's, and removal of the ones you name. Nothing else ever deletes a unit folder.

  python -m diffuseg_jax.workdir runs/mnist_m                 list
  python -m diffuseg_jax.workdir runs/mnist_m --remove 3f2a9c01be77 [more fingerprints or unit/fingerprint]

"Current" units are those of the last run (metrics.json["fingerprints"]); removing one makes the next run
of that config compute it again.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from diffuseg_jax import units
from diffuseg_jax.run_identity import differences


def human_size(n: int) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if n < 1024 or unit == 'GiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  return f'{n:.1f} GiB'


def current_fingerprints(workdir: str) -> dict[str, str]:
  return (units.read_json(os.path.join(workdir, 'metrics.json')) or {}).get('fingerprints', {})


def listing(workdir: str) -> list[str]:
  """One line per kept unit fingerprint: unit, fingerprint, size, state, and its differences from the
  current run's fingerprint of the same unit."""
  current = current_fingerprints(workdir)
  lines = []
  for unit, fp, path in units.all_units(workdir):
    state = 'complete' if units.completion(path).complete else 'partial'
    if current.get(unit) == fp:
      note = 'current'
    elif unit in current:
      here = (units.read_json(os.path.join(path, 'identity.json')) or {}).get('fields', {})
      cur = (units.read_json(os.path.join(units.unit_dir(workdir, unit, current[unit]), 'identity.json'))
             or {}).get('fields', {})
      diff = differences(cur, here)
      note = 'vs current: ' + ('; '.join(diff) if diff else 'same fields, other upstream units')
    else:
      note = 'not in the current run'
    lines.append(f'{unit:28s} {fp}  {human_size(units.folder_size(path)):>10s}  {state:8s}  {note}')
  return lines


def remove(workdir: str, names: list[str]) -> list[str]:
  """Removes the unit folders named by fingerprint (every unit with it) or unit/fingerprint; returns them."""
  kept = units.all_units(workdir)
  removed = []
  for name in names:
    unit, _, fp = name.rpartition('/') if '/' in name else ('', '', name)
    matches = [(u, f, p) for u, f, p in kept if f == fp and (not unit or u == unit)]
    if not matches:
      raise SystemExit(f'error: no unit folder with fingerprint {name!r} in {workdir} (list them without --remove)')
    for u, f, p in matches:
      shutil.rmtree(p)
      removed.append(f'{u}/{f}')
  return removed


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m diffuseg_jax.workdir', description=__doc__.splitlines()[0])
  parser.add_argument('workdir')
  parser.add_argument('--remove', nargs='+', metavar='FINGERPRINT', default=None,
                      help='fingerprints (or unit/fingerprint) to delete')
  args = parser.parse_args(argv)
  workdir = os.path.expanduser(args.workdir)
  if not os.path.isdir(os.path.join(workdir, units.UNITS_DIR)):
    print(f'error: {workdir} holds no units/ folder (not a workdir of this version)', file=sys.stderr)
    return 2
  if args.remove:
    current = set(current_fingerprints(workdir).values())
    for name in remove(workdir, args.remove):
      note = ' (of the current run: its next run computes it again)' if name.split('/')[-1] in current else ''
      print(f'removed {name}{note}')
    return 0
  lines = listing(workdir)
  print('\n'.join(lines) if lines else 'no units kept')
  return 0


if __name__ == '__main__':
  sys.exit(main())
