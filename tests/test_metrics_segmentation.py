"""Segmentation metrics vs independent references: hand counts, brute-force point distances, numpy."""

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from diffuseg_jax.metrics import segmentation as seg


def _face_boundary(mask: np.ndarray) -> np.ndarray:
  """Foreground voxels with a face-neighbour (or the image edge) in the background, by array shifts."""
  padded = np.pad(mask, 1)
  inner = tuple(slice(1, -1) for _ in range(mask.ndim))
  bg_neighbour = np.zeros_like(mask)
  for axis in range(mask.ndim):
    for shift in (-1, 1):
      bg_neighbour |= ~np.roll(padded, shift, axis=axis)[inner]
  return mask & bg_neighbour


def _brute_force_hd(a, b, spacing, q=95.0):
  pa = np.argwhere(_face_boundary(a)) * np.asarray(spacing)
  pb = np.argwhere(_face_boundary(b)) * np.asarray(spacing)
  d = cdist(pa, pb)
  d_ab, d_ba = d.min(axis=1), d.min(axis=0)
  return max(d_ab.max(), d_ba.max()), np.percentile(np.hstack([d_ab, d_ba]), q)


def _disc(shape, centre, radius):
  grid = np.indices(shape)
  return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius ** 2


def test_dice_iou_hand_counts():
  pred = np.zeros((6, 8), int)
  gt = np.zeros((6, 8), int)
  pred[1:4, 1:5] = 1   # 12 px
  gt[2:5, 2:6] = 1     # 12 px, overlap rows 2-3 x cols 2-4 = 6 px
  pred[5, 0:3] = 2     # 3 px
  gt[5, 1:3] = 2       # 2 px, overlap 2 px
  s = seg.per_class_scores(pred, gt, num_classes=3, spacing=(1.0, 1.0))
  np.testing.assert_allclose(s['dice'], [2 * 6 / 24, 2 * 2 / 5])
  np.testing.assert_allclose(s['iou'], [6 / 18, 2 / 3])


@pytest.mark.parametrize('spacing', [(1.0, 1.0), (0.7, 2.3)])
def test_hd_matches_brute_force_2d(spacing):
  rng = np.random.default_rng(0)
  shape = (40, 36)
  gt = np.zeros(shape, int)
  pred = np.zeros(shape, int)
  gt[_disc(shape, (18, 15), 9)] = 1
  pred[_disc(shape, (20, 17), 7)] = 1
  pred[5:12, 25:34] = 1             # a spurious square far from the gt disc
  gt[0:6, 0:10] = 2                 # touches the image edge
  pred[1:8, 0:12] = 2
  pred[rng.random(shape) < 0.01] = 2  # scattered single-pixel false positives
  s = seg.per_class_scores(pred, gt, 3, spacing, hd_percentile=95.0)
  for c in (1, 2):
    hd, hd95 = _brute_force_hd(pred == c, gt == c, spacing)
    np.testing.assert_allclose([s['hd'][c - 1], s['hd95'][c - 1]], [hd, hd95], rtol=1e-12)


def test_hd_matches_brute_force_3d_anisotropic():
  shape = (9, 20, 22)
  spacing = (3.0, 0.8, 1.1)
  gt = np.zeros(shape, int)
  pred = np.zeros(shape, int)
  gt[2:7, 4:15, 5:17] = 1
  pred[3:8, 6:16, 3:14] = 1
  pred[_disc(shape, (5, 11, 9), 2)] = 0  # an internal hole adds an inner surface
  pred[0, 0, 0] = 1  # corner outlier
  s = seg.per_class_scores(pred, gt, 2, spacing, hd_percentile=90.0)
  hd, hd90 = _brute_force_hd(pred == 1, gt == 1, spacing, q=90.0)
  np.testing.assert_allclose([s['hd'][0], s['hd95'][0]], [hd, hd90], rtol=1e-12)


def test_hd_shifted_square_closed_form():
  # Identical squares shifted by 3 columns: every boundary point is at most 3 columns from the other.
  a = np.zeros((20, 20), int)
  b = np.zeros((20, 20), int)
  a[5:15, 4:12] = 1
  b[5:15, 7:15] = 1
  s = seg.per_class_scores(a, b, 2, (0.5, 1.5))
  assert s['hd'][0] == pytest.approx(3 * 1.5)


def test_empty_structures():
  shape, spacing = (10, 12), (2.0, 0.5)
  pred = np.zeros(shape, int)
  gt = np.zeros(shape, int)
  gt[2:4, 2:4] = 2      # class 2 only in gt; class 1 absent from both; class 3 only in pred
  pred[5:7, 5:7] = 3
  s = seg.per_class_scores(pred, gt, 4, spacing)
  diagonal = math.hypot(10 * 2.0, 12 * 0.5)
  for k in seg.SCORE_NAMES:
    assert np.isnan(s[k][0])
  np.testing.assert_allclose(s['dice'][1:], [0, 0])
  np.testing.assert_allclose(s['iou'][1:], [0, 0])
  np.testing.assert_allclose(s['hd'][1:], [diagonal, diagonal])
  np.testing.assert_allclose(s['hd95'][1:], [diagonal, diagonal])


