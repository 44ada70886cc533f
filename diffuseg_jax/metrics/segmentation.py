"""Segmentation metrics: Dice, IoU (= Jaccard), Hausdorff distance and HD95, per class and per case.

Host-side numpy/scipy. Label maps are integer class indices 0..K-1 with 0 = background; every score is
reported for the FOREGROUND classes only, so per-class arrays have length K-1 and index j holds class j+1.

Definitions (one case = one 2D image, or one 3D volume assembled from its slices):
  Dice     2|P∩G| / (|P|+|G|)
  IoU      |P∩G| / |P∪G|. The paper's Jaccard index (JI) is the same quantity; we report it once, as IoU.
  HD       max(max_{a∈∂P} d(a,∂G), max_{b∈∂G} d(b,∂P)), the symmetric Hausdorff distance between surfaces.
  HD95     the `hd_percentile`-th percentile of the POOLED symmetric surface distances,
           percentile(hstack(d(∂P->∂G), d(∂G->∂P))), the medpy `hd95` definition.
Distances are Euclidean in physical units (mm for medical data, pixels when spacing = 1).

Surfaces: ∂M = M XOR binary_erosion(M, S), with S = generate_binary_structure(ndim, connectivity).
The default connectivity=1 (the cross/face-connected element) is medpy's default, so HD/HD95 numbers are
comparable with those published with it. Voxels on the image edge count as surface (outside is background).

Empty structures, per case and class:
  - absent from both prediction and ground truth: the class is ABSENT in that case; all four scores are NaN
    and it is excluded from averages (`summarise` reports how many cases each class was present in);
  - present in exactly one: Dice = IoU = 0 and HD = HD95 = the diagonal of the image extent,
    sqrt(sum_i (shape_i * spacing_i)^2), the worst possible distance, so a miss is penalised, never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

SCORE_NAMES = ('dice', 'iou', 'hd', 'hd95')


def _boundary(mask: np.ndarray, connectivity: int) -> np.ndarray:
  structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
  return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float],
                      connectivity: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Directed surface distances (d(∂a->∂b) [Na], d(∂b->∂a) [Nb]) for two NON-empty boolean masks.

  Both masks are cropped to the bounding box of their union first (exact: no foreground lies outside it,
  so neither the surfaces nor the nearest surface points change), which keeps 3D volumes cheap.
  """
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  box = ndimage.find_objects((a | b).astype(np.int8))[0]
  a, b = a[box], b[box]
  ba, bb = _boundary(a, connectivity), _boundary(b, connectivity)
  dist_to_b = ndimage.distance_transform_edt(~bb, sampling=spacing)
  dist_to_a = ndimage.distance_transform_edt(~ba, sampling=spacing)
  return dist_to_b[ba], dist_to_a[bb]


def per_class_scores(pred: np.ndarray, gt: np.ndarray, num_classes: int, spacing: Sequence[float],
                     hd_percentile: float = 95.0, connectivity: int = 1) -> dict[str, np.ndarray]:
  """Scores of one case.

  Args:
    pred, gt: integer label maps of the same shape, [H, W] or [D, H, W].
    num_classes: K, including background.
    spacing: physical voxel size per axis (len = ndim), e.g. (slice, h, w) in mm for [D, H, W].
    hd_percentile: percentile for 'hd95' (the key keeps its name whatever the percentile).
    connectivity: structuring-element connectivity for the surface (see module docstring).
  Returns:
    {'dice', 'iou', 'hd', 'hd95'}: float64 [K-1]; index j is class j+1; NaN where the class is absent.
  """
  pred, gt = np.asarray(pred), np.asarray(gt)
  if pred.shape != gt.shape:
    raise ValueError(f'pred shape {pred.shape} != gt shape {gt.shape}')
  spacing = tuple(float(s) for s in spacing)
  if len(spacing) != pred.ndim:
    raise ValueError(f'spacing {spacing} must have one entry per axis of shape {pred.shape}')
  worst = float(np.sqrt(np.sum((np.asarray(pred.shape) * np.asarray(spacing)) ** 2)))
  out = {k: np.full(num_classes - 1, np.nan) for k in SCORE_NAMES}
  for c in range(1, num_classes):
    p, g = pred == c, gt == c
    np_, ng = int(p.sum()), int(g.sum())
    if np_ == 0 and ng == 0:
      continue
    inter = int(np.logical_and(p, g).sum())
    out['dice'][c - 1] = 2.0 * inter / (np_ + ng)
    out['iou'][c - 1] = inter / (np_ + ng - inter)
    if np_ == 0 or ng == 0:
      out['hd'][c - 1] = out['hd95'][c - 1] = worst
      continue
    d_pg, d_gp = surface_distances(p, g, spacing, connectivity)
    out['hd'][c - 1] = max(d_pg.max(), d_gp.max())
    out['hd95'][c - 1] = np.percentile(np.hstack([d_pg, d_gp]), hd_percentile)
  return out


