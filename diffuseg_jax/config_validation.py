"""Config checks that run before any work, so an invalid value fails in one line, not deep in JAX.

Option lists are imported from the modules that define them (one source of truth). Library code (models,
samplers, schedules, losses) raises `ValueError` naming its own fields; `config_section(name)` turns such an
error into a `ConfigError` naming the config path (`config.diffusion: num_heads=3 must divide ...`), and
`validate` / `check_networks` build every library object of a run up front inside it: the sampler settings,
the schedule and, once the data's shapes are known, every network (`jax.eval_shape` of its initialisation,
no compute), so a size that a later stage would reject stops the run before the first stage. `validate`
also checks the combinations that need no data: the image size against every network's downsampling depth,
each training batch against the device and process counts, the normalisation percentiles.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import jax

from diffuseg_jax import relabel, runtime, stable_diffusion
from diffuseg_jax.data import DATASETS, DataSpec, intensity
from diffuseg_jax.data.volumes import EMPTY_SLICE_POLICIES
from diffuseg_jax.errors import ConfigError
from diffuseg_jax.losses import KD_DISTS, LOSS_WEIGHTINGS
from diffuseg_jax.models.cond_unet import COND_MODES
from diffuseg_jax.models.latent import KINDS
from diffuseg_jax.options import parse_names
from diffuseg_jax.run_identity import PATH_FIELDS, SELF_TRAINED, intensity_augmented_strategies
from diffuseg_jax.sampling import mask_condition, prediction, schedules
from diffuseg_jax.sampling.blend import BLEND_MODES, LATENT_MASKS
from diffuseg_jax.sampling.sampler import SamplerSettings
from diffuseg_jax.stages import autoencoder, diffusion, segment, student, teacher

REGION_CONTENTS = ('rendered', 'label')  # sampling.region_content (stages/synthesize.py renders both)
MASK_SETS = ('source', 'test')  # sampling.mask_set

CHOICES = {
    'data.name': tuple(DATASETS),
    'data.empty_slices': EMPTY_SLICE_POLICIES,
    'vae.dist': KD_DISTS,
    'vae.distill_on': student.DISTILL_ON,
    'vae.source_intensity_curves': intensity.CURVES,
    'autoencoder.kind': KINDS,
    'diffusion.schedule': schedules.SCHEDULES,
    'diffusion.cond_mode': COND_MODES,
    'diffusion.mask_condition': mask_condition.MASK_CONDITIONS,
    'diffusion.pseudo_labels_from': relabel.SOURCES,
    'diffusion.loss_weighting': LOSS_WEIGHTINGS,
    'diffusion.prediction_type': prediction.PREDICTION_TYPES,
    'diffusion.finetune': stable_diffusion.FINETUNE,
    'sampling.blend_mode': BLEND_MODES,
    'sampling.latent_mask': LATENT_MASKS,
    'sampling.region_content': REGION_CONTENTS,
    'sampling.mask_set': MASK_SETS,
    'segmentation.select': ('val', 'last'),
    'vae.select': ('val', 'last'),
    'train.compute_dtype': (*runtime.COMPUTE_DTYPES, runtime.AUTO),
    **{f'{s}.compute_dtype': (runtime.INHERIT, *runtime.COMPUTE_DTYPES) for s in runtime.DTYPE_SECTIONS},
}
POSITIVE_INTS = (
    'data.image_size', 'vae.teacher_steps', 'vae.student_steps', 'vae.batch_size', 'autoencoder.steps',
    'autoencoder.batch_size', 'diffusion.steps', 'diffusion.batch_size', 'diffusion.num_timesteps',
    'sampling.num_steps', 'sampling.batch_size', 'sampling.shard_size', 'sampling.writer_queue', 'segmentation.steps',
    'segmentation.batch_size', 'segmentation.select_every', 'vae.select_every', 'eval.batch_size',
    'checkpoint.every_steps', 'checkpoint.max_to_keep', 'checkpoint.preemption_check_every',
    'train.log_every',
)
OPTIONAL_POSITIVE_INTS = ('sampling.num_masks', 'data.max_cases')  # None or a positive integer
POSITIVE_FLOATS = ('vae.learning_rate', 'autoencoder.learning_rate', 'diffusion.learning_rate',
                   'segmentation.learning_rate', 'diffusion.min_snr_gamma')
UNIT_INTERVAL = ('diffusion.cond_dropout', 'train.ema_decay')
# Networks that down-sample the image by 2^levels (data.image_size must be a multiple).
LEVELS = ('vae.levels', 'segmentation.levels')
# Batches that `train/loop.py` shards over the 'data' mesh axis and splits across processes; sampling and
# eval batches are rounded up to the device count (`inference.batched_apply`), so any size works there.
TRAINING_BATCHES = ('vae.batch_size', 'autoencoder.batch_size', 'diffusion.batch_size', 'segmentation.batch_size')


def get(config, dotted: str):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


@contextlib.contextmanager
def config_section(name: str) -> Iterator[None]:
  """A `ValueError` raised inside (by library code, naming its own fields) becomes a one-line ConfigError
  naming the config section."""
  try:
    yield
  except ValueError as e:
    raise ConfigError(f'config.{name}: {e}') from None


def expand_paths(config) -> None:
  """`~` at the start of a path field -> the home folder, in place (the shell leaves it in `--x=~/data`)."""
  for key in PATH_FIELDS:
    if key == 'sd_path' and 'sd_path' not in config:
      continue  # only the :sd variants have it
    value = get(config, key)
    if isinstance(value, str) and value.startswith('~'):
      section, _, name = key.rpartition('.')
      (get(config, section) if section else config)[name] = os.path.expanduser(value)


def dotted_fields(config, prefix: str = '') -> list[str]:
  """Every leaf field of `config` as 'section.name' (for suggestions on a misspelt override)."""
  names = []
  for key, value in config.items():
    if hasattr(value, 'items'):
      names += dotted_fields(value, f'{prefix}{key}.')
    else:
      names.append(f'{prefix}{key}')
  return names


def parse_stages(stages: str, all_stages: tuple[str, ...]) -> list[str]:
  names = parse_names(stages, all_stages, 'stages')
  return [s for s in all_stages if s in names]


def validate(config) -> None:
  """Every check that needs only the config."""
  for key, choices in CHOICES.items():
    value = get(config, key)
    if value not in choices:
      raise ConfigError(f'config.{key}={value!r} is not one of {", ".join(map(str, choices))}')
  for key in POSITIVE_INTS + OPTIONAL_POSITIVE_INTS:
    value = get(config, key)
    optional = key in OPTIONAL_POSITIVE_INTS
    if optional and value is None:
      continue
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ConfigError(f'config.{key}={value!r} must be a positive integer' + (' or None' if optional else ''))
  for key in POSITIVE_FLOATS:
    value = get(config, key)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
      raise ConfigError(f'config.{key}={value!r} must be a positive number')
  for key in UNIT_INTERVAL:
    value = get(config, key)
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
      raise ConfigError(f'config.{key}={value!r} must be in [0, 1]')
  with config_section('diffusion'):
    d = config.diffusion
    schedules.make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)
  with config_section('sampling'):
    SamplerSettings.from_config(config)
  size = config.data.image_size
  if config.autoencoder.kind == 'kl':
    f = config.autoencoder.downsample
    if f < 2 or f & (f - 1) or size % f:
      raise ConfigError(f'config.autoencoder.downsample={f} must be a power of two >= 2 dividing '
                        f'data.image_size={size}')
  if config.data.name != 'mnist_m' and not config.data.root:
    raise ConfigError(f'config.data.root is required for data.name={config.data.name!r} '
                      f'(e.g. --config.data.root=/path/to/data)')
  if config.autoencoder.kind == 'pretrained' and not config.autoencoder.path:
    raise ConfigError('config.autoencoder.path is required for autoencoder.kind=pretrained')
  strategies = parse_names(config.segmentation.strategies, segment.STRATEGIES, 'segmentation.strategies')
  intensity_augmented_strategies(config.segmentation.augment_intensity)  # known strategies, 'all' or 'none'
  for strategy, labeller in SELF_TRAINED.items():
    if strategy in strategies and labeller not in strategies:
      raise ConfigError(f'segmentation strategy {strategy} self-trains on the pseudo-labels of {labeller}: add '
                        f'{labeller} to config.segmentation.strategies')
  st = config.segmentation.st_threshold
  if not isinstance(st, (int, float)) or not 0.0 <= st <= 1.0:
    raise ConfigError(f'config.segmentation.st_threshold={st!r} must be a confidence in [0, 1]')
  _check_data_options(config.data)
  _check_sizes(config)
  _check_batches(config)


def _check_data_options(data) -> None:
  p = data.percentiles
  if p is not None and not (isinstance(p, (tuple, list)) and len(p) == 2
                            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
                            and 0 <= p[0] < p[1] <= 100):
    raise ConfigError(f'config.data.percentiles={p!r} must be (low, high) with 0 <= low < high <= 100, '
                      f"e.g. --config.data.percentiles='(0.5, 99.5)'")
  if data.slice_axis not in (0, 1, 2) or isinstance(data.slice_axis, bool):
    raise ConfigError(f'config.data.slice_axis={data.slice_axis!r} must be 0, 1 or 2')
  if data.channels not in (None, 1, 3) or isinstance(data.channels, bool):
    raise ConfigError(f'config.data.channels={data.channels!r} must be None, 1 or 3')
  f = data.split_fractions
  if not (isinstance(f, (tuple, list)) and len(f) == 3 and all(isinstance(v, (int, float)) and v >= 0 for v in f)
          and sum(f) > 0):
    raise ConfigError(f'config.data.split_fractions={f!r} must be three non-negative fractions '
                      '(train, val, test) with a positive sum')


def _check_sizes(config) -> None:
  """data.image_size against each network's down-sampling (the networks check it again at their shapes)."""
  size = config.data.image_size
  for key in LEVELS:
    levels = get(config, key)
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 0:
      raise ConfigError(f'config.{key}={levels!r} must be a non-negative integer')
    if size % 2**levels:
      raise ConfigError(f'config.{key}={levels}: data.image_size={size} is not divisible by 2^{levels} = '
                        f'{2**levels}; use an image size that is a multiple of {2**levels} or fewer levels')
  a, d = config.autoencoder, config.diffusion
  if d.pseudo_labels_from == 'diffuseg' and d.mask_condition == 'none' and config.sampling.region_content != 'rendered':
    raise ConfigError(f'config.diffusion.pseudo_labels_from={d.pseudo_labels_from!r} changes the target labels that '
                      'the mask-conditioned denoiser and the rendered region learn from, but this config has '
                      "neither (diffusion.mask_condition='none', sampling.region_content="
                      f"{config.sampling.region_content!r}); leave it at 'student'")
  if d.pretrained_unet_path and d.mask_condition != 'none':
    raise ConfigError(f'config.diffusion.mask_condition={d.mask_condition!r} adds input channels to the denoiser, '
                      'which a pretrained UNet (diffusion.pretrained_unet_path) does not have; use '
                      "mask_condition='none' with it")
  if a.kind == 'pretrained' or d.pretrained_unet_path:
    return  # the latent shape, or the UNet, is known once its weights are loaded
  latent = size // a.downsample if a.kind == 'kl' else size
  factor = 2 ** (len(d.channel_mult) - 1)
  if latent % factor:
    where = f'the latent size {latent} (data.image_size={size} / autoencoder.downsample={a.downsample})' if (
        a.kind == 'kl') else f'data.image_size={size}'
    raise ConfigError(f'config.diffusion.channel_mult={tuple(d.channel_mult)}: {where} is not divisible by '
                      f'2^(len(channel_mult) - 1) = {factor}; use a shorter channel_mult or a larger image')


