"""Finding a public dataset's files under a user's root, and pairing a source dataset with a target one.

Public releases of the same dataset differ in folder structure (`c0t2lge/` + `labels/`, `train/images/`,
`training/patient001/`, ...) but keep the file *names*, so the medical loaders find files by a name pattern
anywhere under the root (symlinked folders are followed, hidden files skipped) and never rely on folders.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Callable, Hashable, Iterable, Sequence

import nibabel as nib
import numpy as np

from diffuseg_jax.data import volumes
from diffuseg_jax.data.types import DomainData, Split
from diffuseg_jax.errors import ConfigError, DataError


def require_root(root, field: str, dataset: str) -> pathlib.Path:
  """`root` (a config value) as an existing directory, or a one-line error naming the config field."""
  if root is None or str(root) == '':
    raise ConfigError(f'config.{field} is not set: give the {dataset} dataset folder')
  path = pathlib.Path(os.path.expanduser(str(root)))
  if not path.is_dir():
    raise DataError(f'config.{field}={str(root)!r}: no such directory (expected the {dataset} folder)')
  return path


def walk_files(root: pathlib.Path) -> Iterable[pathlib.Path]:
  """Every non-hidden file under `root`, recursively, in a deterministic (sorted) order."""
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    for name in sorted(filenames):
      if not name.startswith('.'):
        yield pathlib.Path(dirpath) / name


def index_files(
    root: pathlib.Path,
    pattern: re.Pattern,
    key: Callable[[re.Match], Hashable],
    dataset: str,
) -> dict[Hashable, pathlib.Path]:
  """Files under `root` whose name fully matches `pattern`, keyed by `key(match)`.

  Two files with the same key (e.g. the same subject copied into two folders) are ambiguous and rejected,
  rather than silently picking one.
  """
  found: dict[Hashable, pathlib.Path] = {}
  for path in walk_files(root):
    match = pattern.fullmatch(path.name)
    if match is None:
      continue
    k = key(match)
    if k in found:
      raise DataError(f'{dataset}: {path} and {found[k]} are the same file of one case; '
                      f'keep only one under {root}')
    found[k] = path
  return found


def natural_key(name: str) -> tuple:
  """'subject10' after 'subject9': digits compare as numbers (stable, human order for case lists)."""
  return tuple(int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name))


def cap(items: Sequence, max_cases: int | None) -> list:
  """The first `max_cases` items (all when None): `data.max_cases` caps the subjects of each split."""
  items = list(items)
  return items if max_cases is None else items[: int(max_cases)]


def split_subjects(subjects: Sequence[str], data_config, seed: int) -> dict[str, list[str]]:
  """Seeded subject-level train/val/test split (`data.split_fractions`), each list in natural order."""
  parts = volumes.subject_split(sorted(subjects, key=natural_key), tuple(data_config.split_fractions), seed)
  return {name: sorted(parts[name], key=natural_key) for name in ('train', 'val', 'test')}


def medical_domain(
    *,
    source: Sequence[volumes.CaseFiles],
    target: Sequence[volumes.CaseFiles],
    val: Sequence[volumes.CaseFiles],
    test: Sequence[volumes.CaseFiles],
    data_config,
    label_map,
    class_names: tuple[str, ...],
    target_label_map=None,
) -> DomainData:
  """Builds the four splits of a volume dataset; case ids are unique across the whole `DomainData`.

  `label_map` maps raw label values of the source files to class indices; `target_label_map` (default: the
  same) those of the target/val/test files, for a source and target from different datasets. The case lists
  are already capped by SUBJECT (`data.max_cases`), so they are not capped again per volume here.
  """
  target_label_map = label_map if target_label_map is None else target_label_map
  channels = int(data_config.channels or 1)
  uncapped = data_config.copy_and_resolve_references()
  uncapped.max_cases = None
  offset = 0
  splits: dict[str, Split | None] = {}
  for name, cases, labels in (('source', source, label_map), ('target', target, target_label_map),
                              ('val', val, target_label_map), ('test', test, target_label_map)):
    if not cases:
      splits[name] = None
      continue
    splits[name] = volumes.build_split(
        list(cases), data_config=uncapped, label_map=labels, case_id_offset=offset, channels=channels,
        empty_slices=volumes.empty_slice_policy(data_config.empty_slices, name))
    offset += len(cases)
  return DomainData(source=splits['source'], target=splits['target'], test=splits['test'], val=splits['val'],
                    class_names=tuple(class_names), spacing_unit='mm', image_format='nifti')


def check_through_plane(
    cases: Sequence[volumes.CaseFiles], data_config, dataset: str, ratio: float = 2.0) -> None:
  """Rejects slicing ACROSS the thick slices of a 2D-stack acquisition (e.g. short-axis cine, 8-10 mm).

  Reads headers only. A volume whose thickest voxel axis is `ratio` times coarser than its finest must be
  sliced along that axis in the canonical orientation; otherwise every 2D slice would mix ~10 anatomical
  slices and be stretched. The error names the axis to use (`data.slice_axis`).
  """
  axis = int(data_config.slice_axis)
  for case in cases:
    try:
      img = nib.load(str(case.image_path))
      zooms = np.asarray(img.header.get_zooms()[:3], np.float64)
      ornt = nib.io_orientation(img.affine)
    except Exception as e:  # nibabel raises many types for a corrupt file
      raise DataError(f'{case.image_path}: cannot read the NIfTI header ({type(e).__name__}: {e})') from None
    if zooms.size < 3 or zooms.min() <= 0 or zooms.max() < ratio * zooms.min():
      continue
    canonical = np.empty(3)
    canonical[ornt[:3, 0].astype(int)] = zooms
    thick = int(np.argmax(canonical))
    if thick != axis:
      raise DataError(
          f'{case.image_path}: {dataset} slices are {canonical[thick]:g} mm thick along canonical axis '
          f'{thick}, but config.data.slice_axis={axis} cuts across them; '
          f'set --config.data.slice_axis={thick}')


def require_cases(cases: Sequence, what: str, root: pathlib.Path, expected: str) -> None:
  """A one-line DataError when a split came out empty (too few subjects for `data.split_fractions`)."""
  if not cases:
    raise DataError(f'{root}: no {what} cases (expected {expected}); add cases or change '
                    'data.split_fractions')
