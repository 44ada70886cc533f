"""Retinal vessel datasets (DRIVE, IOSTAR): RGB fundus / SLO images, binary vessel masks, field-of-view masks.

Layouts (files are found anywhere under the dataset root; the role of a file comes from its name, or, where
the name does not say, from its folder):
  DRIVE   {training,test}/images/21_training.tif      image        (number = the leading digits)
          {training,test}/1st_manual/21_manual1.gif    vessel label (2nd_manual / *_manual2: ignored)
          {training,test}/mask/21_training_mask.gif    field of view
  IOSTAR  image/STAR 01_OSC.jpg                        image        (number = the digits after 'STAR')
          GT/STAR 01_OSC_GT.png                        vessel label (also: same stem as the image in GT/)
          mask/STAR 01_OSC_Mask.png                    field of view
          AV_GT/ (artery/vein labels) and *_AV files are ignored.
Image, label and FOV of one case share the case NUMBER, which is what pairs them (release variants change
the stem's suffixes, spaces and extensions, never the number).

Masks: vessel = value > 127 for 8-bit masks (0/255, robust to JPEG noise), value > 0 for 0/1 masks; the same
rule gives the FOV. A case without an FOV file gets a full-image FOV. The FOV is stored at model resolution
(bool [H, W]) in `Split.volumes[case_id].extra['fov']`, so evaluation can ignore pixels outside it. Images
are resized to image_size x image_size (bilinear, anti-aliased; vessel labels nearest) without cropping;
`spacing` is the size of a resized pixel in ORIGINAL pixels ('px' unit), so HD is in original pixels.

Domains: `data.source` names the dataset at `data.root` (default 'drive'), `data.target` the one at
`data.target_root` (default 'iostar'). The source contributes every labelled image; the target is split by
image 70/10/20 into target (training images; labels only for the oracle strategies) / val / test. With no
`data.target_root` and the target equal to the source, the one dataset is split and source = target = train.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import numpy as np

from diffuseg_jax.data import imageio, layouts, transforms, volumes
from diffuseg_jax.data.types import DomainData, Split, VolumeInfo
from diffuseg_jax.errors import ConfigError, DataError

CLASS_NAMES = ('background', 'vessel')
LABEL_FOLDERS = ('gt', '1st_manual', 'manual', 'label', 'labels', 'annotation', 'annotations', 'vessel',
                 'vessels')
FOV_FOLDERS = ('mask', 'masks', 'fov')


@dataclasses.dataclass(frozen=True)
class RetinaLayout:
  """How one dataset names its files: `number` finds the case number in a stem; suffix tokens (the part
  after the last '_', lower case) mark labels / FOV masks / files to skip; `skip_folders` are ignored."""

  name: str
  number: re.Pattern
  label_tokens: tuple[str, ...]
  fov_tokens: tuple[str, ...]
  skip_tokens: tuple[str, ...]
  skip_folders: re.Pattern
  expected: str


LAYOUTS = {
    'drive': RetinaLayout(
        name='DRIVE', number=re.compile(r'^(\d+)_'), label_tokens=('manual1',), fov_tokens=('mask',),
        skip_tokens=('manual2',), skip_folders=re.compile(r'2nd_manual', re.IGNORECASE),
        expected='training/images/21_training.tif, training/1st_manual/21_manual1.gif, '
                 'training/mask/21_training_mask.gif (and test/ likewise)'),
    'iostar': RetinaLayout(
        name='IOSTAR', number=re.compile(r'STAR[ _-]?(\d+)', re.IGNORECASE), label_tokens=('gt',),
        fov_tokens=('mask',), skip_tokens=('av',),
        skip_folders=re.compile(r'(^|[^a-z])av([^a-z]|$)', re.IGNORECASE),
        expected='image/STAR 01_OSC.jpg, GT/STAR 01_OSC_GT.png, mask/STAR 01_OSC_Mask.png'),
}


@dataclasses.dataclass(frozen=True)
class RetinaCase:
  name: str
  image_path: pathlib.Path
  label_path: pathlib.Path
  fov_path: pathlib.Path | None


def dataset_name(value, field: str) -> str:
  name = str(value).lower()
  if name not in LAYOUTS:
    raise ConfigError(f'config.{field}={value!r} is not a retina dataset; use one of {tuple(LAYOUTS)}')
  return name


def file_role(path: pathlib.Path, layout: RetinaLayout) -> tuple[str, int] | None:
  """(role in {'image', 'label', 'fov'}, case number) of one file, or None if it is not part of the layout."""
  if not imageio.is_raster(path) or layout.skip_folders.search(path.parent.name):
    return None
  match = layout.number.search(path.stem)
  if match is None:
    return None
  token = path.stem.rsplit('_', 1)[-1].lower() if '_' in path.stem else ''
  if token in layout.skip_tokens:
    return None
  folder = path.parent.name.lower()
  if token in layout.label_tokens:
    role = 'label'
  elif token in layout.fov_tokens:
    role = 'fov'
  elif folder in LABEL_FOLDERS:
    role = 'label'
  elif folder in FOV_FOLDERS:
    role = 'fov'
  else:
    role = 'image'
  return role, int(match.group(1))


def find_cases(root: pathlib.Path, layout: RetinaLayout) -> list[RetinaCase]:
  """Every image under root with its vessel label (required) and FOV mask (optional), by case number."""
  files: dict[str, dict[int, pathlib.Path]] = {'image': {}, 'label': {}, 'fov': {}}
  for path in layouts.walk_files(root):
    role = file_role(path, layout)
    if role is None:
      continue
    kind, number = role
    if number in files[kind]:
      raise DataError(f'{layout.name}: {path} and {files[kind][number]} are both the {kind} of case '
                      f'{number}; keep only one under {root}')
    files[kind][number] = path
  if not files['image']:
    raise DataError(f'{root}: no {layout.name} images found (expected {layout.expected})')
  for number, path in files['label'].items():
    if number not in files['image']:
      raise DataError(f'{path}: vessel label of case {number} without its image under {root}')
  cases = []
  for number in sorted(files['image']):
    image = files['image'][number]
    if number not in files['label']:
      raise DataError(f'{image}: no vessel label for case {number} under {root} (expected {layout.expected})')
    cases.append(RetinaCase(name=image.stem, image_path=image, label_path=files['label'][number],
                            fov_path=files['fov'].get(number)))
  return cases


def binary_mask(raw: np.ndarray) -> np.ndarray:
  """Raw mask values -> bool: > 127 for 8-bit (0/255) masks, > 0 for 0/1 masks."""
  return raw > 127 if raw.max(initial=0) > 1 else raw > 0


def build_split(cases: list[RetinaCase], data_config, channels: int, case_id_offset: int) -> Split:
  """Reads `cases` into one `Split` of [N, S, S, channels] images; FOV masks go to `volumes[id].extra`."""
  size = (int(data_config.image_size),) * 2
  parts, infos = [], {}
  for k, case in enumerate(cases):
    image = imageio.read_image_2d(case.image_path)  # [H, W, c] in [0, 1]
    raw = imageio.read_mask_2d(case.label_path)
    label = binary_mask(raw)
    found = volumes.values_found(raw)
    found = dict(zip(found.tolist(), binary_mask(found).astype(int).tolist(), strict=True)) if found.size else {}
    h, w = image.shape[:2]
    if label.shape != (h, w):
      raise DataError(f'{case.label_path}: mask shape {label.shape} differs from image shape {(h, w)}')
    fov = np.ones((h, w), bool)
    if case.fov_path is not None:
      fov = binary_mask(imageio.read_mask_2d(case.fov_path))
      if fov.shape != (h, w):
        raise DataError(f'{case.fov_path}: FOV mask shape {fov.shape} differs from image shape {(h, w)}')
    out = volumes.volume_to_slices(
        image[:, :, None, :], label[:, :, None].astype(np.int32), slice_axis=2, image_size=size,
        percentiles=None, spacing=(1.0, 1.0, 1.0), name=str(case.label_path))
    case_id = case_id_offset + k
    out['images'] = transforms.harmonise_channels(out['images'], channels)
    out['case_ids'] = np.full((1,), case_id, np.int32)
    parts.append(out)
    infos[case_id] = VolumeInfo(
        name=case.name, shape=(h, w, 1), affine=np.eye(4), slice_axis=2, spacing=(1.0, 1.0, 1.0),
        extra=dict(to_original=np.array([[0, 1], [1, 1], [2, 1]], np.float64), original_shape=(h, w),
                   canonical_affine=np.eye(4), path=str(case.image_path), label_path=str(case.label_path),
                   fov=transforms.resize_labels(fov, size), raw_values_found=found,
                   fov_path=None if case.fov_path is None else str(case.fov_path)))
  return Split(
      images=np.concatenate([p['images'] for p in parts]),
      labels=np.concatenate([p['labels'] for p in parts]),
      case_ids=np.concatenate([p['case_ids'] for p in parts]),
      spacing=np.concatenate([p['spacing'] for p in parts]),
      slice_index=np.concatenate([p['slice_index'] for p in parts]),
      volumes=infos,
  )


def load(data_config, seed: int) -> DomainData:
  source_name = dataset_name(data_config.source or 'drive', 'data.source')
  source_root = layouts.require_root(data_config.root, 'data.root', LAYOUTS[source_name].name)
  source_cases = find_cases(source_root, LAYOUTS[source_name])
  if data_config.target_root is None:
    target_name = dataset_name(data_config.target or source_name, 'data.target')
    if target_name != source_name:
      raise ConfigError(f'config.data.target={data_config.target!r} needs config.data.target_root '
                        f'(the {LAYOUTS[target_name].name} folder)')
    target_root, target_cases = source_root, source_cases
  else:
    target_name = dataset_name(data_config.target or 'iostar', 'data.target')
    target_root = layouts.require_root(data_config.target_root, 'data.target_root', LAYOUTS[target_name].name)
    target_cases = find_cases(target_root, LAYOUTS[target_name])
  by_name = {c.name: c for c in target_cases}
  parts = layouts.split_subjects(list(by_name), data_config, seed)
  parts = {k: [by_name[n] for n in layouts.cap(v, data_config.max_cases)] for k, v in parts.items()}
  for name in ('train', 'test'):
    layouts.require_cases(parts[name], f'{LAYOUTS[target_name].name} {name}', target_root, 'more images')
  same = target_cases is source_cases
  source = parts['train'] if same else layouts.cap(source_cases, data_config.max_cases)
  channels = int(data_config.channels or 3)
  splits, offset = {}, 0
  for name, cases in (('source', source), ('target', parts['train']), ('val', parts['val']),
                      ('test', parts['test'])):
    splits[name] = build_split(cases, data_config, channels, offset) if cases else None
    offset += len(cases)
  return DomainData(source=splits['source'], target=splits['target'], val=splits['val'], test=splits['test'],
                    class_names=CLASS_NAMES, spacing_unit='px', image_format='png')