def _check_batches(config) -> None:
  """Each training batch splits evenly over the 'data' mesh axis and over the processes (train/loop.py)."""
  axes = [tuple(a) for a in config.mesh.axes]
  if 'data' not in [a[0] for a in axes]:
    raise ConfigError(f'config.mesh.axes={axes} has no \'data\' axis (batches are sharded on it)')
  sizes = {a[0]: int(a[1]) for a in axes}
  other = math.prod(s for name, s in sizes.items() if name != 'data' and s != -1)
  devices, processes = jax.device_count(), jax.process_count()
  n = sizes['data'] if sizes['data'] != -1 else devices // max(1, other)
  step = math.lcm(max(1, n), processes)
  for key in TRAINING_BATCHES:
    if key == 'autoencoder.batch_size' and config.autoencoder.kind != 'kl':
      continue  # only a KL autoencoder is trained
    value = get(config, key)
    if value % step:
      raise ConfigError(f'config.{key}={value} must be a multiple of {step} ({n} data-parallel device(s), '
                        f'{processes} process(es)), e.g. {max(step, value // step * step)}')


def check_networks(config, spec: DataSpec) -> None:
  """Builds every network the run trains, at the data's shapes, without computing anything: a size or width
  that a network rejects stops here with its config section. A pretrained diffusers UNet is checked when
  its stage loads it (that needs its weights)."""
  checks = []
  with config_section('vae'):
    checks.append(('vae', teacher.task(config, spec)))
  with config_section('segmentation'):
    checks.append(('segmentation', segment.task(config, spec, 'transfer', 0)))
  if config.autoencoder.kind == 'kl':
    with config_section('autoencoder'):
      checks.append(('autoencoder', autoencoder.task(config, spec)))
  if not config.diffusion.pretrained_unet_path:
    f = config.autoencoder.downsample if config.autoencoder.kind == 'kl' else 1
    channels = config.autoencoder.latent_channels if config.autoencoder.kind == 'kl' else spec.channels
    if config.autoencoder.kind != 'pretrained':  # a pretrained autoencoder's latent shape is known once loaded
      h, w = spec.image_size
      with config_section('diffusion'):
        checks.append(('diffusion', diffusion.task(config, (h // f, w // f, channels), spec.num_classes)))
  for section, task in checks:
    with config_section(section):
      jax.eval_shape(task.init_params, task.rng)
