"""Config checks that run before any work, so an invalid value fails in one line, not deep in JAX."""

from __future__ import annotations

import math

from diffuseg_jax.errors import ConfigError

CHOICES = {
    'data.name': ('mnist_m', 'folder', 'mscmr', 'acdc', 'mmwhs', 'retina'),
    'data.empty_slices': ('keep', 'drop', 'drop_source'),
    'vae.dist': ('dice', 'js'),
    'autoencoder.kind': ('identity', 'kl', 'pretrained'),
    'diffusion.schedule': ('linear', 'scaled_linear', 'cosine'),
    'diffusion.cond_mode': ('cross_attention', 'film', 'both'),
    'sampling.blend_mode': ('hard', 'soft', 'pyramid'),
    'sampling.region_content': ('rendered', 'label'),
    'train.compute_dtype': ('float32', 'bfloat16'),
}
POSITIVE_INTS = (
    'data.image_size', 'vae.teacher_steps', 'vae.student_steps', 'vae.batch_size', 'autoencoder.steps',
    'autoencoder.batch_size', 'diffusion.steps', 'diffusion.batch_size', 'diffusion.num_timesteps',
    'sampling.num_steps', 'sampling.batch_size', 'sampling.shard_size', 'segmentation.steps',
    'segmentation.batch_size', 'eval.batch_size', 'checkpoint.every_steps', 'checkpoint.max_to_keep',
    'checkpoint.preemption_check_every',
    'train.log_every',
)
POSITIVE_FLOATS = ('vae.learning_rate', 'autoencoder.learning_rate', 'diffusion.learning_rate',
                   'segmentation.learning_rate')
UNIT_INTERVAL = ('sampling.blend_until', 'diffusion.cond_dropout', 'train.ema_decay')
SEG_STRATEGIES = ('transfer', 'self', 'semi', 'diffuseg')


def get(config, dotted: str):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def parse_stages(stages: str, all_stages: tuple[str, ...]) -> list[str]:
  names = [s.strip() for s in str(stages).split(',') if s.strip()]
  unknown = [s for s in names if s not in all_stages]
  if unknown or not names:
    raise ConfigError(f'config.stages={stages!r}: unknown stage(s) {unknown}; choose from {",".join(all_stages)}')
  return [s for s in all_stages if s in names]


def parse_strategies(strategies: str) -> list[str]:
  names = [s.strip() for s in str(strategies).split(',') if s.strip()]
  unknown = [s for s in names if s not in SEG_STRATEGIES]
  if unknown or not names:
    raise ConfigError(f'config.segmentation.strategies={strategies!r}: unknown {unknown}; '
                      f'choose from {",".join(SEG_STRATEGIES)}')
  return names


def validate(config) -> None:
  for key, choices in CHOICES.items():
    value = get(config, key)
    if value not in choices:
      raise ConfigError(f'config.{key}={value!r} is not one of {", ".join(map(str, choices))}')
  for key in POSITIVE_INTS:
    value = get(config, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ConfigError(f'config.{key}={value!r} must be a positive integer')
  for key in POSITIVE_FLOATS:
    value = get(config, key)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
      raise ConfigError(f'config.{key}={value!r} must be a positive number')
  for key in UNIT_INTERVAL:
    value = get(config, key)
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
      raise ConfigError(f'config.{key}={value!r} must be in [0, 1]')
  if config.sampling.num_steps > config.diffusion.num_timesteps:
    raise ConfigError(f'config.sampling.num_steps={config.sampling.num_steps} exceeds '
                      f'config.diffusion.num_timesteps={config.diffusion.num_timesteps}')
  if config.sampling.guidance_scale < 0:
    raise ConfigError(f'config.sampling.guidance_scale={config.sampling.guidance_scale} must be >= 0')
  if config.sampling.eta < 0:
    raise ConfigError(f'config.sampling.eta={config.sampling.eta} must be >= 0')
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
  parse_strategies(config.segmentation.strategies)