def test_identical_masks_score_perfectly():
  m = np.zeros((3, 8, 8), int)
  m[1, 2:6, 2:6] = 1
  s = seg.per_class_scores(m, m, 2, (1.0, 1.0, 1.0))
  assert (s['dice'][0], s['iou'][0], s['hd'][0], s['hd95'][0]) == (1.0, 1.0, 0.0, 0.0)


def test_evaluate_cases_volume_mode_restores_slice_order():
  rng = np.random.default_rng(1)
  n_slices, shape = 5, (12, 14)
  vols_p = rng.integers(0, 3, (2, n_slices, *shape)) * (rng.random((2, n_slices, *shape)) < 0.3)
  vols_g = np.roll(vols_p, 1, axis=-1)
  spacing = {7: (0.9, 1.2, 4.0), 3: (1.0, 1.0, 2.5)}  # (h, w, slice)
  # Flatten both volumes into shuffled slices with case ids and slice indices.
  preds, gts, cids, sidx, sps = [], [], [], [], []
  for v, cid in enumerate((7, 3)):
    for z in range(n_slices):
      preds.append(vols_p[v, z])
      gts.append(vols_g[v, z])
      cids.append(cid)
      sidx.append(z)
      sps.append(spacing[cid])
  perm = rng.permutation(len(preds))
  arr = lambda x: np.asarray(x)[perm]
  out = seg.evaluate_cases(arr(preds), arr(gts), arr(cids), 3, arr(sps), volume_mode=True,
                           slice_index=arr(sidx))
  np.testing.assert_array_equal(out['case_ids'], [3, 7])
  for row, (v, cid) in enumerate(((1, 3), (0, 7))):
    h, w, sl = spacing[cid]
    ref = seg.per_class_scores(vols_p[v], vols_g[v], 3, (sl, h, w))
    for k in seg.SCORE_NAMES:
      np.testing.assert_allclose(out[k][row], ref[k])


def test_evaluate_cases_slice_mode():
  rng = np.random.default_rng(2)
  preds = rng.integers(0, 2, (4, 10, 10))
  gts = rng.integers(0, 2, (4, 10, 10))
  sps = rng.uniform(0.5, 2.0, (4, 2))
  out = seg.evaluate_cases(preds, gts, np.array([0, 0, 1, 1]), 2, sps)
  assert out['dice'].shape == (4, 1)
  for i in range(4):
    ref = seg.per_class_scores(preds[i], gts[i], 2, sps[i])
    np.testing.assert_allclose(out['hd95'][i], ref['hd95'])
  with pytest.raises(ValueError, match='volume_mode'):
    seg.evaluate_cases(preds, gts, np.zeros(4, int), 2, sps, volume_mode=True)


def test_summarise_against_numpy():
  nan = np.nan
  dice = np.array([[0.8, 0.6, nan], [0.9, nan, nan], [nan, nan, nan], [0.5, 0.7, nan]])
  per_case = {'case_ids': np.arange(4), 'dice': dice, 'iou': dice / 2, 'hd': dice * 10, 'hd95': dice * 5}
  out = seg.summarise(per_case, ['background', 'a', 'b', 'c'])
  case_means = np.array([0.7, 0.9, 0.6])  # case 2 has no present class and is left out
  assert out['num_cases'] == 4 and out['num_cases_scored'] == 3
  assert out['dice_mean'] == pytest.approx(case_means.mean())
  assert out['dice_std'] == pytest.approx(case_means.std())
  assert out['hd_mean'] == pytest.approx(10 * case_means.mean())
  assert out['per_class']['a']['dice_mean'] == pytest.approx(np.mean([0.8, 0.9, 0.5]))
  assert out['per_class']['a']['dice_std'] == pytest.approx(np.std([0.8, 0.9, 0.5]))
  assert out['per_class']['b']['num_present'] == 2
  assert out['per_class']['c'] == {'num_present': 0, **{f'{k}_{s}': None for k in seg.SCORE_NAMES
                                                         for s in ('mean', 'std')}}
  assert out['absent_classes'] == ['c']
  assert out['miou'] == pytest.approx(np.mean([np.mean([0.4, 0.45, 0.25]), np.mean([0.3, 0.35])]))
  assert all(type(out[k]) is float for k in ('dice_mean', 'iou_std', 'hd95_mean', 'miou'))
