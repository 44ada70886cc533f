"""FFD-VAE training, shared by stage `teacher` (S on source, labelled) and stage `student` (T on target,
distilled from the frozen S; paper eq. 1-6).

Batches: teacher {'image': [B,H,W,C] f32 in [-1,1], 'label': [B,H,W] int32}; student {'image': ...}.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from diffuseg_jax import losses, runtime
from diffuseg_jax.models.ffd_vae import build_ffd_vae
from diffuseg_jax.train import init as train_init
from diffuseg_jax.train.state import make_optimizer

ROLES = {'teacher': 'teacher_steps', 'student': 'student_steps'}


def build_model(ctx):
  data = ctx.data
  return build_ffd_vae(ctx.config.vae, num_classes=data.num_classes, channels=data.channels,
                       dtype=runtime.compute_dtype(ctx.config))


def _init_params(model, image_shape, key):
  k1, k2 = jax.random.split(key)
  return model.init({'params': k1, 'latent': k2}, jnp.zeros((1, *image_shape), jnp.float32))['params']


def num_steps(ctx, role: str) -> int:
  return int(ctx.config.vae[ROLES[role]])


def _state_parts(ctx, role: str):
  model = build_model(ctx)
  shape = (*ctx.data.image_size, ctx.data.channels)
  init_params = functools.partial(_init_params, model, shape)
  tx = make_optimizer(ctx.config.vae.learning_rate, num_steps(ctx, role), ctx.config.train)
  return model, init_params, tx


def build_state(ctx, role: str):
  model, init_params, tx = _state_parts(ctx, role)
  state = train_init.create_train_state(init_params, ctx.rng(role), tx, ctx.config.train.ema_decay, ctx.mesh)
  return model, state


def load(ctx, role: str):
  """(model, EMA params) of a finished teacher/student stage."""
  model, init_params, tx = _state_parts(ctx, role)
  abstract = train_init.abstract_train_state(init_params, ctx.rng(role), tx, ctx.config.train.ema_decay)
  ema_params = train_init.restore_final_ema_params(ctx.checkpoint_dir(role), abstract, ctx.mesh,
                                                   f'the {role} FFD-VAE', ctx.restored)
  return model, ema_params


def is_trained(ctx, role: str) -> bool:
  return train_init.final_step_reached(ctx.checkpoint_dir(role), num_steps(ctx, role))


def teacher_step(model, vae_config, num_classes, state, batch, rng, frozen):
  """One teacher step: CE + soft Dice on source labels, L2 reconstruction, beta * KL."""
  del frozen
  rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    out = model.apply({'params': params}, batch['image'], sample=True, rngs={'latent': rng})
    return losses.teacher_loss(
        out, batch['image'], batch['label'], num_classes=num_classes, beta=vae_config.beta,
        seg_weight=vae_config.seg_weight,
    )

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads), {**metrics, 'loss': loss}


def student_step(model, vae_config, state, batch, rng, teacher_params):
  """One student step (eq. 6): L_rec + lam * (L_kd + alpha * L_latent) + beta * KL, teacher frozen."""
  rng = jax.random.fold_in(rng, state.step)
  teacher_out = model.apply({'params': teacher_params}, batch['image'], sample=False)
  teacher_out = jax.lax.stop_gradient(teacher_out)

  def loss_fn(params):
    out = model.apply({'params': params}, batch['image'], sample=True, rngs={'latent': rng})
    return losses.student_loss(
        out, teacher_out, batch['image'], alpha=vae_config.alpha, lam=vae_config.lam, beta=vae_config.beta,
        dist=vae_config.dist, latent_temperature=vae_config.latent_temperature,
    )

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads), {**metrics, 'loss': loss}
