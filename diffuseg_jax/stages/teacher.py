"""Stage `teacher`: FFD-VAE S on labelled source images (paper section III-B).

Batches: {'image': [B,H,W,C] f32 in [-1,1], 'label': [B,H,W] int32}. Loss: seg_weight (CE + soft Dice),
L2 reconstruction, beta (KL(z_seg) + KL(z_dom)) (`losses.teacher_loss`). `vae.augment_source_intensity`
gives each source image random intensities (`data/intensity.py`; by default a random value per labelled class,
or a random intensity curve, as `vae.source_intensity_curves` says; with `vae.augment_source_bias_blur` also a
random bias field and blur): a teacher that does not rely on the source's contrast labels the target better,
and the student, `r(m)` and the pseudo-labels inherit that. `vae.select='val'`: the weights whose segmentation
head scores best on the labelled target validation split (selection.py) are the teacher the student distils;
how long a teacher should be trained before it fits the source's appearance depends on the data.
"""

from __future__ import annotations

import functools

import jax

from diffuseg_jax import inference, logs, losses, runtime, selection
from diffuseg_jax.data import DataSpec
from diffuseg_jax.models.ffd_vae import build_ffd_vae
from diffuseg_jax.train.state import make_optimizer
from diffuseg_jax.train.task import Task, linen_init, named_rng


def ffd_vae_task(config, spec: DataSpec, role: str, loss_fn, num_steps: int) -> Task:
  """The FFD-VAE network as the task `role` ('teacher' or 'student'): same architecture, own loss and steps."""
  cfg = config.vae
  model = build_ffd_vae(cfg, num_classes=spec.num_classes, channels=spec.channels,
                        dtype=runtime.compute_dtype(config, 'vae'))
  return Task(
      name=role, model=model,
      init_params=linen_init(model, jax.ShapeDtypeStruct((1, *spec.image_shape), 'float32'),
                             rng_names=('params', 'latent')),
      loss_fn=functools.partial(loss_fn, model, cfg),
      optimizer=make_optimizer(cfg.learning_rate, num_steps, config.train),
      num_steps=int(num_steps), batch_size=int(cfg.batch_size), checkpoint=role, rng=named_rng(config.seed, role),
      ema_decay=float(config.train.ema_decay), learning_rate_field='vae.learning_rate')


def loss_fn(model, vae_config, params, batch, rng, frozen, *, sample: bool = True):
  """CE + soft Dice on source labels, L2 reconstruction, beta * KL. `sample=False` uses posterior means
  (deterministic; the benchmarks compare it across frameworks)."""
  del frozen
  out = model.apply({'params': params}, batch['image'], sample=sample, rngs={'latent': rng})
  return losses.teacher_loss(out, batch['image'], batch['label'], num_classes=model.num_classes,
                             beta=vae_config.beta, seg_weight=vae_config.seg_weight)


def task(config, spec: DataSpec) -> Task:
  return ffd_vae_task(config, spec, 'teacher', loss_fn, config.vae.teacher_steps)


def units(ctx) -> list[str]:
  return ['teacher']


def load(ctx):
  """EMA params of the finished teacher (the weights the student distils; chosen on validation with
  `vae.select='val'`)."""
  return selection.load_chosen(ctx, task(ctx.config, ctx.data.spec))


def train_chosen(ctx, t: Task, arrays, **train_kwargs) -> None:
  """ctx.train for an FFD-VAE task (teacher or student), its weights chosen by its segmentation head's Dice on
  the labelled validation split when `vae.select='val'` and the data has one (selection.train_choosing)."""
  labels = functools.partial(inference.ffd_vae_labels, model=t.model)

  def predict(params, images):
    return inference.batched_apply(labels, images, ctx.config.eval.batch_size, ctx.mesh, args=(params,))

  chooser = selection.train_choosing(ctx, t, arrays, field='vae.select', every=int(ctx.config.vae.select_every),
                                     predict=predict, **train_kwargs)
  if chooser is not None:
    logs.say(f'[{t.name}] step {chooser.best_step} chosen on the validation split (segmentation head Dice '
             f'{chooser.best:.3f}, {len(ctx.data.val)} images)')


def run(ctx) -> None:
  data = ctx.data
  train_chosen(ctx, task(ctx.config, data.spec), {'image': data.source.images, 'label': data.source.labels},
               intensity=bool(ctx.config.vae.augment_source_intensity), curves=ctx.config.vae.source_intensity_curves,
               bias_blur=bool(ctx.config.vae.augment_source_bias_blur))
