"""Diagnostics of a trained FFD-VAE pair: are S and T any good, and is z_dom informative?

`diagnostics(...)` gives metrics.json["ffd_vae"]:
  teacher_dice_target / student_dice_target: mean Dice on the labelled target test split (segmentation heads)
  student_psnr_target / teacher_psnr_target: reconstruction PSNR (dB, images mapped to [0, 1])
  z_dom_variance_mean: mean over dims of the variance across target test images of T's posterior mean;
  z_dom_active_dims: dims with that variance > 0.01 (the "active units" criterion of Burda et al.);
    both None with a single test image (no variance across one image)
  z_dom_kl_per_dim: mean KL(q(z_dom|x) || N(0, I)) per dim (0 = collapsed to the prior)
  probe_accuracy_student / _teacher: 5-fold accuracy of a logistic-regression probe that tells source from
    target images by their z_dom codes (0.5 = uninformative, 1.0 = perfectly domain-specific); k-fold with
    k = min(5, n) for n < 5 images of the smaller set, None for n < 2 (no cross-validation possible)
  z_dom_anatomy_r2: how much anatomy the domain code carries, which it should not (the FFD-VAE factorises it
    into z_seg): 5-fold cross-validated R^2 of a ridge regression from T's z_dom to each target test image's
    per-class area fractions (0 = no anatomy in z_dom, 1 = z_dom gives the areas; can be negative); None
    with fewer than 10 images or constant areas
Inputs are host outputs of `inference.ffd_vae_outputs`: dicts of seg int [N, H, W], recon [N, H, W, C],
dom_mean / dom_logvar [N, D].
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.model_selection import KFold, cross_val_predict, cross_val_score

from diffuseg_jax.data import Split
from diffuseg_jax.metrics.image_quality import psnr
from diffuseg_jax.metrics.segmentation import evaluate_cases, summarise


def probe_accuracy(codes_a: np.ndarray, codes_b: np.ndarray, seed: int) -> float | None:
  """Cross-validated accuracy of telling codes_a from codes_b; None when a set has fewer than 2 codes."""
  n = min(len(codes_a), len(codes_b), 1000)
  folds = min(5, n)
  if folds < 2:
    return None
  x = np.concatenate([codes_a[:n], codes_b[:n]])
  y = np.concatenate([np.zeros(n), np.ones(n)])
  clf = LogisticRegression(max_iter=2000, random_state=seed)
  return float(np.mean(cross_val_score(clf, x, y, cv=folds)))


def area_fractions(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """[N, K-1] fraction of each image's pixels in each foreground class."""
  flat = labels.reshape(len(labels), -1)
  return np.stack([(flat == k).mean(axis=1) for k in range(1, num_classes)], axis=1)


def anatomy_r2(codes: np.ndarray, labels: np.ndarray, num_classes: int, seed: int) -> float | None:
  """Cross-validated R^2 (pooled over the folds' held-out predictions, averaged over classes with varying
  area) of predicting per-class area fractions from `codes` [N, D]; None below 10 images."""
  n = min(len(codes), len(labels))
  if n < 10:
    return None
  y = area_fractions(labels[:n], num_classes)
  varying = y.std(axis=0) > 1e-6
  if not varying.any():
    return None
  y = y[:, varying]
  model = RidgeCV(alphas=np.logspace(-3, 3, 13))
  pred = cross_val_predict(model, codes[:n], y, cv=KFold(min(5, n), shuffle=True, random_state=seed))
  r2 = 1.0 - ((y - pred) ** 2).sum(axis=0) / ((y - y.mean(axis=0)) ** 2).sum(axis=0)
  return float(np.mean(r2))


def diagnostics(test: Split, class_names, teacher_test: dict, student_test: dict, teacher_source: dict,
                student_source: dict, seed: int) -> dict:
  """The metrics above from S's and T's outputs on the target test split and on source images."""

  def dice(pred):
    per_case = evaluate_cases(pred, test.labels, test.case_ids, len(class_names), test.spacing,
                              volume_mode=False, slice_index=test.slice_index)
    return summarise(per_case, class_names)['dice_mean']

  var = np.var(student_test['dom_mean'], axis=0) if len(student_test['dom_mean']) > 1 else None
  logvar = student_test['dom_logvar']
  kl = 0.5 * (np.exp(logvar) + student_test['dom_mean'] ** 2 - 1.0 - logvar)
  return {
      'teacher_dice_target': dice(teacher_test['seg']),
      'student_dice_target': dice(student_test['seg']),
      'teacher_psnr_target': float(np.mean(psnr(teacher_test['recon'], test.images))),
      'student_psnr_target': float(np.mean(psnr(student_test['recon'], test.images))),
      'z_dom_variance_mean': None if var is None else float(np.mean(var)),
      'z_dom_active_dims': None if var is None else int(np.sum(var > 0.01)),
      'z_dom_dims': int(student_test['dom_mean'].shape[1]),
      'z_dom_kl_per_dim': float(np.mean(kl)),
      'probe_accuracy_student': probe_accuracy(student_source['dom_mean'], student_test['dom_mean'], seed),
      'probe_accuracy_teacher': probe_accuracy(teacher_source['dom_mean'], teacher_test['dom_mean'], seed),
      'z_dom_anatomy_r2': anatomy_r2(student_test['dom_mean'], test.labels, len(class_names), seed),
  }
