"""Stage `segment`: a segmentation UNet per training strategy of the paper's Table II, per seed.

  transfer  source images + source labels (no target data: the domain-shift baseline)
  self      target training images + their REAL labels: an ORACLE upper bound that DiffuSeg never sees
  semi      target images + real labels, plus the synthetic pairs (semi-self-learning; also oracle data)
  diffuseg  synthetic (image, given label) pairs only: the method

Checkpoints: checkpoints/segment/<strategy>_seed<k>/. Batches: {'image': [B,H,W,C], 'label': [B,H,W]}.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffuseg_jax import logs, losses, runtime
from diffuseg_jax.config_validation import parse_strategies
from diffuseg_jax.errors import UserError
from diffuseg_jax.models.seg_unet import build_seg_unet
from diffuseg_jax.synthetic_io import load_synthetic
from diffuseg_jax.train import init as train_init
from diffuseg_jax.train.loop import fit
from diffuseg_jax.train.state import make_optimizer

ORACLE = {'self', 'semi'}


def runs(ctx) -> list[tuple[str, int]]:
  strategies = parse_strategies(ctx.config.segmentation.strategies)
  return [(s, int(seed)) for s in strategies for seed in ctx.config.segmentation.seeds]


def run_dir(ctx, strategy: str, seed: int) -> str:
  return ctx.path('checkpoints', 'segment', f'{strategy}_seed{seed}')


def is_done(ctx) -> bool:
  steps = ctx.config.segmentation.steps
  return all(train_init.final_step_reached(run_dir(ctx, s, k), steps) for s, k in runs(ctx))


def training_arrays(ctx, strategy: str) -> dict[str, np.ndarray]:
  data = ctx.data
  if strategy == 'transfer':
    return {'image': data.source.images, 'label': data.source.labels}
  if strategy in ORACLE and not data.target.labelled:
    raise UserError(f'segmentation strategy {strategy!r} needs labelled target training images, which '
                    f'{ctx.config.data.name!r} does not provide; drop it from config.segmentation.strategies')
  if strategy == 'self':
    return {'image': data.target.images, 'label': data.target.labels}
  synthetic = load_synthetic(ctx)
  if strategy == 'diffuseg':
    return {'image': synthetic['image'], 'label': synthetic['label']}
  return {  # semi
      'image': np.concatenate([data.target.images, synthetic['image']]),
      'label': np.concatenate([data.target.labels, synthetic['label']]),
  }


def _parts(ctx, seed: int):
  cfg = ctx.config.segmentation
  model = build_seg_unet(cfg, ctx.data.num_classes, runtime.compute_dtype(ctx.config))
  shape = (1, *ctx.data.image_size, ctx.data.channels)

  def init_params(key):
    return model.init(key, jnp.zeros(shape, jnp.float32))['params']

  tx = make_optimizer(cfg.learning_rate, cfg.steps, ctx.config.train)
  rng = jax.random.fold_in(ctx.rng('segment'), seed)
  return model, init_params, tx, rng


def seg_step(model, num_classes, state, batch, rng, frozen):
  """Cross-entropy + soft Dice (foreground and background) on one-hot labels."""
  del rng, frozen

  def loss_fn(params):
    logits = model.apply({'params': params}, batch['image'])
    ce = losses.cross_entropy(logits, batch['label'])
    dice = losses.soft_dice_loss(jax.nn.softmax(logits), jax.nn.one_hot(batch['label'], num_classes))
    return ce + dice, {'ce': ce, 'dice_loss': dice}

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads), {**metrics, 'loss': loss}


def load(ctx, strategy: str, seed: int):
  """(model, EMA params) of one finished segmentation run."""
  model, init_params, tx, rng = _parts(ctx, seed)
  abstract = train_init.abstract_train_state(init_params, rng, tx, ctx.config.train.ema_decay)
  ema_params = train_init.restore_final_ema_params(run_dir(ctx, strategy, seed), abstract, ctx.mesh,
                                                   f'segmentation run {strategy} seed {seed}', ctx.restored)
  return model, ema_params


def run(ctx) -> None:
  cfg = ctx.config.segmentation
  for strategy, seed in runs(ctx):
    if train_init.final_step_reached(run_dir(ctx, strategy, seed), cfg.steps):
      continue
    arrays = training_arrays(ctx, strategy)
    model, init_params, tx, rng = _parts(ctx, seed)
    state = train_init.create_train_state(init_params, rng, tx, ctx.config.train.ema_decay, ctx.mesh)
    note = ' (oracle: uses real target labels)' if strategy in ORACLE else ''
    logs.say(f'[segment] {strategy} seed {seed}: {len(arrays["image"])} training images{note}')
    fit(
        stage=f'segment_{strategy}_seed{seed}', ctx=ctx, state=state,
        step_fn=functools.partial(seg_step, model, ctx.data.num_classes), arrays=arrays,
        batch_size=cfg.batch_size, num_steps=cfg.steps, rng=rng, augment=cfg.augment,
        checkpoint_dir=run_dir(ctx, strategy, seed),
    )
