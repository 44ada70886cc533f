"""A local Stable Diffusion folder (diffusers Flax layout) as the latent space, denoiser and schedule of a run.

The layout of `config.sd_path` (the `:sd` variants), as `FlaxStableDiffusionPipeline.save_pretrained` writes it:
  vae/config.json + diffusion_flax_model.msgpack    FlaxAutoencoderKL: the latent space and its scaling_factor
  unet/config.json + diffusion_flax_model.msgpack   FlaxUNet2DConditionModel: the denoiser
  scheduler/scheduler_config.json                   betas, their schedule, the timestep count, prediction_type
Other folders (text encoder, tokenizer, safety checker) are ignored: z_dom takes the place of the text.

`resolve(config)` replaces diffusion.schedule='pretrained' and diffusion.prediction_type='pretrained' by the
scheduler's values, in place, before the run takes its fingerprints: the run records what it actually used.
The DDIM steps keep this project's trailing spacing (the first step starts at t = T - 1), not diffusers'
default leading spacing, which never denoises the top of the schedule.
"""

from __future__ import annotations

import json
import os

from diffuseg_jax.errors import ConfigError, UserError
from diffuseg_jax.sampling import prediction

PRETRAINED = 'pretrained'  # diffusion.schedule / diffusion.prediction_type: take it from the scheduler config
# diffusers' beta_schedule names -> this project's schedule names (sampling/schedules.py).
SCHEDULE_NAMES = {'linear': 'linear', 'scaled_linear': 'scaled_linear', 'squaredcos_cap_v2': 'cosine'}
SCHEDULER_FILE = 'scheduler_config.json'
FINETUNE = ('full', 'attention')  # diffusion.finetune for a pretrained UNet


def scheduler_config_path(unet_path) -> str:
  """scheduler_config.json of the SD folder that holds the UNet at `unet_path` (the folder root or its unet/)."""
  path = os.path.expanduser(os.fspath(unet_path))
  candidates = [os.path.join(path, 'scheduler', SCHEDULER_FILE),
                os.path.join(os.path.dirname(os.path.normpath(path)), 'scheduler', SCHEDULER_FILE),
                os.path.join(path, SCHEDULER_FILE)]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  raise UserError(f'diffusion.pretrained_unet_path={unet_path}: no scheduler/{SCHEDULER_FILE} beside the UNet, '
                  'so the schedule it was trained with is unknown; give it, or set diffusion.schedule, '
                  'num_timesteps, beta_start, beta_end and prediction_type yourself')


def read_scheduler(unet_path) -> dict:
  """{schedule, num_timesteps, beta_start, beta_end, prediction_type} of the SD folder's scheduler config."""
  path = scheduler_config_path(unet_path)
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f'{path}: cannot read the scheduler config: {e}') from None
  name = raw.get('beta_schedule', 'linear')
  if raw.get('trained_betas') is not None:
    raise UserError(f'{path}: explicit trained_betas are not supported; only the named schedules '
                    f'{sorted(SCHEDULE_NAMES)}')
  if name not in SCHEDULE_NAMES:
    raise UserError(f'{path}: beta_schedule={name!r} is not one of {sorted(SCHEDULE_NAMES)}')
  kind = raw.get('prediction_type', 'epsilon')
  if kind not in prediction.PREDICTION_TYPES:
    raise UserError(f'{path}: prediction_type={kind!r} is not supported (only {list(prediction.PREDICTION_TYPES)})')
  return {'schedule': SCHEDULE_NAMES[name], 'num_timesteps': int(raw.get('num_train_timesteps', 1000)),
          'beta_start': float(raw.get('beta_start', 1e-4)), 'beta_end': float(raw.get('beta_end', 2e-2)),
          'prediction_type': kind}


def resolve(config) -> None:
  """Fills the 'pretrained' schedule and prediction type from the SD folder's scheduler config, in place."""
  if 'sd_path' in config and not config.sd_path:
    raise ConfigError('config.sd_path is not set: the :sd variant needs a local diffusers Flax Stable Diffusion '
                      'folder (vae/, unet/, scheduler/), e.g. --config.sd_path=/models/stable-diffusion-flax')
  d = config.diffusion
  if PRETRAINED not in (d.schedule, d.prediction_type):
    return
  if not d.pretrained_unet_path:
    field = 'schedule' if d.schedule == PRETRAINED else 'prediction_type'
    raise ConfigError(f"config.diffusion.{field}='pretrained' reads the scheduler of a pretrained UNet's folder: "
                      'set config.diffusion.pretrained_unet_path (or use an :sd variant with config.sd_path)')
  scheduler = read_scheduler(d.pretrained_unet_path)
  if d.schedule == PRETRAINED:
    d.update(**{k: scheduler[k] for k in ('schedule', 'num_timesteps', 'beta_start', 'beta_end')})
  if d.prediction_type == PRETRAINED:
    d.prediction_type = scheduler['prediction_type']


def is_attention_param(path: tuple[str, ...]) -> bool:
  """True for the parameters that diffusion.finetune='attention' trains in a pretrained conditioned UNet:
    the z_dom projection (everything outside 'unet') and the UNet's transformer blocks (`attentions_<k>`:
    self- and cross-attention, their feed-forward and norms). Convolutions and time embeddings stay frozen."""
  if not path or path[0] != 'unet':
    return True
  return any(part.startswith('attentions_') for part in path)
