"""Checks of the loaded data before the first stage, so that data no stage could use stops the run in one line
within seconds, not after an hour of training (the config alone is checked by `config_validation`).

`check_data(ctx)` prints one line per split: the classes found and the raw label values they came from
(what a user compares with their files), then stops with a `DataError` when
  - the source and test (or val) labels share no foreground class: a model trained on one is scored on
    classes it never saw (e.g. source masks 0/1 with test masks 0/255);
  - a case's image is constant after intensity normalisation (`data.percentiles`): nothing to learn;
  - the segmentation strategies `self`/`semi` would run and the target split has no labels.
A label file with more values than labels.json allows or than a mask plausibly has stops the data loader
itself (`volumes.map_labels`, `volumes.check_mask_values`), naming the file.
"""

from __future__ import annotations

import numpy as np

from diffuseg_jax import logs
from diffuseg_jax.config_validation import parse_stages
from diffuseg_jax.data import DomainData, Split
from diffuseg_jax.errors import DataError
from diffuseg_jax.options import parse_names
from diffuseg_jax.stages import STAGES, segment


def check_data(ctx) -> None:
  """The up-front data checks (module docstring); loads `ctx.data`."""
  config = ctx.config
  if config.sampling.mask_set == 'test':
    logs.say('warning: sampling.mask_set=test: synthesis draws its masks from the TEST labels, so every '
             'score trained on synthetic pairs (diffuseg, semi) is an ORACLE, not a domain-adaptation result')
  data = ctx.data
  splits = named_splits(data)
  for name, split in splits.items():
    logs.say(f'data {name}: {describe(split, data.class_names)}')
  for name in ('test', 'val'):
    if name in splits:
      _check_shared_foreground(splits['source'], splits[name], name, data.class_names)
  for name, split in splits.items():
    _check_not_constant(split, name, config.data.percentiles)
  if 'segment' in parse_stages(config.stages, STAGES):
    wanted = parse_names(config.segmentation.strategies, segment.STRATEGIES, 'segmentation.strategies')
    oracle = [s for s in wanted if s in segment.ORACLE]
    if oracle and not data.target.labelled:
      rest = ','.join(s for s in wanted if s not in segment.ORACLE) or 'transfer,diffuseg'
      raise DataError(f'segmentation strategies {", ".join(oracle)} train on target labels, and the target split '
                      f'has none ({_target_labels_hint(config)}); add them or use '
                      f'--config.segmentation.strategies={rest}')


def named_splits(data: DomainData) -> dict[str, Split]:
  splits = {'source': data.source, 'target': data.target, 'test': data.test, 'val': data.val}
  return {name: split for name, split in splits.items() if split is not None}


def raw_values(split: Split) -> dict[int, list[int]]:
  """Class index -> the raw label values that were mapped to it in this split's files (where recorded)."""
  out: dict[int, set[int]] = {}
  for info in (split.volumes or {}).values():
    for raw, index in (info.extra.get('raw_values_found') or {}).items():
      out.setdefault(int(index), set()).add(int(raw))
  return {k: sorted(v) for k, v in sorted(out.items())}


def describe(split: Split, class_names: tuple[str, ...]) -> str:
  """'N images; classes background (0), label_255 (255)': class name (raw label values) of what is present."""
  head = f'{len(split)} images'
  if not split.labelled:
    return f'{head}, unlabelled'
  present = np.flatnonzero(np.bincount(split.labels.ravel(), minlength=len(class_names)))
  raw = raw_values(split)
  classes = ', '.join(f'{class_names[k]} ({", ".join(map(str, raw.get(int(k), [k])))})' for k in present)
  return f'{head}; classes (raw label values): {classes}'


def _foreground(split: Split) -> set[int]:
  return {int(k) for k in np.unique(split.labels)} - {0}


def _check_shared_foreground(source: Split, other: Split, name: str, class_names) -> None:
  if not other.labelled:
    return
  fg_source, fg_other = _foreground(source), _foreground(other)
  if not fg_source:
    raise DataError('the source labels are all background (0): nothing to learn; check the source label files')
  if not fg_other:
    raise DataError(f'the {name} labels are all background (0): nothing to score; check the {name} label files')
  if not fg_source & fg_other:
    def values(split, fg):
      raw = raw_values(split)
      return ', '.join(str(v) for k in sorted(fg) for v in raw.get(k, [class_names[k]]))

    raise DataError(f'the source and {name} labels share no foreground value (source {values(source, fg_source)}; '
                    f'{name} {values(other, fg_other)}): save every split\'s masks with the same values')


def _check_not_constant(split: Split, name: str, percentiles) -> None:
  """Each case (volume or image) must vary after normalisation; names the first constant one's file."""
  if not len(split):
    return
  flat = split.images.reshape(len(split), -1)
  ids, inverse = np.unique(split.case_ids, return_inverse=True)
  lo = np.full(len(ids), np.inf, np.float32)
  hi = np.full(len(ids), -np.inf, np.float32)
  np.minimum.at(lo, inverse, flat.min(axis=1))
  np.maximum.at(hi, inverse, flat.max(axis=1))
  constant = np.flatnonzero(hi <= lo)
  if not constant.size:
    return
  case = int(ids[constant[0]])
  info = (split.volumes or {}).get(case)
  where = (info.extra.get('path') or info.name) if info is not None else f'{name} image {case}'
  nifti = info is not None and str(info.extra.get('path', '')).endswith(('.nii', '.nii.gz'))
  what = (f'the image is constant after intensity normalisation (data.percentiles='
          f'{tuple(percentiles) if percentiles else None})' if nifti else 'every pixel of the image has the same value')
  more = f' ({constant.size} such cases in {name})' if constant.size > 1 else ''
  raise DataError(f'{where}: {what}{more}; nothing to learn from it: remove or fix it')


def _target_labels_hint(config) -> str:
  if config.data.name == 'folder':
    return f'no {config.data.root}/target/labels/ folder'
  return f'data.name={config.data.name!r} has no target labels'
