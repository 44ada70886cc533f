"""MM-WHS (multi-modality whole-heart segmentation): 3D cardiac MR and CT with seven substructures.

Files (found anywhere under `data.root`, e.g. in `mr_train/` and `ct_train/`):
  {mr,ct}_train_NNNN_image.nii.gz + {mr,ct}_train_NNNN_label.nii.gz
The `*_test_*` volumes of the challenge have no public labels and are ignored.

Classes (the paper's Table IV order): 0 background, 1 LV, 2 RV, 3 LA, 4 RA, 5 Myo, 6 Ao, 7 PA, from the raw
values 500 LV, 600 RV, 420 LA, 550 RA, 205 Myo, 820 Ao, 850 PA. A few released label files also contain the
value 421 in the left atrium (an annotation artefact of the LA label), so 421 is mapped to LA too.

Split: MR and CT come from different patients, so each modality is handled on its own. The source modality
(`data.source`, default 'mr') contributes every labelled volume (it is never evaluated); the target modality
(`data.target`, default 'ct') is split by subject 70/10/20 into target (training images; labels only for the
oracle strategies) / val / test. With source == target modality, the source is the training subjects only.
"""

from __future__ import annotations

import pathlib
import re

from diffuseg_jax.data import layouts, volumes
from diffuseg_jax.data.types import DomainData
from diffuseg_jax.errors import ConfigError, DataError

DATASET = 'MM-WHS'
CLASS_NAMES = ('background', 'LV', 'RV', 'LA', 'RA', 'Myo', 'Ao', 'PA')
LABEL_MAP = {0: 0, 500: 1, 600: 2, 420: 3, 421: 3, 550: 4, 205: 5, 820: 6, 850: 7}
MODALITIES = ('mr', 'ct')
EXPECTED = '{mr,ct}_train_NNNN_image.nii.gz with _label.nii.gz'

_FILE = re.compile(r'(?P<mod>mr|ct)_train_(?P<num>\d+)_(?P<kind>image|label)\.nii(?:\.gz)?', re.IGNORECASE)


def modality_name(value, field: str) -> str:
  name = str(value).lower()
  if name not in MODALITIES:
    raise ConfigError(f'config.{field}={value!r} is not an MM-WHS modality; use one of {MODALITIES}')
  return name


def modality_cases(root: pathlib.Path, modality: str) -> dict[str, volumes.CaseFiles]:
  """subject name ('ct_train_1001') -> CaseFiles, for one modality; every image needs its label."""
  files = layouts.index_files(root, _FILE, lambda m: (m['mod'].lower(), m['num'], m['kind'].lower()), DATASET)
  numbers = sorted({num for mod, num, _ in files if mod == modality}, key=int)
  if not numbers:
    raise DataError(f'{root}: no MM-WHS {modality} files found (expected {EXPECTED})')
  cases = {}
  for num in numbers:
    name = f'{modality}_train_{num}'
    image, label = files.get((modality, num, 'image')), files.get((modality, num, 'label'))
    if image is None:
      raise DataError(f'{label}: label without its image {name}_image.nii.gz under {root}')
    if label is None:
      raise DataError(f'{image}: no label {name}_label.nii.gz under {root} (every volume needs one)')
    cases[name] = volumes.CaseFiles(name=name, image_path=image, label_path=label)
  return cases


def load(data_config, seed: int) -> DomainData:
  root = layouts.require_root(data_config.root, 'data.root', DATASET)
  source_mod = modality_name(data_config.source or 'mr', 'data.source')
  target_mod = modality_name(data_config.target or 'ct', 'data.target')
  target_cases = modality_cases(root, target_mod)
  parts = layouts.split_subjects(list(target_cases), data_config, seed)
  parts = {k: [target_cases[s] for s in layouts.cap(v, data_config.max_cases)] for k, v in parts.items()}
  for name in ('train', 'test'):
    layouts.require_cases(parts[name], f'{target_mod} {name} subjects', root, EXPECTED)
  if source_mod == target_mod:
    source = parts['train']
  else:
    source = layouts.cap(modality_cases(root, source_mod).values(), data_config.max_cases)
  return layouts.medical_domain(source=source, target=parts['train'], val=parts['val'], test=parts['test'],
                                data_config=data_config, label_map=LABEL_MAP, class_names=CLASS_NAMES)
