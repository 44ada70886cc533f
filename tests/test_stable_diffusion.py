"""The Stable Diffusion route (`:sd` variants) on a tiny SD-layout folder written in the test.

References: diffusers' own scheduler (alphas_cumprod), the v-parameterisation's closed form (Salimans & Ho
2022: v = sqrt(a) eps - sqrt(1 - a) x0, so eps = sqrt(a) v + sqrt(1 - a) x_t), and for a point-mass data
distribution the exact denoiser, with which DDIM must land on the data point for either prediction type.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config
from sd_fixtures import SCHEDULER, write_tiny_sd

from diffuseg_jax import stable_diffusion
from diffuseg_jax.errors import ConfigError, UserError
from diffuseg_jax.models import diffusers_adapter as da
from diffuseg_jax.sampling import prediction, schedules
from diffuseg_jax.sampling.sampler import SamplerSettings, blended_ddim_sample


@pytest.fixture(scope='module')
def sd_root(tmp_path_factory):
  return write_tiny_sd(tmp_path_factory.mktemp('sd'), 'v_prediction')


def sd_config(root, **diffusion):
  config = tiny_config('sd')
  config.sd_path = str(root)
  config.vae.z_dom_dim = 4
  config.diffusion.update(**diffusion)
  return config


def test_v_prediction_closed_form():
  rng = np.random.default_rng(0)
  x0, eps = rng.normal(size=(2, 5, 4, 4, 3)).astype(np.float32)
  a = rng.uniform(0.01, 0.99, size=(5,)).astype(np.float32)
  ab = a[:, None, None, None]
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
  v = prediction.training_target(x0, eps, a, 'v_prediction')
  np.testing.assert_allclose(v, np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0, atol=1e-6)
  np.testing.assert_allclose(prediction.to_eps(v, x_t, a, 'v_prediction'), eps, atol=1e-5)
  # x0 back from v: sqrt(a) x_t - sqrt(1 - a) v.
  np.testing.assert_allclose(np.sqrt(ab) * x_t - np.sqrt(1 - ab) * np.asarray(v), x0, atol=1e-5)
  assert prediction.training_target(x0, eps, a, 'epsilon') is eps
  with pytest.raises(ValueError, match='prediction_type'):
    prediction.to_eps(v, x_t, a, 'sample')


@pytest.mark.parametrize('kind', prediction.PREDICTION_TYPES)
def test_exact_denoiser_lands_on_the_data_point_and_the_mask_is_kept(kind):
  """Data = one point x*: the exact eps is (x_t - sqrt(a) x*) / sqrt(1 - a), the exact v follows from it.
    DDIM through `prediction.eps_fn` ends on x* outside the mask and on the region content inside it."""
  T = SCHEDULER['num_train_timesteps']
  alphas = schedules.make_schedule('scaled_linear', T, SCHEDULER['beta_start'], SCHEDULER['beta_end']).alphas_cumprod
  rng = np.random.default_rng(1)
  x_star = jnp.asarray(rng.normal(size=(1, 8, 8, 4)), jnp.float32)
  region = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  mask = jnp.zeros((2, 8, 8, 1)).at[:, 2:5, 3:7].set(1.0)

  def exact(x_t, t, z, drop):
    a = jnp.asarray(alphas)[t][:, None, None, None]
    eps = (x_t - jnp.sqrt(a) * x_star) / jnp.sqrt(1 - a)
    return eps if kind == 'epsilon' else jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x_star

  settings = SamplerSettings(num_steps=10, num_timesteps=T, prediction_type=kind)
  eps_fn = prediction.eps_fn(exact, alphas, kind)
  sample = jax.jit(lambda k: blended_ddim_sample(eps_fn, alphas, k, region, mask, jnp.zeros((2, 4)), settings))
  x0, _ = sample(jax.random.key(0))
  expected = mask * region + (1 - mask) * x_star
  np.testing.assert_allclose(x0, expected, atol=1e-3)


def test_schedule_and_prediction_type_come_from_the_scheduler_config(sd_root):
  root, _ = sd_root
  config = sd_config(root)
  assert config.autoencoder.path == str(root) and config.diffusion.pretrained_unet_path == str(root)
  stable_diffusion.resolve(config)
  d = config.diffusion
  assert (d.schedule, d.num_timesteps, d.prediction_type) == ('scaled_linear', 100, 'v_prediction')
  assert (d.beta_start, d.beta_end) == (SCHEDULER['beta_start'], SCHEDULER['beta_end'])
  # The schedule it builds equals diffusers' own.
  reference = da.diffusers.FlaxDDIMScheduler.from_pretrained(root, subfolder='scheduler')[0].create_state()
  ours = schedules.make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end).alphas_cumprod
  np.testing.assert_allclose(ours, np.asarray(reference.common.alphas_cumprod), rtol=1e-6)
  # Also found from the unet/ folder itself.
  assert stable_diffusion.read_scheduler(root / 'unet')['prediction_type'] == 'v_prediction'


def test_sd_route_errors_are_one_line(tmp_path, sd_root):
  with pytest.raises(ConfigError, match='sd_path is not set'):
    stable_diffusion.resolve(tiny_config('sd'))
  config = tiny_config()
  config.diffusion.prediction_type = 'pretrained'
  with pytest.raises(ConfigError, match='pretrained_unet_path'):
    stable_diffusion.resolve(config)
  no_scheduler, _ = write_tiny_sd(tmp_path / 'no_scheduler', scheduler=False)
  with pytest.raises(UserError, match='no scheduler/scheduler_config.json'):
    stable_diffusion.resolve(sd_config(no_scheduler))
  (no_scheduler / 'scheduler').mkdir()
  (no_scheduler / 'scheduler' / 'scheduler_config.json').write_text('{"prediction_type": "sample"}')
  with pytest.raises(UserError, match="prediction_type='sample' is not supported"):
    stable_diffusion.resolve(sd_config(no_scheduler))
  # A PyTorch-only checkpoint: say how to convert it.
  torch_only = tmp_path / 'torch' / 'unet'
  torch_only.mkdir(parents=True)
  (torch_only / 'config.json').write_text('{}')
  (torch_only / 'diffusion_pytorch_model.safetensors').write_bytes(b'')
  with pytest.raises(UserError, match='PyTorch weights.*from_pt=True'):
    da.load_pretrained_unet(tmp_path / 'torch')


def test_channel_mismatch_is_a_user_error(tmp_path):
  from diffuseg_jax.stages import diffusion

  root, _ = write_tiny_sd(tmp_path / 'sd8', unet_channels=8)
  config = sd_config(root)
  stable_diffusion.resolve(config)
  with pytest.raises(UserError, match='maps 8 to 8 channels, but the latents have 4'):
    diffusion.task(config, (8, 8, 4))


def test_sd_variant_runs_the_whole_pipeline(sd_root, tmp_path):
  """`configs/test.py:sd` end to end: the SD VAE's latents, the v-prediction UNet fine-tuned in its attention
    blocks only (convolutions and time embeddings keep their pretrained values), blended synthesis that keeps
    the mask region, a DiffuSeg segmenter evaluated."""
  import json

  from flax.traverse_util import flatten_dict

  from diffuseg_jax import pipeline
  from diffuseg_jax.stages import diffusion

  root, models = sd_root
  config = sd_config(root)
  config.segmentation.strategies = 'diffuseg'
  ctx = pipeline.run(config, str(tmp_path / 'wd'), show_progress=False)
  results = ctx.read_results()
  assert results['autoencoder']['kind'] == 'pretrained' and results['autoencoder']['scaling_factor'] == 0.25
  assert results['synthesize']['region_max_abs_error_latent'] < 1e-4  # hard blend to the last step: r(m) kept
  assert 0.0 <= results['evaluate']['strategies']['diffuseg']['dice_mean'] <= 1.0
  recorded = json.loads(open(ctx.path('config.json')).read())['diffusion']
  assert (recorded['schedule'], recorded['num_timesteps'], recorded['prediction_type']) == (
      'scaled_linear', 100, 'v_prediction')
  _, params, _ = diffusion.load(ctx)
  pretrained = flatten_dict(models['unet'][1])
  trained = {k[1:]: v for k, v in flatten_dict(jax.device_get(params)).items() if k[0] == 'unet'}
  # Frozen weights stay within the EMA's float rounding (decay * p + (1 - decay) * p); trained ones move ~lr.
  moved = {k for k in pretrained if np.abs(np.asarray(pretrained[k]) - trained[k]).max() > 1e-5}
  assert moved and all(stable_diffusion.is_attention_param(('unet', *k)) for k in moved)
  assert ('conv_in', 'kernel') not in moved and any(k[1] == 'attentions_0' for k in moved)
