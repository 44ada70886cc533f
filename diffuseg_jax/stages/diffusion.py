"""Stage `diffusion`: the eps-prediction UNet D(x_t, t, z_dom) on target latents (paper eq. 7).

z_dom = posterior mean of the frozen student's domain encoder on the SAME target image; latents come from the
frozen autoencoder (identity in pixel space). Both are computed once before training (they are frozen), so a
step only runs the UNet. Condition dropout (config.diffusion.cond_dropout) trains the null condition that
classifier-free guidance needs. Batches: {'latent': [B,h,w,C] f32, 'z_dom': [B,D] f32}.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffuseg_jax import losses, runtime
from diffuseg_jax.inference import batched_apply
from diffuseg_jax.models.cond_unet import build_cond_unet
from diffuseg_jax.sampling import schedules
from diffuseg_jax.stages import autoencoder, ffd_vae
from diffuseg_jax.train import init as train_init
from diffuseg_jax.train.loop import fit
from diffuseg_jax.train.state import make_optimizer


def schedule(ctx) -> schedules.Schedule:
  c = ctx.config.diffusion
  return schedules.make_schedule(c.schedule, c.num_timesteps, c.beta_start, c.beta_end)


def _parts(ctx):
  """(codec, UNet module, init_params(key), optimiser). With diffusion.pretrained_unet_path, the UNet is a
  local diffusers Flax UNet (fine-tuned here, its weights the starting point) behind a z_dom token projection."""
  codec = autoencoder.load_codec(ctx)
  cfg, cond_dim = ctx.config.diffusion, ctx.config.vae.z_dom_dim
  h, w = ctx.data.image_size
  f = codec.downsample
  shape = (1, h // f, w // f, codec.latent_channels)
  if cfg.pretrained_unet_path:
    from diffuseg_jax.models import diffusers_adapter

    unet, unet_params = diffusers_adapter.load_pretrained_unet(cfg.pretrained_unet_path)
    model = diffusers_adapter.PretrainedCondUNet(unet, cond_dim=cond_dim, num_cond_tokens=cfg.num_cond_tokens)

    def init_params(key):
      return diffusers_adapter.init_pretrained_cond_unet(model, unet_params, key)['params']
  else:
    model = build_cond_unet(cfg, channels=codec.latent_channels, cond_dim=cond_dim,
                            dtype=runtime.compute_dtype(ctx.config))

    def init_params(key):
      return model.init(key, jnp.zeros(shape), jnp.zeros((1,), jnp.int32), jnp.zeros((1, cond_dim)),
                        jnp.zeros((1,), bool))['params']

  tx = make_optimizer(ctx.config.diffusion.learning_rate, ctx.config.diffusion.steps, ctx.config.train)
  return codec, model, init_params, tx


def domain_codes(ctx, images: np.ndarray, student=None) -> np.ndarray:
  """z_dom [N, D]: posterior means of the student's domain encoder."""
  model, params = student or ffd_vae.load(ctx, 'student')

  @jax.jit
  def encode(x, p):
    return model.apply({'params': p}, x, method='encode_dom')[0]

  return batched_apply(encode, images, ctx.config.eval.batch_size, ctx.mesh, args=(params,))


def diffusion_step(model, cond_dropout, alphas_cumprod, state, batch, rng, frozen):
  del frozen
  rng = jax.random.fold_in(rng, state.step)
  k_t, k_noise, k_drop = jax.random.split(rng, 3)
  x0 = batch['latent']
  b = x0.shape[0]
  t = jax.random.randint(k_t, (b,), 0, alphas_cumprod.shape[0])
  noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
  x_t = schedules.q_sample(x0, t, noise, alphas_cumprod)
  drop = jax.random.bernoulli(k_drop, cond_dropout, (b,))

  def loss_fn(params):
    eps = model.apply({'params': params}, x_t, t, batch['z_dom'], drop)
    return losses.diffusion_loss(noise, eps)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads), {'loss': loss}


def is_done(ctx) -> bool:
  return train_init.final_step_reached(ctx.checkpoint_dir('diffusion'), ctx.config.diffusion.steps)


def load(ctx):
  """(model, EMA params, codec) of the finished diffusion stage."""
  codec, model, init_params, tx = _parts(ctx)
  abstract = train_init.abstract_train_state(init_params, ctx.rng('diffusion'), tx, ctx.config.train.ema_decay)
  ema_params = train_init.restore_final_ema_params(ctx.checkpoint_dir('diffusion'), abstract, ctx.mesh,
                                                   'the diffusion UNet', ctx.restored)
  return model, ema_params, codec


def run(ctx) -> None:
  cfg = ctx.config.diffusion
  codec, model, init_params, tx = _parts(ctx)
  images = ctx.data.target.images
  z_dom = domain_codes(ctx, images)
  latents = autoencoder.encode_images(ctx, codec, images)
  state = train_init.create_train_state(init_params, ctx.rng('diffusion'), tx, ctx.config.train.ema_decay, ctx.mesh)
  alphas = jnp.asarray(schedule(ctx).alphas_cumprod)
  fit(
      stage='diffusion', ctx=ctx, state=state,
      step_fn=functools.partial(diffusion_step, model, float(cfg.cond_dropout), alphas),
      arrays={'latent': latents.astype(np.float32), 'z_dom': z_dom.astype(np.float32)},
      batch_size=cfg.batch_size, num_steps=cfg.steps, rng=ctx.rng('diffusion'),
  )
