"""Config checks that run before any work, so an invalid value fails in one line, not deep in JAX.

Option lists are imported from the modules that define them (one source of truth). Library code (models,
samplers, schedules, losses) raises `ValueError` naming its own fields; `config_section(name)` turns such an
error into a `ConfigError` naming the config path (`config.diffusion: num_heads=3 must divide ...`), and
`validate` / `check_networks` build every library object of a run up front inside it: the sampler settings,
the schedule and, once the data's shapes are known, every network (`jax.eval_shape` of its initialisation,
no compute), so a size that a later stage would reject stops the run before the first stage.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import jax

from diffuseg_jax import runtime
from diffuseg_jax.data import DATASETS, DataSpec
from diffuseg_jax.data.volumes import EMPTY_SLICE_POLICIES
from diffuseg_jax.errors import ConfigError
from diffuseg_jax.losses import KD_DISTS
from diffuseg_jax.models.cond_unet import COND_MODES
from diffuseg_jax.models.latent import KINDS
from diffuseg_jax.options import parse_names
from diffuseg_jax.sampling import schedules
from diffuseg_jax.sampling.blend import BLEND_MODES
from diffuseg_jax.sampling.sampler import SamplerSettings
from diffuseg_jax.stages import autoencoder, diffusion, segment, teacher

REGION_CONTENTS = ('rendered', 'label')  # sampling.region_content (stages/synthesize.py renders both)
MASK_SETS = ('source', 'test')  # sampling.mask_set

CHOICES = {
    'data.name': tuple(DATASETS),
    'data.empty_slices': EMPTY_SLICE_POLICIES,
    'vae.dist': KD_DISTS,
    'autoencoder.kind': KINDS,
    'diffusion.schedule': schedules.SCHEDULES,
    'diffusion.cond_mode': COND_MODES,
    'sampling.blend_mode': BLEND_MODES,
    'sampling.region_content': REGION_CONTENTS,
    'sampling.mask_set': MASK_SETS,
    'train.compute_dtype': tuple(runtime.COMPUTE_DTYPES),
}
POSITIVE_INTS = (
    'data.image_size', 'vae.teacher_steps', 'vae.student_steps', 'vae.batch_size', 'autoencoder.steps',
    'autoencoder.batch_size', 'diffusion.steps', 'diffusion.batch_size', 'diffusion.num_timesteps',
    'sampling.num_steps', 'sampling.batch_size', 'sampling.shard_size', 'segmentation.steps',
    'segmentation.batch_size', 'eval.batch_size', 'checkpoint.every_steps', 'checkpoint.max_to_keep',
    'checkpoint.preemption_check_every',
    'train.log_every',
)
OPTIONAL_POSITIVE_INTS = ('sampling.num_masks',)  # None or a positive integer
POSITIVE_FLOATS = ('vae.learning_rate', 'autoencoder.learning_rate', 'diffusion.learning_rate',
                   'segmentation.learning_rate')
UNIT_INTERVAL = ('diffusion.cond_dropout', 'train.ema_decay')


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
  parse_names(config.segmentation.strategies, segment.STRATEGIES, 'segmentation.strategies')  # the stage's list


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
        checks.append(('diffusion', diffusion.task(config, (h // f, w // f, channels))))
  for section, task in checks:
    with config_section(section):
      jax.eval_shape(task.init_params, task.rng)
