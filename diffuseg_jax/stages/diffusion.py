"""Stage `diffusion`: the denoising UNet D(x_t, t, z_dom) on target latents (paper eq. 7).

D predicts the noise (eps, the paper's eq. 7) or, with diffusion.prediction_type='v_prediction' (Stable
Diffusion 2.x weights), the velocity v (`sampling/prediction.py`); the sampler works on the implied eps.

z_dom = posterior mean of the frozen student's domain encoder on the SAME target image; latents come from the
frozen autoencoder (identity in pixel space). Both are computed once before training (they are frozen), so a
step only runs the UNet. Condition dropout (config.diffusion.cond_dropout) trains the null condition that
classifier-free guidance needs. Batches: {'latent': [B,h,w,C] f32, 'z_dom': [B,D] f32}; with
`diffusion.augment` (few-shot targets) each latent is randomly flipped / rotated by 90 degrees and keeps the
z_dom of its unrotated image.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from diffuseg_jax import inference, losses, relabel, runtime, stable_diffusion
from diffuseg_jax.errors import UserError
from diffuseg_jax.models.cond_unet import build_cond_unet
from diffuseg_jax.sampling import mask_condition, prediction, schedules
from diffuseg_jax.stages import autoencoder, student
from diffuseg_jax.train.state import make_optimizer
from diffuseg_jax.train.task import Task, linen_init, named_rng


def schedule(config) -> schedules.Schedule:
  c = config.diffusion
  return schedules.make_schedule(c.schedule, c.num_timesteps, c.beta_start, c.beta_end)


def denoising_loss(model, alphas_cumprod, params, x0, z_dom, t, noise, drop, prediction_type='epsilon',
                   label_channels=None, min_snr_gamma=None):
  """Eq. 7 for given timesteps t [B], noise (x0's shape) and condition-dropout flags drop [B]: the mean
  squared error to the noise (epsilon) or to v = sqrt(a_t) noise - sqrt(1 - a_t) x0 (v_prediction).
  label_channels [B, h, w, K-1] (a mask-conditioned denoiser, sampling/mask_condition.py) join x_t's input.
  min_snr_gamma: weight each sample by losses.min_snr_weights (None: uniform, eq. 7)."""
  x_t = schedules.q_sample(x0, t, noise, alphas_cumprod)
  a_t = jnp.asarray(alphas_cumprod, jnp.float32)[t]
  target = prediction.training_target(x0, noise, a_t, prediction_type)

  def apply(x, t, z, drop):
    return model.apply({'params': params}, x, t, z, drop)

  if label_channels is not None:
    apply = mask_condition.conditioned(apply, label_channels)
  weights = None if min_snr_gamma is None else losses.min_snr_weights(a_t, min_snr_gamma, prediction_type)
  return losses.diffusion_loss(target, apply(x_t, t, z_dom, drop), weights)


def loss_fn(model, cond_dropout, alphas_cumprod, prediction_type, min_snr_gamma, params, batch, rng, frozen):
  """`denoising_loss` with t uniform in [0, T), Gaussian noise and dropout Bernoulli(cond_dropout) from rng."""
  del frozen
  k_t, k_noise, k_drop = jax.random.split(rng, 3)
  x0 = batch['latent']
  b = x0.shape[0]
  t = jax.random.randint(k_t, (b,), 0, alphas_cumprod.shape[0])
  noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
  drop = jax.random.bernoulli(k_drop, cond_dropout, (b,))
  return denoising_loss(model, alphas_cumprod, params, x0, batch['z_dom'], t, noise, drop, prediction_type,
                        batch.get('label_channels'), min_snr_gamma), {}


def finetune_optimizer(optimizer: optax.GradientTransformation, finetune: str) -> optax.GradientTransformation:
  """`optimizer` on every parameter ('full'), or only on the z_dom projection and the pretrained UNet's
  attention blocks ('attention', `stable_diffusion.is_attention_param`); the rest get zero updates and no
  optimizer state."""
  if finetune == 'full':
    return optimizer

  def labels(params):
    flat = flatten_dict(params)
    return unflatten_dict({k: 'train' if stable_diffusion.is_attention_param(k) else 'frozen' for k in flat})

  return optax.multi_transform({'train': optimizer, 'frozen': optax.set_to_zero()}, labels)


def task(config, latent_shape: tuple[int, int, int], num_classes: int = 2) -> Task:
  """The denoiser on latents [h, w, c]. With diffusion.pretrained_unet_path, a local diffusers Flax UNet
  (fine-tuned here, its weights the starting point) behind a z_dom token projection. With
  diffusion.mask_condition, its input also has the K-1 label channels (`num_classes` K)."""
  cfg, cond_dim = config.diffusion, config.vae.z_dom_dim
  extra = mask_condition.num_channels(cfg.mask_condition, num_classes)
  dtype = runtime.compute_dtype(config, 'diffusion')
  if cfg.pretrained_unet_path:
    from diffuseg_jax.models import diffusers_adapter

    unet, unet_params = diffusers_adapter.load_pretrained_unet(cfg.pretrained_unet_path, dtype=dtype)
    if unet.in_channels != latent_shape[-1] or unet.out_channels != latent_shape[-1]:
      raise UserError(f'diffusion.pretrained_unet_path={cfg.pretrained_unet_path}: the UNet maps {unet.in_channels} '
                      f'to {unet.out_channels} channels, but the latents have {latent_shape[-1]} '
                      f'(autoencoder.kind={config.autoencoder.kind}); use the autoencoder it was trained with')
    model = diffusers_adapter.PretrainedCondUNet(unet, cond_dim=cond_dim, num_cond_tokens=cfg.num_cond_tokens,
                                                 dtype=dtype)

    def init_params(key):
      return diffusers_adapter.init_pretrained_cond_unet(model, unet_params, key)['params']
  else:
    model = build_cond_unet(cfg, channels=latent_shape[-1], cond_dim=cond_dim, dtype=dtype)
    input_shape = (1, *latent_shape[:-1], latent_shape[-1] + extra)
    init_params = linen_init(model, jax.ShapeDtypeStruct(input_shape, 'float32'),
                             jax.ShapeDtypeStruct((1,), 'int32'), jax.ShapeDtypeStruct((1, cond_dim), 'float32'),
                             jax.ShapeDtypeStruct((1,), 'bool'))
  alphas = jnp.asarray(schedule(config).alphas_cumprod)
  return Task(
      name='diffusion', model=model, init_params=init_params,
      loss_fn=functools.partial(loss_fn, model, float(cfg.cond_dropout), alphas,
                                prediction.check(cfg.prediction_type),
                                float(cfg.min_snr_gamma) if cfg.loss_weighting == 'min_snr' else None),
      optimizer=finetune_optimizer(make_optimizer(cfg.learning_rate, cfg.steps, config.train),
                                   cfg.finetune if cfg.pretrained_unet_path else 'full'),
      num_steps=int(cfg.steps),
      batch_size=int(cfg.batch_size), checkpoint='diffusion', rng=named_rng(config.seed, 'diffusion'),
      ema_decay=float(config.train.ema_decay), learning_rate_field='diffusion.learning_rate')


def latent_shape(ctx, codec) -> tuple[int, int, int]:
  h, w = ctx.data.image_size
  return (h // codec.downsample, w // codec.downsample, codec.latent_channels)


def domain_codes(ctx, images: np.ndarray, student_model=None) -> np.ndarray:
  """z_dom [N, D]: posterior means of the student's domain encoder."""
  model, params = student_model or student.load(ctx)
  return inference.batched_apply(functools.partial(inference.domain_codes, model=model), images,
                                 ctx.config.eval.batch_size, ctx.mesh, args=(params,))


def units(ctx) -> list[str]:
  return ['diffusion']


def load(ctx):
  """(model, EMA params, codec) of the finished diffusion stage."""
  codec = autoencoder.load_codec(ctx)
  t = task(ctx.config, latent_shape(ctx, codec), ctx.data.num_classes)
  return t.model, ctx.load(t), codec


def run(ctx) -> None:
  codec = autoencoder.load_codec(ctx)
  images = ctx.data.target.images
  z_dom = domain_codes(ctx, images)
  latents = autoencoder.encode_images(ctx, codec, images)
  arrays = {'latent': latents.astype(np.float32), 'z_dom': z_dom.astype(np.float32)}
  if ctx.config.diffusion.mask_condition == 'pseudo_labels':
    arrays['label_channels'] = mask_condition.label_channels(pseudo_labels(ctx, images), ctx.data.num_classes,
                                                             codec.downsample)
  ctx.train(task(ctx.config, latent_shape(ctx, codec), ctx.data.num_classes), arrays,
            augment=ctx.config.diffusion.augment)


def pseudo_labels(ctx, images: np.ndarray, student_model=None) -> np.ndarray:
  """[N, H, W] int32: the labels of target images that a mask-conditioned denoiser (and the rendered region)
  learns each class's target appearance from: the student's segmentation, or with
  diffusion.pseudo_labels_from=diffuseg a first DiffuSeg round's (relabel.py)."""
  if ctx.config.diffusion.pseudo_labels_from == 'diffuseg':
    return relabel.target_labels(ctx, images)
  model, params = student_model or student.load(ctx)
  return np.asarray(inference.batched_apply(functools.partial(inference.ffd_vae_labels, model=model), images,
                                            ctx.config.eval.batch_size, ctx.mesh, args=(params,)), np.int32)
