"""diffusion.pseudo_labels_from='diffuseg': a second DiffuSeg round, whose target labels come from the first.

The mask-conditioned denoiser (sampling/mask_condition.py) and the pasted region's class appearance
(stages/synthesize.class_appearance) learn how each class looks in the target from labels of the unlabelled
target training images. The paper's source of them is the FFD-VAE student, whose accuracy on the target
bounds what the synthetic pairs can teach (benchmarks/QUALITY.md); the DiffuSeg segmenters trained on those
pairs often segment the target better than the student that taught them. With 'diffuseg' the labels are the
argmax of the mean softmax of a first round's diffuseg segmenters (one per segmentation seed), and the
denoiser, the synthesis and every segmenter on synthetic pairs are trained again with them.

The first round is this config with pseudo_labels_from='student' and the diffuseg strategy: its units are an
ordinary run's (the same fingerprints), so a finished run of that config in the workdir is reused, and what
is missing of it (its diffusion, synthesis and diffuseg segmenters) is trained here first. Each second-round
diffuseg segmenter's weights are the better round's on the validation split (`weights_round`): the second round
can only lose Dice where validation misjudges it. 'auto' (the default) runs the second round only where that
choice can be made (`resolve_auto`): data with a labelled validation split.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from diffuseg_jax import inference, selection, units
from diffuseg_jax.options import strategy_subset
from diffuseg_jax.run_identity import STRATEGIES, run_name
from diffuseg_jax.stages import segment

SOURCES = ('student', 'diffuseg', 'auto')  # values of diffusion.pseudo_labels_from
FIRST_ROUND_STAGES = ('diffusion', 'synthesize', 'segment')  # the teacher, student and autoencoder are shared


def resolve_auto(ctx) -> str | None:
  """diffusion.pseudo_labels_from='auto' -> 'diffuseg' where each seed can keep the better round on a labelled
  validation split (so a second round costs time, not Dice, unless validation misjudges it), the denoiser learns
  from the labels (a mask-conditioned denoiser: what the second round was measured with, benchmarks/QUALITY.md;
  the Stable Diffusion route's is not) and a diffuseg segmenter is trained; else 'student'. Written into
  ctx.config before any fingerprint, so the run's identities and config.json record what it ran. Returns the
  line to log, or None when the field was not 'auto'."""
  config = ctx.config
  if config.diffusion.pseudo_labels_from != 'auto':
    return None
  why = selection.wants_validation(ctx, 'segmentation.select')
  if why is None and config.diffusion.mask_condition == 'none':  # measured with the mask-conditioned denoiser only
    why = 'the denoiser does not see a label map (diffusion.mask_condition=none)'
  if why is None and 'diffuseg' not in strategy_subset(config.segmentation.strategies, STRATEGIES,
                                                      'segmentation.strategies'):
    why = 'no diffuseg segmenter is trained'
  config.diffusion.pseudo_labels_from = 'student' if why else 'diffuseg'
  if why:
    return f"diffusion.pseudo_labels_from=auto -> student (one round: {why})"
  return ('diffusion.pseudo_labels_from=auto -> diffuseg (a second round, each seed keeping the round that '
          'scores higher on the validation split)')


def first_round_config(config):
  """The config of the first round: the student's labels, the diffuseg segmenters only."""
  first = config.copy_and_resolve_references()
  first.diffusion.pseudo_labels_from = 'student'
  first.segmentation.strategies = 'diffuseg'
  return first


def first_round_context(ctx):
  return ctx.with_config(first_round_config(ctx.config))


def first_round(ctx):
  """The first round's context, its units trained where they are missing (the pipeline's stage runner, its
  log lines led by '[round 1 of 2]')."""
  from diffuseg_jax import pipeline  # the pipeline imports the stages, which import this module

  first = first_round_context(ctx)
  for name in FIRST_ROUND_STAGES:
    pipeline.run_stage(first, name, label='round 1 of 2')
  return first


def target_labels(ctx, images: np.ndarray) -> np.ndarray:
  """[N, H, W] int32: the first round's diffuseg segmenters' joint segmentation of `images` [N, H, W, C]."""
  first = first_round(ctx)
  loaded = [segment.load(first, 'diffuseg', int(k)) for k in ctx.config.segmentation.seeds]
  params = tuple(p for _, p in loaded)
  return np.asarray(inference.batched_apply(functools.partial(inference.ensemble_labels, model=loaded[0][0]),
                                            images, ctx.config.eval.batch_size, ctx.mesh, args=(params,)), np.int32)


def _chosen(round_ctx, seed: int) -> dict:
  """selection.json of a round's diffuseg segmenter of `seed` ({} where there is none), read where it is:
  asking the context for the folder would create it."""
  unit = f'segment/{run_name("diffuseg", seed)}'
  path = units.unit_dir(round_ctx.workdir, unit, round_ctx.fingerprint(unit))
  return units.read_json(os.path.join(path, selection.SELECTION_FILE)) or {}


def validation_dice(ctx) -> dict[str, float | None]:
  """{'round 1', 'round 2'}: the mean over seeds of the diffuseg segmenters' validation Dice (the weights
  chosen on the validation split, selection.py) in each round, each round's own segmenters; None where a round
  has no such score. Read, never trained."""
  out = {}
  for name, round_ctx in (('round 1', first_round_context(ctx)), ('round 2', ctx)):
    scores = [_chosen(round_ctx, k).get('best_val_dice') for k in ctx.config.segmentation.seeds]
    out[name] = float(np.mean(scores)) if scores and None not in scores else None
  return out


def weights_round(ctx, seed: int) -> int:
  """Which round's weights the diffuseg segmenter of `seed` uses in a second round: 1 where the first round's
  weights score higher on the validation split than the second's (each chosen on it, selection.py), else 2.
  Where there is no validation split there is nothing to choose on, and the second round's weights are used.
  So a second round that teaches worse than the first, as measured on validation, costs time but not Dice."""
  second = _chosen(ctx, seed)
  first = _chosen(first_round_context(ctx), seed)
  if second.get('selected_on') == 'val' and first.get('selected_on') == 'val':
    if first['best_val_dice'] > second['best_val_dice']:
      return 1
  return 2


def weights_context(ctx, strategy: str, seed: int):
  """The context whose unit holds the weights of `strategy`'s segmenter of `seed`: the first round's for a
  second round's diffuseg segmenter that scores lower on validation than the first's (`weights_round`), else
  `ctx`. The choice is part of the unit's identity: its upstream lists the first round's segmenter."""
  if strategy == 'diffuseg' and ctx.config.diffusion.pseudo_labels_from == 'diffuseg' and weights_round(ctx, seed) == 1:
    return first_round_context(ctx)
  return ctx