def evaluate_cases(preds: np.ndarray, gts: np.ndarray, case_ids: np.ndarray, num_classes: int,
                   spacings: np.ndarray, volume_mode: bool = False, slice_index: np.ndarray | None = None,
                   hd_percentile: float = 95.0, connectivity: int = 1) -> dict[str, np.ndarray]:
  """Scores every case of a split of 2D slices.

  Args:
    preds, gts: int [N, H, W] predicted / ground-truth label maps.
    case_ids: int [N] the case each slice belongs to.
    num_classes: K, including background.
    spacings: float [N, 2] (h, w) or [N, 3] (h, w, slice) physical pixel sizes. volume_mode needs [N, 3];
      the slice spacing is the 3rd entry.
    volume_mode: True: the slices of a case are stacked (ordered by `slice_index`, or by their order in the
      arrays when it is None) into a [D, H, W] volume scored in 3D with spacing (slice, h, w); missing
      slices are not filled in. False: every slice/image is its own case, scored in 2D.
    slice_index: int [N] position of each slice in its volume (volume_mode only).
  Returns:
    {'case_ids': int [C], 'dice'|'iou'|'hd'|'hd95': float64 [C, K-1]}; C = number of volumes (volume_mode)
    or N (one row per slice, `case_ids` then repeats the slice's case id).
  """
  preds, gts = np.asarray(preds), np.asarray(gts)
  case_ids, spacings = np.asarray(case_ids), np.asarray(spacings, np.float64)
  n = preds.shape[0]
  if preds.shape != gts.shape or preds.ndim != 3:
    raise ValueError(f'preds {preds.shape} and gts {gts.shape} must both be [N, H, W]')
  if case_ids.shape != (n,) or spacings.ndim != 2 or spacings.shape[0] != n:
    raise ValueError(f'case_ids {case_ids.shape} must be [{n}] and spacings {spacings.shape} [{n}, 2|3]')
  rows, ids = [], []
  if volume_mode:
    if spacings.shape[1] != 3:
      raise ValueError(f'volume_mode needs spacings [N, 3] (h, w, slice), got {spacings.shape}')
    order = np.arange(n) if slice_index is None else np.asarray(slice_index)
    for cid in np.unique(case_ids):
      idx = np.flatnonzero(case_ids == cid)
      idx = idx[np.argsort(order[idx], kind='stable')]
      sp = spacings[idx]
      if not np.allclose(sp, sp[0]):
        raise ValueError(f'case {cid}: slices have different spacings {np.unique(sp, axis=0).tolist()}')
      h, w, s = sp[0]
      rows.append(per_class_scores(preds[idx], gts[idx], num_classes, (s, h, w), hd_percentile, connectivity))
      ids.append(cid)
  else:
    for i in range(n):
      rows.append(per_class_scores(preds[i], gts[i], num_classes, spacings[i, :2], hd_percentile,
                                   connectivity))
      ids.append(case_ids[i])
  out = {k: np.asarray([r[k] for r in rows], np.float64).reshape(len(rows), num_classes - 1)
         for k in SCORE_NAMES}
  out['case_ids'] = np.asarray(ids, case_ids.dtype)
  return out


def _mean_std(x: np.ndarray) -> tuple[float | None, float | None]:
  x = x[~np.isnan(x)]
  if x.size == 0:
    return None, None
  return float(np.mean(x)), float(np.std(x))


def summarise(per_case: dict[str, np.ndarray], class_names: Sequence[str]) -> dict[str, Any]:
  """JSON-ready summary of `evaluate_cases` output (plain Python floats/ints, None where undefined).

  '<score>_mean' / '<score>_std': mean and (population, ddof=0) std over CASES of each case's mean over its
  present foreground classes; cases with no present class are left out ('num_cases_scored' counts the rest).
  'miou': mean over classes of the per-class mean IoU (classes present in at least one case), the paper's
  mIoU. 'per_class': {name: {'<score>_mean', '<score>_std', 'num_present'}}; a class absent from every case
  has None scores and is listed in 'absent_classes'.

  Args:
    per_case: output of `evaluate_cases`, arrays [C, K-1].
    class_names: K-1 foreground names, or K names starting with the background (which is dropped).
  """
  k1 = per_case['dice'].shape[1]
  names = list(class_names)
  if len(names) == k1 + 1:
    names = names[1:]
  if len(names) != k1:
    raise ValueError(f'{len(class_names)} class names for {k1} foreground classes')
  out: dict[str, Any] = {'num_cases': int(per_case['dice'].shape[0])}
  present = ~np.isnan(per_case['dice'])
  scored = present.any(axis=1)
  out['num_cases_scored'] = int(scored.sum())
  for k in SCORE_NAMES:
    case_means = np.full(per_case[k].shape[0], np.nan)
    case_means[scored] = np.nanmean(per_case[k][scored], axis=1)
    out[f'{k}_mean'], out[f'{k}_std'] = _mean_std(case_means)
  per_class, class_iou = {}, []
  for j, name in enumerate(names):
    entry: dict[str, Any] = {'num_present': int(present[:, j].sum())}
    for k in SCORE_NAMES:
      entry[f'{k}_mean'], entry[f'{k}_std'] = _mean_std(per_case[k][:, j])
    if entry['iou_mean'] is not None:
      class_iou.append(entry['iou_mean'])
    per_class[name] = entry
  out['miou'] = float(np.mean(class_iou)) if class_iou else None
  out['per_class'] = per_class
  out['absent_classes'] = [n for n in names if per_class[n]['num_present'] == 0]
  return out
