"""Stage `segment`: a segmentation UNet per training strategy of the paper's Table II, per seed.

  transfer  source images + source labels (no target data: the domain-shift baseline)
  self      target training images + their REAL labels: an ORACLE upper bound that DiffuSeg never sees
  semi      target images + real labels, plus the synthetic pairs (semi-self-learning; also oracle data)
  diffuseg  synthetic (image, given label) pairs only: the method
  diffuseg_st  DiffuSeg, then one round of self-training (beyond the paper): the synthetic pairs plus the
           unlabelled target training images with the diffuseg segmenter's (same seed) predictions as labels,
           pixels below `segmentation.st_threshold` confidence ignored by the loss (losses.IGNORE)

Units: segment/<strategy>_seed<k> (run_identity.py). Batches: {'image': [B,H,W,C], 'label': [B,H,W]}.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from diffuseg_jax import inference, logs, losses, runtime, selection
from diffuseg_jax.data import DataSpec
from diffuseg_jax.errors import UserError
from diffuseg_jax.inference import batched_apply
from diffuseg_jax.models.seg_unet import build_seg_unet
from diffuseg_jax.options import parse_names
from diffuseg_jax.run_identity import SELF_TRAINED, STRATEGIES, intensity_augmented_strategies, run_name
from diffuseg_jax.synthetic_io import load_synthetic
from diffuseg_jax.train.state import make_optimizer
from diffuseg_jax.train.task import Task, linen_init, named_rng

ORACLE = {'self', 'semi'}


def runs(ctx) -> list[tuple[str, int]]:
  """(strategy, seed) of every segmentation run, in STRATEGIES order (a self-trained strategy after the one
  that labels its target images)."""
  strategies = parse_names(ctx.config.segmentation.strategies, STRATEGIES, 'segmentation.strategies')
  strategies = sorted(strategies, key=STRATEGIES.index)
  return [(s, int(seed)) for s in strategies for seed in ctx.config.segmentation.seeds]


def loss_fn(model, params, batch, rng, frozen, *, ignore: bool = False):
  """Cross-entropy + soft Dice (foreground and background) on one-hot labels; `ignore`: pixels labelled
  losses.IGNORE count in neither (self-training)."""
  del rng, frozen
  terms = losses.masked_segmentation_losses if ignore else losses.segmentation_losses
  ce, dice = terms(model.apply({'params': params}, batch['image']), batch['label'], model.num_classes)
  return ce + dice, {'ce': ce, 'dice_loss': dice}


def task(config, spec: DataSpec, strategy: str, seed: int) -> Task:
  cfg = config.segmentation
  model = build_seg_unet(cfg, spec.num_classes, runtime.compute_dtype(config, 'segmentation'))
  return Task(
      name=f'segment_{strategy}_seed{seed}', model=model,
      init_params=linen_init(model, jax.ShapeDtypeStruct((1, *spec.image_shape), 'float32')),
      loss_fn=functools.partial(loss_fn, model, ignore=strategy in SELF_TRAINED),
      optimizer=make_optimizer(cfg.learning_rate, cfg.steps, config.train),
      num_steps=int(cfg.steps), batch_size=int(cfg.batch_size), checkpoint=f'segment/{run_name(strategy, seed)}',
      rng=jax.random.fold_in(named_rng(config.seed, 'segment'), seed), ema_decay=float(config.train.ema_decay),
      learning_rate_field='segmentation.learning_rate')


def units(ctx) -> list[str]:
  return [f'segment/{run_name(s, k)}' for s, k in runs(ctx)]


def pseudo_labels(ctx, strategy: str, seed: int) -> tuple[np.ndarray, float]:
  """The target training images' labels from `strategy`'s segmenter of `seed` (int32 [N, H, W], pixels below
  segmentation.st_threshold confidence = losses.IGNORE) and the fraction of pixels kept."""
  model, params = load(ctx, strategy, seed)
  out = batched_apply(functools.partial(inference.segment_labels_and_confidence, model=model),
                      ctx.data.target.images, ctx.config.eval.batch_size, ctx.mesh, args=(params,))
  confident = out['confidence'] >= float(ctx.config.segmentation.st_threshold)
  return np.where(confident, out['label'], losses.IGNORE).astype(np.int32), float(confident.mean())


def training_arrays(ctx, strategy: str, seed: int = 0) -> dict[str, np.ndarray]:
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
  if strategy in SELF_TRAINED:
    labels, kept = pseudo_labels(ctx, SELF_TRAINED[strategy], seed)
    logs.say(f'[segment] {strategy} seed {seed}: {len(labels)} target images pseudo-labelled by '
             f'{SELF_TRAINED[strategy]} seed {seed}, {100 * kept:.1f} % of pixels at confidence >= '
             f'{ctx.config.segmentation.st_threshold}')
    return {'image': np.concatenate([synthetic['image'], data.target.images]),
            'label': np.concatenate([synthetic['label'].astype(np.int32), labels])}
  return {  # semi
      'image': np.concatenate([data.target.images, synthetic['image']]),
      'label': np.concatenate([data.target.labels, synthetic['label']]),
  }


def load(ctx, strategy: str, seed: int):
  """(model, params) of one finished segmentation run: the EMA weights chosen on the validation split
  (selection.py), or the final ones; in a second round (relabel.py) a diffuseg segmenter's are the better
  round's on validation."""
  from diffuseg_jax import relabel  # relabel imports this module

  t = task(ctx.config, ctx.data.spec, strategy, seed)
  return t.model, selection.load_chosen(relabel.weights_context(ctx, strategy, seed), t)


def run(ctx) -> None:
  for strategy, seed in runs(ctx):
    t = task(ctx.config, ctx.data.spec, strategy, seed)
    if ctx.is_trained(t):
      continue
    arrays = training_arrays(ctx, strategy, seed)
    note = ' (oracle: uses real target labels)' if strategy in ORACLE else ''
    logs.say(f'[segment] {strategy} seed {seed}: {len(arrays["image"])} training images{note}')
    intensity = strategy in intensity_augmented_strategies(ctx.config.segmentation.augment_intensity)
    chooser = selection.train_choosing(ctx, t, arrays, field='segmentation.select',
                                       every=int(ctx.config.segmentation.select_every),
                                       augment=ctx.config.segmentation.augment, intensity=intensity)
    if chooser is not None:
      logs.say(f'[segment] {strategy} seed {seed}: step {chooser.best_step} chosen on the validation split '
               f'(Dice {chooser.best:.3f}, {len(ctx.data.val)} images)')
