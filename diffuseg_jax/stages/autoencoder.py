"""Stage `autoencoder`: the latent space of the diffusion model.

  identity    pixel space (tiny images): nothing to train
  kl          a KL autoencoder trained here on target images (L2 reconstruction + kl_weight * KL)
  pretrained  a local diffusers Flax autoencoder directory (config.autoencoder.path); never downloaded

The latent scaling factor (1 / std of training latents, LDM's rule, unless config.autoencoder.scaling_factor
is set) is stored in metrics.json["autoencoder"] so every later stage uses the same one.
Batches: {'image': [B,H,W,C] f32 in [-1,1]}.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from diffuseg_jax import inference, logs, losses, runtime
from diffuseg_jax.data import DataSpec
from diffuseg_jax.errors import UserError
from diffuseg_jax.metrics.image_quality import psnr
from diffuseg_jax.models import latent
from diffuseg_jax.models.autoencoder import build_kl_autoencoder
from diffuseg_jax.train.state import make_optimizer
from diffuseg_jax.train.task import Task, linen_init, named_rng


def loss_fn(model, kl_weight, params, batch, rng, frozen):
  del frozen
  out = model.apply({'params': params}, batch['image'], sample=True, rngs={'latent': rng})
  rec = losses.l2_reconstruction(batch['image'], out['recon'])
  kl = losses.gaussian_kl(out['mean'], out['logvar'])
  return rec + kl_weight * kl, {'rec': rec, 'kl': kl}


def task(config, spec: DataSpec) -> Task:
  """The KL autoencoder (autoencoder.kind='kl')."""
  cfg = config.autoencoder
  model = build_kl_autoencoder(cfg, spec.channels, runtime.compute_dtype(config, 'autoencoder'))
  return Task(
      name='autoencoder', model=model,
      init_params=linen_init(model, jax.ShapeDtypeStruct((1, *spec.image_shape), 'float32'),
                             rng_names=('params', 'latent')),
      loss_fn=functools.partial(loss_fn, model, float(cfg.kl_weight)),
      optimizer=make_optimizer(cfg.learning_rate, cfg.steps, config.train), num_steps=int(cfg.steps),
      batch_size=int(cfg.batch_size), checkpoint='autoencoder', rng=named_rng(config.seed, 'autoencoder'),
      ema_decay=float(config.train.ema_decay), learning_rate_field='autoencoder.learning_rate')


def skip_note(ctx) -> str:
  if ctx.config.autoencoder.kind == 'identity':
    return 'pixel-space diffusion (autoencoder.kind=identity): nothing to train'
  return f'already done in {ctx.workdir}: skipped'


def units(ctx) -> list[str]:
  return [] if ctx.config.autoencoder.kind == 'identity' else ['autoencoder']


def encode_images(ctx, codec: latent.LatentCodec, images: np.ndarray) -> np.ndarray:
  """Posterior-mean scaled latents [N, h, w, c] of images [N, H, W, C]."""
  return inference.batched_apply(inference.encode, images, ctx.config.eval.batch_size, ctx.mesh, args=(codec,))


def decode_latents(ctx, codec: latent.LatentCodec, z: np.ndarray) -> np.ndarray:
  return inference.batched_apply(inference.decode, z, ctx.config.eval.batch_size, ctx.mesh, args=(codec,))


def _unscaled_codec(ctx) -> latent.LatentCodec:
  cfg = ctx.config.autoencoder
  if cfg.kind == 'identity':
    return latent.identity_codec(ctx.data.channels, 1.0 if cfg.scaling_factor is None else cfg.scaling_factor)
  if cfg.kind == 'pretrained':
    return latent.build_codec(cfg, ctx.data.channels, dtype=runtime.compute_dtype(ctx.config, 'autoencoder'))
  t = task(ctx.config, ctx.data.spec)
  return latent.kl_codec(t.model, ctx.load(t), 1.0)


def load_codec(ctx) -> latent.LatentCodec:
  """The codec every later stage uses (scaling factor from this stage's results)."""
  codec = _unscaled_codec(ctx)
  if ctx.config.autoencoder.kind == 'identity':
    return codec
  stored = (ctx.unit_results('autoencoder') or {}).get('scaling_factor') if ctx.is_complete('autoencoder') else None
  if stored is None:
    raise UserError('the autoencoder of this config is not trained yet (no latent scaling factor): run stage '
                    'autoencoder first')
  return latent.with_scaling_factor(codec, stored)


def run(ctx) -> None:
  cfg = ctx.config.autoencoder
  if cfg.kind == 'kl':
    ctx.train(task(ctx.config, ctx.data.spec), {'image': ctx.data.target.images}, complete=False)
  codec = _unscaled_codec(ctx)
  sample = ctx.data.target.images[:1000]
  if cfg.scaling_factor is not None:
    scale = float(cfg.scaling_factor)
  elif cfg.kind == 'pretrained':
    scale = float(codec.scaling_factor)
  else:
    scale = latent.scaling_factor_for(encode_images(ctx, latent.with_scaling_factor(codec, 1.0), sample))
  codec = latent.with_scaling_factor(codec, scale)
  recon = decode_latents(ctx, codec, encode_images(ctx, codec, ctx.data.test.images[:1000]))
  result = {'kind': cfg.kind, 'scaling_factor': scale,
            'psnr_target_test': float(np.mean(psnr(recon, ctx.data.test.images[:1000]))),
            'downsample': codec.downsample, 'latent_channels': codec.latent_channels}
  ctx.save_unit_results('autoencoder', result)
  ctx.complete('autoencoder', int(cfg.steps) if cfg.kind == 'kl' else None)
  logs.say(f'[autoencoder] {result}')
