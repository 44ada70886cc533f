"""The generic folder dataset: anyone's own source/target data, as files in a fixed layout.

  <root>/source/images/   source-domain images            (required)
  <root>/source/labels/   their label maps                (required)
  <root>/target/images/   target-domain training images   (required, unlabelled for DiffuSeg)
  <root>/target/labels/   optional; used ONLY by the oracle strategies `self`/`semi`
  <root>/test/images/     target-domain test images       (required)
  <root>/test/labels/     their label maps                (required)
  <root>/val/{images,labels}/   optional labelled target validation set
  <root>/labels.json      optional {"0": "background", "1": "CSF", ...}

Files: PNG/JPG/TIF/GIF/BMP or NIfTI (.nii/.nii.gz, 2D or 3D). A label has the same name as its image up to
the extension (`case1.png` <-> `case1.png`/`case1.tif`; `case1.nii.gz` <-> `case1.nii.gz`); labels without
an image are ignored, files of other types and hidden files are ignored. Images of different sizes are
all resized to `data.image_size`; 3D volumes are sliced along `data.slice_axis`.

Classes: with labels.json, the class indices follow the sorted raw values and value 0 must be present (it
is the background, index 0); a label value not in labels.json is an error. Without labels.json the classes
are the sorted union of the values found in the source and test (and val) labels, always including 0 as
background, named `label_<value>`; a JPEG label file with more than two values, or any label file with
more than `volumes.MAX_MASK_VALUES`, is an error (lossy or interpolated, not class values). Masks must use
the same values in every split (`preflight.check_data` stops a run whose source and test labels share no
foreground value).

Channels: all splits are brought to `data.channels`, or to the largest channel count found
(`transforms.harmonise_channels`: gray -> RGB by replication, RGB -> gray by luma).
Units: spacing in mm when the test images are NIfTI (else pixels); synthetic pairs written as NIfTI when
the target images are NIfTI (else PNG).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from diffuseg_jax.data import imageio, nifti, volumes
from diffuseg_jax.data.types import DomainData, Split
from diffuseg_jax.errors import ConfigError, DataError


def _stem(path: pathlib.Path) -> str:
  return nifti.nifti_stem(path) if nifti.is_nifti(path) else path.stem


def list_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """Supported image files in `folder`: stem -> path, sorted by stem. DataError if missing or empty."""
  if not folder.is_dir():
    raise DataError(f'{folder}: folder not found (see the folder layout in diffuseg_jax/data/folder.py)')
  files: dict[str, pathlib.Path] = {}
  for path in sorted(folder.iterdir()):
    if path.name.startswith('.') or not path.is_file():
      continue
    if not (nifti.is_nifti(path) or imageio.is_raster(path)):
      continue
    stem = _stem(path)
    if stem in files:
      raise DataError(f'{folder}: two files with the same name {stem!r}: {files[stem].name}, {path.name}')
    files[stem] = path
  if not files:
    raise DataError(f'{folder}: no image files (.png/.jpg/.tif/.gif/.bmp/.nii/.nii.gz)')
  return dict(sorted(files.items()))


def split_cases(split_dir: pathlib.Path, labels_required: bool) -> list[volumes.CaseFiles]:
  """`split_dir/images` (+ `split_dir/labels`) -> one CaseFiles per image; every image needs its label."""
  images = list_files(split_dir / 'images')
  label_dir = split_dir / 'labels'
  if not label_dir.is_dir():
    if labels_required:
      raise DataError(f'{label_dir}: folder not found (each image of {split_dir.name}/ needs a label map)')
    return [volumes.CaseFiles(stem, path) for stem, path in images.items()]
  labels = list_files(label_dir)
  for stem, path in images.items():
    if stem not in labels:
      raise DataError(f'{path}: no label file named {stem}.* in {label_dir}')
  return [volumes.CaseFiles(stem, path, labels[stem]) for stem, path in images.items()]


def read_labels_json(path: pathlib.Path) -> dict[int, str] | None:
  """labels.json -> {raw value: class name} sorted by value, or None if the file does not exist."""
  if not path.exists():
    return None
  try:
    raw = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise DataError(f'{path}: not valid JSON ({e})') from None
  if not isinstance(raw, dict) or not raw:
    raise DataError(f'{path}: expected an object mapping label values to names, e.g. {{"0": "background"}}')
  classes = {}
  for key, name in raw.items():
    try:
      value = int(key)
    except ValueError:
      raise DataError(f'{path}: key {key!r} is not an integer label value') from None
    if value < 0:
      raise DataError(f'{path}: label value {value} is negative; use 0 for background and positive values')
    if not isinstance(name, str) or not name:
      raise DataError(f'{path}: class name for value {value} must be a non-empty string')
    classes[value] = name
  if 0 not in classes:
    raise DataError(f'{path}: value 0 (background, class index 0) is missing; add "0": "background"')
  if len(set(classes.values())) != len(classes):
    raise DataError(f'{path}: class names must be unique')
  return dict(sorted(classes.items()))


def _map_split(split: Split, value_to_index: dict[int, int]) -> Split:
  """Raw label values -> class indices, case by case so that an error names the label file; each case
  records the raw values (`extra['label_values']`) so predictions are written back in them."""
  labels = np.empty_like(split.labels)
  raw_values = volumes.raw_label_values(value_to_index)
  infos = {}
  for case_id, info in split.volumes.items():
    rows = split.case_ids == case_id
    where = info.extra.get('label_path') or info.name
    labels[rows] = volumes.map_labels(split.labels[rows], value_to_index, where)
    found = {raw: value_to_index[raw] for raw in info.extra.get('raw_values_found') or {}}
    infos[case_id] = dataclasses.replace(info, extra=dict(info.extra, label_values=raw_values, raw_values_found=found))
  return dataclasses.replace(split, labels=labels, volumes=infos)


def load(data_config, seed: int) -> DomainData:
  """`data.root` in the folder layout -> DomainData (see the module docstring). `seed` is unused: the
  splits are the user's folders."""
  del seed
  if data_config.root is None:
    raise ConfigError('config.data.root is required for data.name=folder (--config.data.root=PATH)')
  root = pathlib.Path(data_config.root).expanduser()
  if not root.is_dir():
    raise DataError(f'{root}: data root folder not found')
  if data_config.channels not in (None, 1, 3):
    raise ConfigError(f'config.data.channels={data_config.channels!r} must be None, 1 or 3')
  classes = read_labels_json(root / 'labels.json')
  value_to_index = None if classes is None else {v: i for i, v in enumerate(classes)}

  cases = dict(
      source=split_cases(root / 'source', labels_required=True),
      target=split_cases(root / 'target', labels_required=False),
      test=split_cases(root / 'test', labels_required=True),
  )
  if (root / 'val').is_dir():
    cases['val'] = split_cases(root / 'val', labels_required=True)

  splits, offset = {}, 0
  for name, split_files in cases.items():
    splits[name] = volumes.build_split(
        split_files, data_config=data_config, label_map=value_to_index, case_id_offset=offset,
        empty_slices=volumes.empty_slice_policy(data_config.empty_slices, name),
    )
    offset += len(split_files)

  if classes is None:
    seen = {0}
    for name in ('source', 'test', 'val'):
      if name in splits:
        seen.update(int(v) for v in np.unique(splits[name].labels))
    values = sorted(seen)
    if values[0] < 0:
      raise DataError(f'{root}: negative label values {[v for v in values if v < 0]}; use 0 for background')
    classes = {v: 'background' if v == 0 else f'label_{v}' for v in values}
    value_to_index = {v: i for i, v in enumerate(values)}
    splits = {k: s if s.labels is None else _map_split(s, value_to_index) for k, s in splits.items()}

  channels = data_config.channels or max(s.images.shape[-1] for s in splits.values())
  splits = {k: volumes.harmonise_split(s, channels) for k, s in splits.items()}
  test_nifti = all(nifti.is_nifti(c.image_path) for c in cases['test'])
  target_nifti = all(nifti.is_nifti(c.image_path) for c in cases['target'])
  return DomainData(
      source=splits['source'],
      target=splits['target'],
      test=splits['test'],
      val=splits.get('val'),
      class_names=tuple(classes.values()),
      spacing_unit='mm' if test_nifti else 'px',
      image_format='nifti' if target_nifti else 'png',
  )
