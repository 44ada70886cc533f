"""Diagnostics of the trained FFD-VAE pair (after stage `student`): are S and T any good, and is z_dom
informative?

metrics.json["ffd_vae"]:
  teacher_dice_target / student_dice_target: mean Dice on the labelled target test split (segmentation heads)
  student_psnr_target / teacher_psnr_target: reconstruction PSNR (dB, images mapped to [0, 1])
  z_dom_variance_mean: mean over dims of the variance across target test images of T's posterior mean;
  z_dom_active_dims: dims with that variance > 0.01 (the "active units" criterion of Burda et al.)
  z_dom_kl_per_dim: mean KL(q(z_dom|x) || N(0, I)) per dim (0 = collapsed to the prior)
  probe_accuracy_student / _teacher: 5-fold accuracy of a logistic-regression probe that tells source from
    target images by their z_dom codes (0.5 = uninformative, 1.0 = perfectly domain-specific)
Figures: figures/ffd_vae_reconstructions.png, figures/ffd_vae_segmentations.png.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from diffuseg_jax import figures, logs
from diffuseg_jax.inference import batched_apply
from diffuseg_jax.metrics.segmentation import evaluate_cases, summarise
from diffuseg_jax.stages import ffd_vae


def psnr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Per-image PSNR (dB) of images in [-1, 1], measured on the [0, 1] scale."""
  a = np.clip((x + 1) / 2, 0, 1)
  b = np.clip((y + 1) / 2, 0, 1)
  mse = np.mean((a - b) ** 2, axis=tuple(range(1, a.ndim)))
  return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))


def make_infer(model):
  @jax.jit
  def infer(x, params):
    out = model.apply({'params': params}, x, sample=False)
    return {
        'seg': jnp.argmax(out['seg_logits'], -1).astype(jnp.int32),
        'recon': out['recon'],
        'dom_mean': out['dom_mean'],
        'dom_logvar': out['dom_logvar'],
    }

  return infer


def probe_accuracy(codes_a: np.ndarray, codes_b: np.ndarray, seed: int) -> float:
  n = min(len(codes_a), len(codes_b), 1000)
  x = np.concatenate([codes_a[:n], codes_b[:n]])
  y = np.concatenate([np.zeros(n), np.ones(n)])
  folds = min(5, n)
  if folds < 2:
    return float('nan')
  clf = LogisticRegression(max_iter=2000, random_state=seed)
  return float(np.mean(cross_val_score(clf, x, y, cv=folds)))


def write(ctx) -> dict:
  data, cfg = ctx.data, ctx.config
  model, s_params = ffd_vae.load(ctx, 'teacher')
  _, t_params = ffd_vae.load(ctx, 'student')
  infer = make_infer(model)
  bs = cfg.eval.batch_size
  test = data.test
  s_test = batched_apply(infer, test.images, bs, ctx.mesh, args=(s_params,))
  t_test = batched_apply(infer, test.images, bs, ctx.mesh, args=(t_params,))
  n_src = min(len(data.source), 1000)
  t_src = batched_apply(infer, data.source.images[:n_src], bs, ctx.mesh, args=(t_params,))
  s_src = batched_apply(infer, data.source.images[:n_src], bs, ctx.mesh, args=(s_params,))

  def dice(pred):
    per_case = evaluate_cases(pred, test.labels, test.case_ids, data.num_classes, test.spacing,
                              volume_mode=False, slice_index=test.slice_index)
    return summarise(per_case, data.class_names)['dice_mean']

  var = np.var(t_test['dom_mean'], axis=0)
  kl = 0.5 * (np.exp(t_test['dom_logvar']) + t_test['dom_mean'] ** 2 - 1.0 - t_test['dom_logvar'])
  result = {
      'teacher_dice_target': dice(s_test['seg']),
      'student_dice_target': dice(t_test['seg']),
      'teacher_psnr_target': float(np.mean(psnr(s_test['recon'], test.images))),
      'student_psnr_target': float(np.mean(psnr(t_test['recon'], test.images))),
      'z_dom_variance_mean': float(np.mean(var)),
      'z_dom_active_dims': int(np.sum(var > 0.01)),
      'z_dom_dims': int(var.shape[0]),
      'z_dom_kl_per_dim': float(np.mean(kl)),
      'probe_accuracy_student': probe_accuracy(t_src['dom_mean'], t_test['dom_mean'], cfg.seed),
      'probe_accuracy_teacher': probe_accuracy(s_src['dom_mean'], s_test['dom_mean'], cfg.seed),
  }
  ctx.update_metrics('ffd_vae', result)
  if ctx.is_main_process:
    k = min(cfg.eval.num_figure_examples, len(test))
    figures.image_rows(
        [test.images[:k], s_test['recon'][:k], t_test['recon'][:k]],
        ['target image', 'S (teacher)\nreconstruction', 'T (student)\nreconstruction'],
        ctx.path('figures', 'ffd_vae_reconstructions.png'),
        title=f'PSNR on target test: S {result["teacher_psnr_target"]:.1f} dB, '
              f'T {result["student_psnr_target"]:.1f} dB',
    )
    figures.image_rows(
        [test.images[:k], test.images[:k], test.images[:k]],
        ['ground truth', 'S (teacher)', 'T (student)'],
        ctx.path('figures', 'ffd_vae_segmentations.png'),
        labels=[test.labels[:k], s_test['seg'][:k], t_test['seg'][:k]], num_classes=data.num_classes,
        title=f'target test Dice: S {result["teacher_dice_target"]:.3f}, T {result["student_dice_target"]:.3f}',
    )
  logs.say('[student] FFD-VAE diagnostics: ' + ', '.join(
      f'{k}={v:.3f}' if isinstance(v, float) else f'{k}={v}' for k, v in result.items()))
  return result
