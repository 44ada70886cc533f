"""A workdir's units on disk: `<workdir>/units/<unit>/<fingerprint>/` (run_identity.py names them).

Each unit folder holds
  identity.json   the fields and upstream fingerprints it was computed from (for listings and plans)
  results.json    the unit's results (diagnostics, scores), when it has any
  complete.json   written last, once every output is in place: the unit is reused only with it; for a
                  training unit it records the final checkpoint's step and a size + CRC-32 of each of its
                  files, so a damaged final checkpoint is found before anything reads it
  checkpoints/, metrics.jsonl, events/, synthetic/, predictions/, figures/   the unit's outputs
Nothing here deletes a unit folder except `remove` (the `diffuseg_jax.workdir remove` command).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
import zlib
from typing import Any

from diffuseg_jax import atomic
from diffuseg_jax.run_identity import Identity, differences

UNITS_DIR = 'units'


def unit_dir(workdir: str, unit: str, fingerprint: str) -> str:
  return os.path.join(workdir, UNITS_DIR, *unit.split('/'), fingerprint)


def read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write_identity(path: str, identity: Identity) -> None:
  if not os.path.exists(os.path.join(path, 'identity.json')):
    os.makedirs(path, exist_ok=True)
    atomic.write_json(os.path.join(path, 'identity.json'), identity.to_json())


# --- completion ------------------------------------------------------------------------------------------

def file_manifest(directory: str) -> dict[str, list[int]]:
  """{relative path: [size, crc32]} of every file below `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in sorted(files):
      path = os.path.join(root, name)
      crc = 0
      with open(path, 'rb') as f:
        while chunk := f.read(1 << 22):
          crc = zlib.crc32(chunk, crc)
      out[os.path.relpath(path, directory)] = [os.path.getsize(path), crc]
  return dict(sorted(out.items()))


def mark_complete(path: str, checkpoint_step: int | None = None) -> None:
  """Writes complete.json (last): with `checkpoint_step`, the manifest of checkpoints/<step>/."""
  record: dict[str, Any] = {'finished_at': time.strftime('%Y-%m-%d %H:%M:%S')}
  if checkpoint_step is not None:
    record['checkpoint'] = {'step': int(checkpoint_step),
                            'files': file_manifest(os.path.join(path, 'checkpoints', str(checkpoint_step)))}
  atomic.write_json(os.path.join(path, 'complete.json'), record)


@dataclasses.dataclass(frozen=True)
class Completion:
  complete: bool
  damaged: str | None = None  # why a unit marked complete cannot be used (its final checkpoint changed)
  step: int | None = None  # the final checkpoint step of a complete (or damaged) training unit


def completion(path: str) -> Completion:
  """Whether the unit folder `path` is complete, verifying its final checkpoint's files."""
  record = read_json(os.path.join(path, 'complete.json'))
  if record is None:
    return Completion(False)
  ckpt = record.get('checkpoint')
  if not ckpt:
    return Completion(True)
  step_dir = os.path.join(path, 'checkpoints', str(ckpt['step']))
  if not os.path.isdir(step_dir):
    return Completion(False, damaged=f'its final checkpoint {step_dir} is missing', step=ckpt['step'])
  expected = ckpt['files']
  found = file_manifest(step_dir)
  for name, (size, crc) in expected.items():
    if name not in found:
      return Completion(False, damaged=f'{os.path.join(step_dir, name)} is missing', step=ckpt['step'])
    if found[name] != [size, crc]:
      return Completion(False, damaged=f'{os.path.join(step_dir, name)} changed since it was written',
                        step=ckpt['step'])
  return Completion(True, step=ckpt['step'])


def set_aside_damaged(path: str, step: int) -> str:
  """Moves a damaged final checkpoint (and complete.json) out of the way, kept for inspection; returns where."""
  src = os.path.join(path, 'checkpoints', str(step))
  dst = os.path.join(path, 'checkpoints.unreadable', f'{step}-{int(time.time())}')
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  if os.path.exists(src):
    shutil.move(src, dst)
  marker = os.path.join(path, 'complete.json')
  if os.path.exists(marker):
    os.remove(marker)
  return dst


# --- plans and listings ----------------------------------------------------------------------------------

def kept_fingerprints(workdir: str, unit: str) -> list[str]:
  """The fingerprints of `unit` kept in the workdir, oldest first (by identity.json time)."""
  base = os.path.join(workdir, UNITS_DIR, *unit.split('/'))
  if not os.path.isdir(base):
    return []
  fps = [fp for fp in os.listdir(base) if os.path.isfile(os.path.join(base, fp, 'identity.json'))]
  return sorted(fps, key=lambda fp: os.path.getmtime(os.path.join(base, fp, 'identity.json')))


def has_partial_work(path: str) -> bool:
  ckpt = os.path.join(path, 'checkpoints')
  if os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt)):
    return True
  synthetic = os.path.join(path, 'synthetic')
  return os.path.isdir(synthetic) and any(n.startswith('shard_') for n in os.listdir(synthetic))


def plan_line(workdir: str, identity: Identity) -> tuple[str, str]:
  """(action, why) for one unit of this run: reuse | resume | redo | run."""
  path = unit_dir(workdir, identity.unit, identity.fingerprint)
  state = completion(path)
  if state.complete:
    return 'reuse', f'complete in {identity.fingerprint}'
  if state.damaged:
    return 'redo', f'{state.damaged}'
  if has_partial_work(path):
    return 'resume', f'unfinished work in {identity.fingerprint}'
  others = [fp for fp in kept_fingerprints(workdir, identity.unit) if fp != identity.fingerprint]
  if not others:
    return 'run', 'new'
  previous = read_json(os.path.join(unit_dir(workdir, identity.unit, others[-1]), 'identity.json')) or {}
  changed = differences(previous.get('fields', {}), identity.fields)
  upstream = [u for u, fp in identity.upstream.items() if previous.get('upstream', {}).get(u) != fp]
  why = changed + [f'{u} changed' for u in upstream if not changed or u not in ' '.join(changed)]
  return 'run', f'differs from {others[-1]}: ' + ('; '.join(why) if why else 'format changed')


def folder_size(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      with contextlib.suppress(OSError):  # a temporary file that a running job has just renamed
        total += os.path.getsize(os.path.join(root, name))
  return total


def all_units(workdir: str) -> list[tuple[str, str, str]]:
  """(unit, fingerprint, folder) of every unit folder kept in the workdir."""
  out = []
  root = os.path.join(workdir, UNITS_DIR)
  for dirpath, _, files in os.walk(root):
    if 'identity.json' in files:
      record = read_json(os.path.join(dirpath, 'identity.json')) or {}
      rel = os.path.relpath(dirpath, root).split(os.sep)
      out.append((record.get('unit', '/'.join(rel[:-1])), rel[-1], dirpath))
  return sorted(out)
