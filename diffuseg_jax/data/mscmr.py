"""MSCMRseg (MICCAI 2019 multi-sequence cardiac MR segmentation): bSSFP (C0), T2 and LGE (DE) volumes.

Files (found by name anywhere under `data.root`, since releases differ in folders, e.g. `c0t2lge/` +
`labels/`, or `train/images/` + `train/labels/`):
  subjectN_{C0,T2,DE}.nii.gz          image (`LGE` is accepted in file names as a spelling of DE)
  subjectN_{C0,T2,DE}_manual.nii.gz   its manual label (scribble files and others are ignored)

Classes, in this fixed order (shared with ACDC so that ACDC -> MSCMR uses one class list):
  0 background, 1 LV (left-ventricle blood pool), 2 RV (right-ventricle blood pool), 3 Myo (LV myocardium).
Label values, detected per file from its value set:
  challenge release   200 = Myo, 500 = LV, 600 = RV;
  consecutive release 1 = RV, 2 = Myo, 3 = LV. This is the ACDC convention, which the public pre-processed
    MSCMR releases with values 1/2/3 (e.g. the scribble-supervision release) follow; a file mixing the two
    value sets, or with any other value, is rejected.

Split (seeded, `data.split_fractions`, default 70/10/20) is by SUBJECT:
  source = `data.source` sequence (default C0) of the train subjects, with labels;
  target = `data.target` sequence (default DE) of the same train subjects (labels kept for the oracle
           strategies only);
  val / test = the target sequence of the val / test subjects.
So a subject's C0 and DE volumes are only ever used together inside the training subjects: no test
subject's anatomy is seen during training, in either sequence.
"""

from __future__ import annotations

import pathlib
import re

import nibabel as nib
import numpy as np

from diffuseg_jax.data import layouts, volumes
from diffuseg_jax.data.types import DomainData
from diffuseg_jax.errors import ConfigError, DataError

DATASET = 'MSCMRseg'
CLASS_NAMES = ('background', 'LV', 'RV', 'Myo')
SEQUENCES = ('C0', 'T2', 'DE')
SEQUENCE_ALIASES = {'LGE': 'DE', 'BSSFP': 'C0'}
CHALLENGE_LABELS = {0: 0, 500: 1, 600: 2, 200: 3}
CONSECUTIVE_LABELS = {0: 0, 3: 1, 1: 2, 2: 3}
# The two value sets are disjoint, so one map serves both releases once each file's set is checked.
LABEL_MAP = {**CHALLENGE_LABELS, **CONSECUTIVE_LABELS}
EXPECTED = 'subjectN_{C0,T2,DE}.nii.gz with subjectN_{C0,T2,DE}_manual.nii.gz labels'

_FILE = re.compile(r'subject(?P<num>\d+)_(?P<seq>C0|T2|DE|LGE)(?P<manual>_manual)?\.nii(?:\.gz)?',
                   re.IGNORECASE)


def sequence_name(value, field: str) -> str:
  """A config value ('C0', 'de', 'LGE', ...) as one of SEQUENCES."""
  name = str(value).upper()
  name = SEQUENCE_ALIASES.get(name, name)
  if name not in SEQUENCES:
    raise ConfigError(f'config.{field}={value!r} is not an MSCMRseg sequence; use one of {SEQUENCES}')
  return name


def label_release(path: pathlib.Path) -> str:
  """'challenge' (200/500/600) or 'consecutive' (1/2/3), from the set of values in one label file."""
  try:
    values = set(np.unique(np.asarray(nib.load(str(path)).dataobj)).tolist())
  except Exception as e:  # nibabel raises many types for a corrupt file
    raise DataError(f'{path}: cannot read the label file ({type(e).__name__}: {e})') from None
  values.discard(0)
  if values <= {200, 500, 600}:
    return 'challenge'
  if values <= {1, 2, 3}:
    return 'consecutive'
  raise DataError(f'{path}: label values {sorted(values)} are neither MSCMRseg 200/500/600 nor 1/2/3')


