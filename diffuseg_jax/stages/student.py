"""Stage `student`: FFD-VAE T on unlabelled target images, distilled from the frozen teacher (eq. 1-6).

Batches: {'image': [B,H,W,C] f32 in [-1,1]}. Loss (eq. 6): L_rec + lam (L_kd + alpha L_latent) + beta KL,
the teacher S frozen (`losses.student_loss`); `vae.augment_target` randomly flips / rotates the target images
(few-shot targets); `vae.distill_on=target_and_source` adds the source images (no labels) to its training set.
After training, T's domain encoder gives z_dom for any target image and T's segmentation head gives target
pseudo-labels. The stage then writes the pair's diagnostics
(metrics/ffd_vae_diagnostics.py) to `metrics.json["ffd_vae"]`, and figures.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from diffuseg_jax import figures, inference, logs, losses, report, selection
from diffuseg_jax.data import DataSpec
from diffuseg_jax.metrics.ffd_vae_diagnostics import diagnostics
from diffuseg_jax.stages import teacher
from diffuseg_jax.train.task import Task


def loss_fn(model, vae_config, params, batch, rng, teacher_params):
  teacher_out = jax.lax.stop_gradient(model.apply({'params': teacher_params}, batch['image'], sample=False))
  out = model.apply({'params': params}, batch['image'], sample=True, rngs={'latent': rng})
  return losses.student_loss(
      out, teacher_out, batch['image'], alpha=vae_config.alpha, lam=vae_config.lam, beta=vae_config.beta,
      dist=vae_config.dist, latent_temperature=vae_config.latent_temperature)


def task(config, spec: DataSpec) -> Task:
  return teacher.ffd_vae_task(config, spec, 'student', loss_fn, config.vae.student_steps)


def load(ctx):
  """(model, EMA params) of the finished student (chosen on the validation split with `vae.select='val'`)."""
  t = task(ctx.config, ctx.data.spec)
  return t.model, selection.load_chosen(ctx, t)


DISTILL_ON = ('target', 'target_and_source')  # vae.distill_on


def distillation_images(config, data) -> np.ndarray:
  """float32 [N, H, W, C]: what the student is distilled on. `target` (default): the unlabelled target images;
  `target_and_source`: the source images too (their labels unused), the paper's "using the given segmentation
  dataset" read literally; the student then reconstructs both domains."""
  if config.vae.distill_on == 'target_and_source':
    return np.concatenate([data.target.images, data.source.images], axis=0)
  return data.target.images


def units(ctx) -> list[str]:
  return ['student']  # the trained student and its diagnostics


def run(ctx) -> None:
  data = ctx.data
  teacher_params = teacher.load(ctx)
  student = task(ctx.config, data.spec)
  teacher.train_chosen(ctx, student, {'image': distillation_images(ctx.config, data)}, frozen=teacher_params,
                       augment=ctx.config.vae.augment_target, complete=False)
  write_diagnostics(ctx, student.model, teacher_params, selection.load_chosen(ctx, student))
  ctx.complete('student', student.num_steps)


def write_diagnostics(ctx, model, teacher_params, student_params) -> dict:
  data, cfg = ctx.data, ctx.config
  test = data.test
  outputs = functools.partial(inference.ffd_vae_outputs, model=model)

  def apply(images, params):
    return inference.batched_apply(outputs, images, cfg.eval.batch_size, ctx.mesh, args=(params,))

  source = data.source.images[:min(len(data.source), 1000)]
  s_test, t_test = apply(test.images, teacher_params), apply(test.images, student_params)
  result = diagnostics(test, data.class_names, s_test, t_test, apply(source, teacher_params),
                       apply(source, student_params), cfg.seed)
  ctx.save_unit_results('student', result)
  if ctx.is_main_process:
    k = min(cfg.eval.num_figure_examples, len(test))
    figures.image_rows(
        [test.images[:k], s_test['recon'][:k], t_test['recon'][:k]],
        ['target image', 'S (teacher)\nreconstruction', 'T (student)\nreconstruction'],
        os.path.join(ctx.unit_dir('student'), 'figures', 'ffd_vae_reconstructions.png'),
        title=f'PSNR on target test: S {result["teacher_psnr_target"]:.1f} dB, '
              f'T {result["student_psnr_target"]:.1f} dB',
    )
    figures.image_rows(
        [test.images[:k], test.images[:k], test.images[:k]],
        ['ground truth', 'S (teacher)', 'T (student)'],
        os.path.join(ctx.unit_dir('student'), 'figures', 'ffd_vae_segmentations.png'),
        labels=[test.labels[:k], s_test['seg'][:k], t_test['seg'][:k]], num_classes=data.num_classes,
        title=f'target test Dice: S {report.fmt(result["teacher_dice_target"])}, '
              f'T {report.fmt(result["student_dice_target"])}',
    )
  logs.say('[student] FFD-VAE diagnostics: ' + ', '.join(
      f'{k}={v:.3f}' if isinstance(v, float) else f'{k}={v}' for k, v in result.items()))
  return result
