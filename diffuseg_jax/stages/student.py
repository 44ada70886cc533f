"""Stage `student`: FFD-VAE T on unlabelled target images, distilled from the frozen teacher (eq. 1-6).

After training, T's domain encoder gives z_dom for any target image and T's segmentation head gives
target pseudo-labels. The stage then writes its diagnostics (`metrics.json["ffd_vae"]`, figures).
"""

from __future__ import annotations

import functools

from diffuseg_jax.stages import ffd_vae, ffd_vae_report
from diffuseg_jax.train.loop import fit


def is_done(ctx) -> bool:
  return ffd_vae.is_trained(ctx, 'student') and 'ffd_vae' in ctx.read_metrics()


def run(ctx) -> None:
  data, cfg = ctx.data, ctx.config.vae
  _, teacher_params = ffd_vae.load(ctx, 'teacher')
  model, state = ffd_vae.build_state(ctx, 'student')
  step = functools.partial(ffd_vae.student_step, model, cfg)
  fit(
      stage='student', ctx=ctx, state=state, step_fn=step, arrays={'image': data.target.images},
      batch_size=cfg.batch_size, num_steps=cfg.student_steps, rng=ctx.rng('student'), frozen=teacher_params,
  )
  ffd_vae_report.write(ctx)
