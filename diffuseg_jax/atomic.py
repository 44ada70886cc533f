"""Atomic file writes: write a temp file in the destination folder, fsync, then `os.replace`.

A reader (or a rerun after SIGKILL) therefore sees either the old file or the complete new one, never a
half-written one. Temp files are named `.<name>.tmp-<pid>` and are ignored/cleaned by readers.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temp path next to `path`; on success it is renamed onto `path`, on error removed."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  base = os.path.basename(path)
  fd, tmp = tempfile.mkstemp(prefix=f'.{base}.tmp-', dir=folder, suffix=_suffix(base))
  os.close(fd)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual permissions
  try:
    yield tmp
    with open(tmp, 'rb') as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def _suffix(name: str) -> str:
  # Keep the extension so that libraries choosing a format by suffix (PIL, nibabel) still work.
  for ext in ('.nii.gz', '.tar.gz'):
    if name.endswith(ext):
      return ext
  return os.path.splitext(name)[1]


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, 'w') as f:
    f.write(text)


def write_json(path: str, obj) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_default) + '\n')


def _default(o):
  import numpy as np

  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f'not JSON serialisable: {type(o).__name__}')
