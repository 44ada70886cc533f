"""ACDC (Automated Cardiac Diagnosis Challenge) cine-MR volumes, alone or as the source for MSCMRseg LGE.

Files (anywhere under `data.root`, e.g. in `training/` and `testing/`, or `database/{training,testing}`):
  patientNNN/Info.cfg                   lines `ED: 1` and `ES: 12` name the two labelled frames
  patientNNN/patientNNN_frameFF.nii.gz  one cardiac phase (3D)
  patientNNN/patientNNN_frameFF_gt.nii.gz
  patientNNN/patientNNN_4d.nii.gz       the whole cine sequence: ignored
Each patient gives two volumes (ED and ES); a patient folder without Info.cfg uses the frames that have a
`_gt` file. ACDC labels 1 = RV, 2 = Myo, 3 = LV are mapped to the class list shared with MSCMRseg:
  0 background, 1 LV, 2 RV, 3 Myo   (raw 3 -> 1, 1 -> 2, 2 -> 3).

Two settings:
  * ACDC -> MSCMRseg (`data.target_root` = an MSCMRseg root, `data.target` = its sequence, e.g. 'DE'):
    source = every ACDC patient (the source domain is never evaluated, so none is held out);
    target / val / test = that MSCMRseg sequence split by subject, exactly as `mscmr.target_splits`.
  * ACDC alone (`data.target` None or 'acdc', no `data.target_root`): patients are split 70/10/20; source and
    target are both the training patients (a same-domain baseline), val/test the held-out patients. Both
    frames of a patient always fall in the same split.
"""

from __future__ import annotations

import pathlib
import re

from diffuseg_jax.data import layouts, mscmr, volumes
from diffuseg_jax.data.types import DomainData
from diffuseg_jax.errors import ConfigError, DataError

DATASET = 'ACDC'
CLASS_NAMES = mscmr.CLASS_NAMES
LABEL_MAP = {0: 0, 3: 1, 1: 2, 2: 3}
EXPECTED = 'patientNNN/patientNNN_frameFF.nii.gz with _gt.nii.gz labels and Info.cfg'

_FRAME = re.compile(r'(?P<patient>patient\d+)_frame(?P<frame>\d+)(?P<gt>_gt)?\.nii(?:\.gz)?', re.IGNORECASE)
_INFO_LINE = re.compile(r'^\s*(ED|ES)\s*:\s*(\d+)\s*$', re.IGNORECASE | re.MULTILINE)


def read_phases(path: pathlib.Path) -> tuple[int, ...]:
  """(ED frame, ES frame) from an Info.cfg (`ED: 1`, `ES: 12`; other lines ignored)."""
  found = {key.upper(): int(value) for key, value in _INFO_LINE.findall(path.read_text(errors='replace'))}
  if 'ED' not in found or 'ES' not in found:
    raise DataError(f'{path}: expected lines "ED: <frame>" and "ES: <frame>"')
  return tuple(dict.fromkeys((found['ED'], found['ES'])))


def patient_cases(root: pathlib.Path) -> dict[str, list[volumes.CaseFiles]]:
  """patient name -> its labelled frames (ED then ES) as CaseFiles."""
  frames = layouts.index_files(
      root, _FRAME, lambda m: (m['patient'].lower(), int(m['frame']), bool(m['gt'])), DATASET)
  infos = {p.parent.name.lower(): p for p in layouts.walk_files(root)
           if p.name.lower() == 'info.cfg' and p.parent.name.lower().startswith('patient')}
  patients = sorted({patient for patient, _, _ in frames}, key=layouts.natural_key)
  if not patients:
    raise DataError(f'{root}: no ACDC frame files found (expected {EXPECTED})')
  cases = {}
  for patient in patients:
    if patient in infos:
      phases = read_phases(infos[patient])
    else:
      phases = tuple(sorted(f for p, f, gt in frames if p == patient and gt))
      if not phases:
        raise DataError(f'{root}: {patient} has neither Info.cfg nor any _gt label (expected {EXPECTED})')
    cases[patient] = []
    for frame in phases:
      name = f'{patient}_frame{frame:02d}'
      image, label = frames.get((patient, frame, False)), frames.get((patient, frame, True))
      if image is None:
        raise DataError(f'{root}: {patient} has no {name}.nii.gz (frame {frame} of its Info.cfg)')
      if label is None:
        raise DataError(f'{image}: no label {name}_gt.nii.gz under {root}')
      cases[patient].append(volumes.CaseFiles(name=name, image_path=image, label_path=label))
  return cases


def load(data_config, seed: int) -> DomainData:
  root = layouts.require_root(data_config.root, 'data.root', DATASET)
  target = None if data_config.target is None else str(data_config.target)
  alone = target is None or target.lower() == 'acdc'
  if alone and data_config.target_root is not None:
    raise ConfigError('config.data.target_root is set but config.data.target is not: name the MSCMRseg '
                      'sequence (e.g. --config.data.target=DE)')
  if not alone and data_config.target_root is None:
    raise ConfigError(f'config.data.target={target!r} needs config.data.target_root (the MSCMRseg folder)')
  cases = patient_cases(root)
  if alone:
    parts = layouts.split_subjects(list(cases), data_config, seed)
    parts = {k: layouts.cap(v, data_config.max_cases) for k, v in parts.items()}
    for name in ('train', 'test'):
      layouts.require_cases(parts[name], f'{name} patients', root, EXPECTED)
    volumes_of = lambda names: [case for p in names for case in cases[p]]
    train = volumes_of(parts['train'])
    layouts.check_through_plane([c for v in cases.values() for c in v], data_config, DATASET)
    return layouts.medical_domain(source=train, target=train, val=volumes_of(parts['val']),
                                  test=volumes_of(parts['test']), data_config=data_config,
                                  label_map=LABEL_MAP, class_names=CLASS_NAMES)
  target_root = layouts.require_root(data_config.target_root, 'data.target_root', mscmr.DATASET)
  sequence = mscmr.sequence_name(target, 'data.target')
  parts = mscmr.target_splits(target_root, sequence, data_config, seed)
  for name in ('train', 'test'):
    layouts.require_cases(parts[name], f'MSCMRseg {name} subjects', target_root, mscmr.EXPECTED)
  target_label_map = mscmr.check_labels(parts['train'] + parts['val'] + parts['test'])
  source = [case for p in layouts.cap(list(cases), data_config.max_cases) for case in cases[p]]
  layouts.check_through_plane(source, data_config, DATASET)
  layouts.check_through_plane(parts['train'] + parts['val'] + parts['test'], data_config, mscmr.DATASET)
  return layouts.medical_domain(source=source, target=parts['train'], val=parts['val'], test=parts['test'],
                                data_config=data_config, label_map=LABEL_MAP, class_names=CLASS_NAMES,
                                target_label_map=target_label_map)