def sequence_cases(root: pathlib.Path, sequences: tuple[str, ...]) -> dict[str, dict[str, volumes.CaseFiles]]:
  """subject name -> sequence -> CaseFiles, for every subject with any file of `sequences` under root.

  Every such subject must have the image and the label of each requested sequence.
  """
  files = layouts.index_files(
      root, _FILE,
      lambda m: (f'subject{int(m["num"])}', sequence_name(m['seq'], 'file'), bool(m['manual'])), DATASET)
  subjects = sorted({subject for subject, seq, _ in files if seq in sequences}, key=layouts.natural_key)
  if not subjects:
    raise DataError(f'{root}: no MSCMRseg {"/".join(sequences)} files found (expected {EXPECTED})')
  cases: dict[str, dict[str, volumes.CaseFiles]] = {}
  for subject in subjects:
    cases[subject] = {}
    for seq in sequences:
      image, label = files.get((subject, seq, False)), files.get((subject, seq, True))
      if image is None and label is None:
        raise DataError(f'{root}: {subject} has no {seq} volume (expected {subject}_{seq}.nii.gz + label)')
      if image is None:
        raise DataError(f'{label}: label without its image {subject}_{seq}.nii.gz under {root}')
      if label is None:
        raise DataError(f'{image}: no label {subject}_{seq}_manual.nii.gz under {root}')
      cases[subject][seq] = volumes.CaseFiles(name=f'{subject}_{seq}', image_path=image, label_path=label)
  return cases


def check_labels(cases: list[volumes.CaseFiles]) -> dict[int, int]:
  """Detects each label file's release (raises DataError on an unknown or mixed value set) -> the label map.

  The map is always LABEL_MAP's union (the value sets are disjoint), ordered with the release found in the
  files first: predictions are written back in that release's values (`volumes.raw_label_values`). A file
  without foreground reads as 'challenge', so any 'consecutive' file decides.
  """
  releases = {label_release(pathlib.Path(case.label_path)) for case in cases}
  if 'consecutive' in releases:
    return {**CONSECUTIVE_LABELS, **CHALLENGE_LABELS}
  return {**CHALLENGE_LABELS, **CONSECUTIVE_LABELS}


def target_splits(
    root: pathlib.Path, sequence: str, data_config, seed: int) -> dict[str, list[volumes.CaseFiles]]:
  """One sequence's volumes split by subject into train/val/test (also the target of ACDC -> MSCMR)."""
  cases = sequence_cases(root, (sequence,))
  parts = layouts.split_subjects(list(cases), data_config, seed)
  return {k: [cases[s][sequence] for s in layouts.cap(v, data_config.max_cases)] for k, v in parts.items()}


def load(data_config, seed: int) -> DomainData:
  root = layouts.require_root(data_config.root, 'data.root', DATASET)
  source_seq = sequence_name(data_config.source or 'C0', 'data.source')
  target_seq = sequence_name(data_config.target or 'DE', 'data.target')
  cases = sequence_cases(root, tuple(dict.fromkeys((source_seq, target_seq))))
  parts = layouts.split_subjects(list(cases), data_config, seed)
  parts = {k: layouts.cap(v, data_config.max_cases) for k, v in parts.items()}
  for name in ('train', 'test'):
    layouts.require_cases(parts[name], f'{name} subjects', root, EXPECTED)
  source = [cases[s][source_seq] for s in parts['train']]
  target = [cases[s][target_seq] for s in parts['train']]
  val = [cases[s][target_seq] for s in parts['val']]
  test = [cases[s][target_seq] for s in parts['test']]
  label_map = check_labels(source + target + val + test)
  layouts.check_through_plane(source + target + val + test, data_config, DATASET)
  return layouts.medical_domain(source=source, target=target, val=val, test=test, data_config=data_config,
                                label_map=label_map, class_names=CLASS_NAMES)
