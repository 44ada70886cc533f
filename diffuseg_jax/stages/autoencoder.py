"""Stage `autoencoder`: the latent space of the diffusion model.

  identity    pixel space (tiny images): nothing to train
  kl          a KL autoencoder trained here on target images (L2 reconstruction + kl_weight * KL)
  pretrained  a local diffusers Flax autoencoder directory (config.autoencoder.path); never downloaded

The latent scaling factor (1 / std of training latents, LDM's rule, unless config.autoencoder.scaling_factor
is set) is stored in metrics.json["autoencoder"] so every later stage uses the same one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffuseg_jax import logs, losses, runtime
from diffuseg_jax.inference import batched_apply
from diffuseg_jax.models import latent
from diffuseg_jax.models.autoencoder import build_kl_autoencoder
from diffuseg_jax.stages.ffd_vae_report import psnr
from diffuseg_jax.train import init as train_init
from diffuseg_jax.train.loop import fit
from diffuseg_jax.train.state import make_optimizer


def _parts(ctx):
  cfg = ctx.config.autoencoder
  model = build_kl_autoencoder(cfg, ctx.data.channels, runtime.compute_dtype(ctx.config))
  shape = (1, *ctx.data.image_size, ctx.data.channels)

  def init_params(key):
    k1, k2 = jax.random.split(key)
    return model.init({'params': k1, 'latent': k2}, jnp.zeros(shape))['params']

  tx = make_optimizer(cfg.learning_rate, cfg.steps, ctx.config.train)
  return model, init_params, tx


def ae_step(model, kl_weight, state, batch, rng, frozen):
  del frozen
  rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    out = model.apply({'params': params}, batch['image'], sample=True, rngs={'latent': rng})
    rec = losses.l2_reconstruction(batch['image'], out['recon'])
    kl = losses.gaussian_kl(out['mean'], out['logvar'])
    return rec + kl_weight * kl, {'rec': rec, 'kl': kl}

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads), {**metrics, 'loss': loss}


def skip_note(ctx) -> str:
  if ctx.config.autoencoder.kind == 'identity':
    return 'pixel-space diffusion (autoencoder.kind=identity): nothing to train'
  return f'already done in {ctx.workdir}: skipped'


def is_done(ctx) -> bool:
  if ctx.config.autoencoder.kind == 'identity':
    return True
  if ctx.config.autoencoder.kind == 'pretrained':
    return 'autoencoder' in ctx.read_metrics()
  return (train_init.final_step_reached(ctx.checkpoint_dir('autoencoder'), ctx.config.autoencoder.steps)
          and 'autoencoder' in ctx.read_metrics())


def encode_images(ctx, codec: latent.LatentCodec, images: np.ndarray) -> np.ndarray:
  """Posterior-mean scaled latents [N, h, w, c] of images [N, H, W, C]."""
  return batched_apply(jax.jit(lambda x, c: c.encode(x)), images, ctx.config.eval.batch_size, ctx.mesh,
                       args=(codec,))


def decode_latents(ctx, codec: latent.LatentCodec, z: np.ndarray) -> np.ndarray:
  return batched_apply(jax.jit(lambda z, c: c.decode(z)), z, ctx.config.eval.batch_size, ctx.mesh, args=(codec,))


def _unscaled_codec(ctx) -> latent.LatentCodec:
  cfg = ctx.config.autoencoder
  if cfg.kind == 'identity':
    return latent.identity_codec(ctx.data.channels, 1.0 if cfg.scaling_factor is None else cfg.scaling_factor)
  if cfg.kind == 'pretrained':
    return latent.build_codec(cfg, ctx.data.channels, dtype=runtime.compute_dtype(ctx.config))
  model, init_params, tx = _parts(ctx)
  abstract = train_init.abstract_train_state(init_params, ctx.rng('autoencoder'), tx, ctx.config.train.ema_decay)
  ema_params = train_init.restore_final_ema_params(ctx.checkpoint_dir('autoencoder'), abstract, ctx.mesh,
                                                   'the autoencoder', ctx.restored)
  return latent.kl_codec(model, ema_params, 1.0)


def load_codec(ctx) -> latent.LatentCodec:
  """The codec every later stage uses (scaling factor from this stage's metrics)."""
  codec = _unscaled_codec(ctx)
  if ctx.config.autoencoder.kind == 'identity':
    return codec
  stored = ctx.read_metrics().get('autoencoder', {}).get('scaling_factor')
  if stored is None:
    from diffuseg_jax.errors import UserError

    raise UserError(f'no latent scaling factor in {ctx.path("metrics.json")}: run stage autoencoder first')
  return latent.with_scaling_factor(codec, stored)


def run(ctx) -> None:
  cfg = ctx.config.autoencoder
  if cfg.kind == 'kl':
    model, init_params, tx = _parts(ctx)
    state = train_init.create_train_state(init_params, ctx.rng('autoencoder'), tx, ctx.config.train.ema_decay,
                                          ctx.mesh)
    fit(stage='autoencoder', ctx=ctx, state=state, step_fn=functools.partial(ae_step, model, cfg.kl_weight),
        arrays={'image': ctx.data.target.images}, batch_size=cfg.batch_size, num_steps=cfg.steps,
        rng=ctx.rng('autoencoder'))
  codec = _unscaled_codec(ctx)
  sample = ctx.data.target.images[:1000]
  if cfg.scaling_factor is not None:
    scale = float(cfg.scaling_factor)
  elif cfg.kind == 'pretrained':
    scale = float(codec.scaling_factor)
  else:
    z = encode_images(ctx, latent.with_scaling_factor(codec, 1.0), sample)
    scale = float(1.0 / max(np.std(z), 1e-8))
  codec = latent.with_scaling_factor(codec, scale)
  recon = decode_latents(ctx, codec, encode_images(ctx, codec, ctx.data.test.images[:1000]))
  result = {'kind': cfg.kind, 'scaling_factor': scale,
            'psnr_target_test': float(np.mean(psnr(recon, ctx.data.test.images[:1000]))),
            'downsample': codec.downsample, 'latent_channels': codec.latent_channels}
  ctx.update_metrics('autoencoder', result)
  logs.say(f'[autoencoder] {result}')
