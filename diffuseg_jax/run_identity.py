"""Run identity: which config fields and upstream results each unit of work depends on, and the fingerprint
that names its outputs (content-addressed, like a build cache).

Units, with what they consume:

  teacher                              data, seed, train, vae (the teacher's fields)
  student                              teacher, vae
  autoencoder                          data, seed, train, autoencoder
  diffusion                            student, autoencoder, diffusion (+ with diffusion.pseudo_labels_from=
                                       diffuseg, the first round's segment/diffuseg_seed<k>: relabel.py)
  synthesize                           student, autoencoder, diffusion, sampling
  segment/<strategy>_seed<k>           data, seed, train, segmentation (+ synthesize for diffuseg, semi and
                                       diffuseg_st; + segment/diffuseg_seed<k> for diffuseg_st; + the first
                                       round's segment/diffuseg_seed<k> for diffuseg in a second round, whose
                                       weights are the round's better on validation); of
                                       segmentation.augment_intensity only whether it names the strategy
  evaluate/<strategy>_seed<k>          segment/<strategy>_seed<k>, eval.hd_percentile
  quality                              synthesize, eval.num_quality_images, eval.inception_path

fingerprint(unit) = sha256 of {its fields' values, its upstream units' fingerprints, FORMAT}, 12 hex digits.
A unit's outputs live in `<workdir>/units/<unit>/<fingerprint>/`: so a changed field gives the unit (and,
through the upstream fingerprints, everything downstream of it) a new folder, an unchanged one keeps its
folder and is reused, and switching a config back finds the earlier folder again. Fields that cannot
change a result (progress bars, log and checkpoint intervals, the device mesh, inference batch sizes) are in
no fingerprint, so a resumed job on other hardware or with other batch sizes for inference reuses its work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import ml_collections

from diffuseg_jax.options import strategy_subset

# Bump when the meaning of a unit's outputs changes, so that no earlier output is reused for it.
FORMAT = 1

# Config fields that never change a result: left out of every fingerprint.
NEVER = ('stages', 'mesh', 'checkpoint', 'train.progress', 'train.log_every', 'sampling.batch_size',
         'sampling.writer_queue', 'eval.batch_size', 'eval.num_figure_examples')
# Fields added after workdirs existed, at the value that does what runs did before the field: left out of the
# fingerprint at that value, so adding them recomputes nothing.
NEUTRAL = {'diffusion.prediction_type': 'epsilon', 'diffusion.finetune': 'full', 'diffusion.mask_condition': 'none',
           'diffusion.loss_weighting': 'uniform', 'diffusion.min_snr_gamma': 5.0,
           'diffusion.pseudo_labels_from': 'student',
           'vae.augment_source_intensity': False, 'vae.source_intensity_curves': 'monotone', 'vae.distill_on': 'target',
           'vae.select': 'last', 'vae.select_every': 20, 'vae.augment_source_bias_blur': False,
           **{f'{s}.compute_dtype': 'inherit' for s in ('vae', 'autoencoder', 'diffusion', 'segmentation')}}
# Fields holding a local path: a shell does not expand `~` after `=` (`--config.data.root=~/data`). In a
# fingerprint they stand as the folder they name (home expanded, made absolute against the working directory,
# links resolved): the same data reached from another folder or through a link keeps its units, and one
# relative path run from two folders that hold different data does not share them.
PATH_FIELDS = ('sd_path', 'data.root', 'data.target_root', 'data.mnist_idx_dir', 'autoencoder.path',
               'diffusion.pretrained_unet_path', 'eval.inception_path')
COMMON = ('seed', 'data', 'train')  # every training unit: its data, its split and seeds, the optimiser
# Fields of `vae` that only the student reads: a change to them keeps the teacher.
STUDENT_ONLY = ('vae.student_steps', 'vae.augment_target', 'vae.distill_on', 'vae.alpha', 'vae.lam', 'vae.dist',
                'vae.latent_temperature')
STRATEGIES = ('transfer', 'self', 'semi', 'diffuseg', 'diffuseg_st')  # segmentation strategies, in run order
SYNTHETIC_STRATEGIES = ('diffuseg', 'semi', 'diffuseg_st')  # segmentation strategies trained on the synthetic pairs
SELF_TRAINED = {'diffuseg_st': 'diffuseg'}  # strategy -> the strategy whose segmenter gives its pseudo-labels
# An upstream unit named '<FIRST_ROUND><unit>' is <unit> of the first round of diffusion.pseudo_labels_from=
# diffuseg (relabel.py): this config with the student's labels, so an ordinary run's unit.
FIRST_ROUND = 'round1:'


@dataclasses.dataclass(frozen=True)
class UnitSpec:
  """What one unit depends on: `fields` (dotted config paths; a leading '-' removes one), `extra` values
  (a segmentation run's strategy and seed) and `upstream` units."""

  fields: tuple[str, ...]
  upstream: tuple[str, ...] = ()
  extra: tuple[tuple[str, Any], ...] = ()


EXTRA_UNITS: dict[str, UnitSpec] = {}  # units declared outside the pipeline (`register`)


def register(unit: str, unit_spec: UnitSpec) -> None:
  """Declares a unit of work beyond the pipeline's (an experiment's own network, a test's toy task)."""
  EXTRA_UNITS[unit] = unit_spec


def intensity_augmented_strategies(value: Any) -> frozenset[str]:
  """The strategies `segmentation.augment_intensity` names ('a,b' | 'all' | 'none'); an unknown one is a
  ConfigError. The segment stage trains them on intensity curves; their units' fingerprints record it."""
  return strategy_subset(value, STRATEGIES, 'segmentation.augment_intensity')


def spec(unit: str, values: dict[str, Any] | None = None) -> UnitSpec:
  """The dependencies of `unit` (see the module docstring); `values` (`config_values`) where they depend on
  the config's values, not only on its fields."""
  if unit in EXTRA_UNITS:
    return EXTRA_UNITS[unit]
  kind, _, run = unit.partition('/')
  if kind == 'teacher':
    return UnitSpec(COMMON + ('vae',) + tuple(f'-{f}' for f in STUDENT_ONLY))
  if kind == 'student':
    return UnitSpec(COMMON + ('vae', '-vae.teacher_steps'), upstream=('teacher',))
  if kind == 'autoencoder':
    return UnitSpec(COMMON + ('autoencoder',))
  if kind == 'diffusion':
    labeller = ()  # diffusion.pseudo_labels_from=diffuseg: the first round's segmenters label its data
    if second_round(values):
      labeller = tuple(f'{FIRST_ROUND}{u}' for u in first_round_labellers(values))
    return UnitSpec(COMMON + ('diffusion',), upstream=('student', 'autoencoder', *labeller))
  if kind == 'synthesize':
    return UnitSpec(COMMON + ('sampling',), upstream=('student', 'autoencoder', 'diffusion'))
  if kind == 'segment':
    strategy, seed = parse_run(run)
    upstream = ('synthesize',) if strategy in SYNTHETIC_STRATEGIES else ()
    if strategy in SELF_TRAINED:
      upstream += (f'segment/{run_name(SELF_TRAINED[strategy], seed)}',)
    if strategy == 'diffuseg' and second_round(values):  # its weights: the better round's on validation
      upstream += (f'{FIRST_ROUND}segment/{run_name(strategy, seed)}',)
    own = () if strategy in SELF_TRAINED else ('-segmentation.st_threshold',)  # read by self-training only
    # augment_intensity lists strategies: each unit depends only on whether it is in the list (recorded only
    # when it is, so that units from before the field keep their fingerprints).
    augmented = (('augment_intensity', True),) if strategy in intensity_augmented_strategies(
        (values or {}).get('segmentation.augment_intensity', 'none')) else ()
    return UnitSpec(COMMON + ('segmentation', '-segmentation.strategies', '-segmentation.seeds',
                              '-segmentation.augment_intensity', *own),
                    upstream=upstream, extra=(('strategy', strategy), ('seed', seed), *augmented))
  if kind == 'evaluate':
    parse_run(run)
    return UnitSpec(('seed', 'data', 'eval.hd_percentile'), upstream=(f'segment/{run}',))
  if kind == 'quality':
    return UnitSpec(('seed', 'data', 'eval.num_quality_images', 'eval.inception_path'), upstream=('synthesize',))
  raise ValueError(f'unknown unit {unit!r}: declare it with run_identity.register')


def second_round(values: dict[str, Any] | None) -> bool:
  """Whether the config is the second round of diffusion.pseudo_labels_from=diffuseg (relabel.py)."""
  return (values or {}).get('diffusion.pseudo_labels_from') == 'diffuseg'


def first_round_labellers(values: dict[str, Any]) -> tuple[str, ...]:
  """The first round's segmenters that label the target for diffusion.pseudo_labels_from=diffuseg."""
  return tuple(f'segment/{run_name("diffuseg", k)}' for k in values.get('segmentation.seeds', ()))


def run_name(strategy: str, seed: int) -> str:
  return f'{strategy}_seed{int(seed)}'


def parse_run(run: str) -> tuple[str, int]:
  """'diffuseg_seed2' -> ('diffuseg', 2)."""
  strategy, sep, seed = run.rpartition('_seed')
  if not sep or not strategy or not seed.isdigit():
    raise ValueError(f'not a <strategy>_seed<k> run name: {run!r}')
  return strategy, int(seed)


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out: dict[str, Any] = {}
    for key, value in tree.items():
      out.update(_flatten(value, f'{prefix}{key}.' if isinstance(value, dict) else f'{prefix}{key}'))
      if isinstance(value, dict) and not value:
        out[f'{prefix}{key}'] = {}
    return out
  return {prefix.rstrip('.'): tree}


def _covered(path: str, selector: str) -> bool:
  return path == selector or path.startswith(selector + '.')


def config_values(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Every config field as {dotted path: JSON value} (tuples as lists; a path field as the absolute, resolved
  path of what it names)."""
  values = _flatten(json.loads(config.to_json_best_effort()))
  for key in PATH_FIELDS:
    if isinstance(values.get(key), str) and values[key]:
      values[key] = os.path.realpath(os.path.expanduser(values[key]))
  return values


def unit_fields(values: dict[str, Any], unit_spec: UnitSpec) -> dict[str, Any]:
  """The values of the fields `unit_spec` selects (minus NEVER and its '-' exclusions), by dotted path."""
  include = [f for f in unit_spec.fields if not f.startswith('-')]
  exclude = [f[1:] for f in unit_spec.fields if f.startswith('-')] + list(NEVER)
  out = {p: v for p, v in values.items()
         if any(_covered(p, s) for s in include) and not any(_covered(p, s) for s in exclude)
         and not (p in NEUTRAL and v == NEUTRAL[p])}
  out.update({f'run.{k}': v for k, v in unit_spec.extra})
  return dict(sorted(out.items()))


def _digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class Identity:
  """A unit's fingerprint and what it was computed from (stored as identity.json next to its outputs)."""

  unit: str
  fingerprint: str
  fields: dict[str, Any]
  upstream: dict[str, str]  # upstream unit -> its fingerprint

  def to_json(self) -> dict[str, Any]:
    return {'unit': self.unit, 'fingerprint': self.fingerprint, 'format': FORMAT, 'fields': self.fields,
            'upstream': self.upstream}


class Identities:
  """The identities of one config's units (memoised: upstream fingerprints are shared)."""

  def __init__(self, config: ml_collections.ConfigDict | None, values: dict[str, Any] | None = None):
    self._values = config_values(config) if values is None else values
    self._memo: dict[str, Identity] = {}
    self._first: Identities | None = None

  def __call__(self, unit: str) -> Identity:
    if unit.startswith(FIRST_ROUND):
      return self.first_round(unit[len(FIRST_ROUND):])
    if unit not in self._memo:
      unit_spec = spec(unit, self._values)
      fields = unit_fields(self._values, unit_spec)
      upstream = {u: self(u).fingerprint for u in unit_spec.upstream}
      fingerprint = _digest({'unit': unit, 'format': FORMAT, 'fields': fields, 'upstream': upstream})
      self._memo[unit] = Identity(unit, fingerprint, fields, upstream)
    return self._memo[unit]

  @property
  def first_round(self) -> Identities:
    """The identities of the first round (diffusion.pseudo_labels_from=student)."""
    if self._first is None:
      self._first = Identities(None, {**self._values, 'diffusion.pseudo_labels_from': 'student'})
    return self._first


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """'field: old -> new' for every field whose value differs (added / removed fields included)."""
  out = []
  for key in sorted(set(old) | set(new)):
    if old.get(key, '<unset>') != new.get(key, '<unset>'):
      out.append(f'{key}: {_short(old.get(key, "<unset>"))} -> {_short(new.get(key, "<unset>"))}')
  return out


def _short(value: Any) -> str:
  text = json.dumps(value) if not isinstance(value, str) else value
  return text if len(text) <= 40 else text[:37] + '...'
