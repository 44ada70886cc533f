"""Stage `teacher`: FFD-VAE S on labelled source images (paper section III-B)."""

from __future__ import annotations

import functools

from diffuseg_jax.stages import ffd_vae
from diffuseg_jax.train.loop import fit


def is_done(ctx) -> bool:
  return ffd_vae.is_trained(ctx, 'teacher')


def run(ctx) -> None:
  data, cfg = ctx.data, ctx.config.vae
  model, state = ffd_vae.build_state(ctx, 'teacher')
  step = functools.partial(ffd_vae.teacher_step, model, cfg, data.num_classes)
  fit(
      stage='teacher', ctx=ctx, state=state, step_fn=step,
      arrays={'image': data.source.images, 'label': data.source.labels},
      batch_size=cfg.batch_size, num_steps=cfg.teacher_steps, rng=ctx.rng('teacher'), augment=False,
  )
