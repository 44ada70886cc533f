"""Seed aggregation of the evaluate stage: mean and std over seeds, per class, None-safe."""

import numpy as np

from diffuseg_jax.stages.evaluate import aggregate_seeds


def _summary(dice, iou, hd, hd95, per_class_dice, case_std=0.1):
  return {'dice_mean': dice, 'iou_mean': iou, 'hd_mean': hd, 'hd95_mean': hd95, 'miou': iou,
          'dice_std': case_std, 'iou_std': case_std, 'hd_std': case_std, 'hd95_std': case_std,
          'per_class': {'LV': {'dice_mean': per_class_dice[0], 'iou_mean': 0.5, 'hd_mean': 1.0,
                               'hd95_mean': None},
                        'RV': {'dice_mean': per_class_dice[1], 'iou_mean': 0.4, 'hd_mean': 2.0,
                               'hd95_mean': 3.0}}}


def test_mean_and_std_over_seeds_match_numpy():
  seeds = [_summary(0.7, 0.55, 4.0, 3.0, (0.8, 0.6)), _summary(0.8, 0.65, 5.0, 3.5, (0.9, 0.7)),
           _summary(0.75, 0.6, 6.0, None, (0.85, 0.65), case_std=0.3)]
  out = aggregate_seeds(seeds)
  np.testing.assert_allclose(out['dice_mean'], np.mean([0.7, 0.8, 0.75]))
  np.testing.assert_allclose(out['dice_std'], np.std([0.7, 0.8, 0.75]))
  np.testing.assert_allclose(out['hd_std'], np.std([4.0, 5.0, 6.0]))
  np.testing.assert_allclose(out['hd95_mean'], np.mean([3.0, 3.5]))  # a seed without HD95 is skipped
  np.testing.assert_allclose(out['case_std']['dice'], np.mean([0.1, 0.1, 0.3]))
  np.testing.assert_allclose(out['per_class']['RV']['dice_mean'], np.mean([0.6, 0.7, 0.65]))
  assert out['per_class']['LV']['hd95_mean'] is None
