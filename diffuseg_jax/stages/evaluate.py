"""Stage `evaluate`: segmentation scores per strategy (mean ± std over seeds) and synthetic image quality.

metrics.json["evaluate"] (a stable shape for scripts):
  strategies: {NAME: {dice_mean, dice_std, iou_mean, iou_std, hd_mean, hd_std, hd95_mean, hd95_std, miou,
                      per_class: {class: {dice_mean, iou_mean, hd_mean, hd95_mean}}, oracle: bool,
                      seeds: [...], per_seed: [summary per seed], case_std: {dice, iou, hd, hd95}}}
     *_mean = mean over seeds of the per-seed mean over test cases; *_std = std over seeds (ddof 0);
     case_std = mean over seeds of the std over cases. HD/HD95 in mm for medical data, pixels otherwise.
  image_quality: {feature_network, num_images, fd_synthetic_vs_target, kid_synthetic_vs_target (mean, std),
                  fd_source_vs_target (the domain gap before synthesis), fd_target_vs_target_test (floor),
                  background_distance_to_reference, synthetic_label_agreement (the student's segmentation of
                  synthetic images vs their given labels: mean foreground Dice, label-free),
                  not_computed: {key: reason}}
     a statistic that needs more images than there are (image_quality.MIN_IMAGES_PER_SET per set for FD and
     KID; a few-shot target) is None, its reason in not_computed.
     Every per-seed summary and image_quality carry the fingerprint of the unit that produced them.
Units (run_identity.py): `evaluate/<strategy>_seed<k>` per segmentation run (its summary and test predictions,
predictions.npz) and `quality` (image quality), so adding a strategy or a seed evaluates only what is new.
Medical volumes: the first seed's test predictions of each strategy are also written on the original voxel
grids, `predictions/<strategy>/<case>.nii.gz` (data/export.py; linked from the workdir by results.py).
With `sampling.mask_set=test` the synthetic pairs are drawn from the test labels, so the strategies trained
on them are marked oracle as well.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from diffuseg_jax import inference, logs, relabel, report, selection
from diffuseg_jax.data import export
from diffuseg_jax.inference import batched_apply
from diffuseg_jax.metrics import features, image_quality
from diffuseg_jax.metrics.segmentation import evaluate_cases, summarise
from diffuseg_jax.run_identity import SYNTHETIC_STRATEGIES, run_name
from diffuseg_jax.stages import segment, student
from diffuseg_jax.synthetic_io import load_synthetic

SCORES = ('dice', 'iou', 'hd', 'hd95')


def run_units(ctx) -> dict[tuple[str, int], str]:
  return {(s, k): f'evaluate/{run_name(s, k)}' for s, k in segment.runs(ctx)}


def wants_quality(ctx) -> bool:
  """Image quality is scored when this run synthesises or trains on the synthetic pairs."""
  return 'synthesize' in ctx.stages or any(s in SYNTHETIC_STRATEGIES for s, _ in segment.runs(ctx))


def units(ctx) -> list[str]:
  return list(run_units(ctx).values()) + (['quality'] if wants_quality(ctx) else [])


def is_oracle(ctx, strategy: str) -> bool:
  """Trained on real target labels: the oracle strategies, and the synthetic ones when the masks are the
  test labels (`sampling.mask_set=test`)."""
  return strategy in segment.ORACLE or (strategy in SYNTHETIC_STRATEGIES and ctx.config.sampling.mask_set == 'test')


def first_seed_units(ctx) -> dict[str, str]:
  """{strategy: its first seed's evaluation unit} (the predictions in figures and exports)."""
  out: dict[str, str] = {}
  for (strategy, _), unit in run_units(ctx).items():
    out.setdefault(strategy, unit)
  return out


def prediction_units(ctx) -> dict[str, str]:
  """`first_seed_units` whose predictions are exported on the original grids: medical volumes only."""
  return first_seed_units(ctx) if export.has_volumes(ctx.data) else {}


def load_predictions(ctx, unit: str) -> np.ndarray:
  with np.load(os.path.join(ctx.unit_dir(unit), 'predictions.npz')) as f:
    return f['pred']


def predict(ctx, model, params, images: np.ndarray) -> np.ndarray:
  return batched_apply(functools.partial(inference.segment_labels, model=model), images,
                       ctx.config.eval.batch_size, ctx.mesh, args=(params,))


def aggregate_seeds(per_seed: list[dict]) -> dict:
  out: dict = {}
  for s in SCORES:
    vals = [r[f'{s}_mean'] for r in per_seed if r.get(f'{s}_mean') is not None]
    out[f'{s}_mean'] = float(np.mean(vals)) if vals else None
    out[f'{s}_std'] = float(np.std(vals)) if vals else None
  mious = [r['miou'] for r in per_seed if r.get('miou') is not None]
  out['miou'] = float(np.mean(mious)) if mious else None
  out['case_std'] = {s: _mean_or_none([r.get(f'{s}_std') for r in per_seed]) for s in SCORES}
  classes = per_seed[0].get('per_class', {})
  out['per_class'] = {
      name: {f'{s}_mean': _mean_or_none([r['per_class'][name].get(f'{s}_mean') for r in per_seed]) for s in SCORES}
      for name in classes
  }
  return out


def _mean_or_none(values):
  vals = [v for v in values if v is not None]
  return float(np.mean(vals)) if vals else None


def evaluate_run(ctx, strategy: str, seed: int, unit: str, export_volumes: bool) -> None:
  """Scores one segmentation run on the test split into its unit (summary, predictions.npz[, NIfTI])."""
  data = ctx.data
  model, params = segment.load(ctx, strategy, seed)
  pred = predict(ctx, model, params, data.test.images)
  summary = score_predictions(pred, data.test, data.class_names, is_volumetric(ctx), ctx.config.eval.hd_percentile)
  summary['seed'] = seed
  weights = relabel.weights_context(ctx, strategy, seed)
  chosen = selection.read(weights, f'segment/{run_name(strategy, seed)}') or {}
  summary['selection'] = {'selected_on': chosen.get('selected_on', 'last step'), 'step': chosen.get('best_step'),
                          'val_dice': chosen.get('best_val_dice'), 'reason': chosen.get('reason')}
  if weights is not ctx:
    summary['selection']['round'] = 1  # a second round's segmenter that kept the first round's weights
  path = ctx.unit_dir(unit)
  if ctx.is_main_process:
    np.savez_compressed(os.path.join(path, 'predictions.npz'), pred=pred.astype(np.int16))
    if export_volumes:
      export.write_volume_predictions(data, pred, os.path.join(path, 'predictions'))
  ctx.save_unit_results(unit, summary)
  ctx.complete(unit)


def collect(ctx) -> dict | None:
  """metrics.json["evaluate"] from this run's evaluation units; None until every one is complete."""
  grouped: dict[str, list] = {}
  for (strategy, _), unit in run_units(ctx).items():
    summary = ctx.unit_results(unit) if ctx.is_complete(unit) else None
    if summary is None:
      return None
    grouped.setdefault(strategy, []).append({**summary, 'fingerprint': ctx.fingerprint(unit)})
  if not grouped:
    return None
  strategies = {
      strategy: {**aggregate_seeds(per_seed), 'oracle': is_oracle(ctx, strategy),
                 'seeds': [r['seed'] for r in per_seed], 'per_seed': per_seed}
      for strategy, per_seed in grouped.items()}
  quality = None
  if wants_quality(ctx) and ctx.is_complete('quality'):
    quality = {**ctx.unit_results('quality'), 'fingerprint': ctx.fingerprint('quality')}
  return {'strategies': strategies, 'image_quality': quality,
          'distance_unit': 'mm' if ctx.data.spacing_unit == 'mm' else 'px',
          'num_test_cases': int(len(np.unique(ctx.data.test.case_ids))),
          'mask_set': ctx.config.sampling.mask_set}


def score_predictions(pred: np.ndarray, test, class_names, volume_mode: bool, hd_percentile: float) -> dict:
  """`summarise`d scores of int [N, H, W] predictions on the test split. Pixels outside the field of view
  (retina) are set to background in both prediction and label, so they never count as errors."""
  gt = test.labels
  fov = field_of_view(test)
  if fov is not None:
    pred, gt = np.where(fov, pred, 0), np.where(fov, gt, 0)
  per_case = evaluate_cases(pred, gt, test.case_ids, len(class_names), _spacings(test, volume_mode),
                            volume_mode=volume_mode, slice_index=test.slice_index, hd_percentile=hd_percentile)
  return summarise(per_case, class_names)


def is_volumetric(ctx) -> bool:
  """Medical volumes are scored in 3D (mm); 2D images (natural, retina) per image."""
  return export.has_volumes(ctx.data)


def field_of_view(split) -> np.ndarray | None:
  """[N, H, W] bool field-of-view masks when the dataset provides them (retina), else None."""
  if split.volumes is None or not all('fov' in split.volumes[int(c)].extra for c in np.unique(split.case_ids)):
    return None
  return np.stack([np.asarray(split.volumes[int(c)].extra['fov'], bool) for c in split.case_ids])


def _spacings(split, volume_mode: bool) -> np.ndarray:
  """Per-slice spacing; volumes get the slice thickness as a third entry."""
  if not volume_mode:
    return split.spacing
  thick = np.array([split.volumes[int(c)].spacing[split.volumes[int(c)].slice_axis] for c in split.case_ids])
  return np.concatenate([split.spacing, thick[:, None]], axis=1).astype(np.float32)


def image_quality_results(ctx) -> dict:
  data, cfg = ctx.data, ctx.config.eval
  synth = load_synthetic(ctx)
  n = min(cfg.num_quality_images, len(synth['image']), len(data.target))
  rng = np.random.default_rng(ctx.config.seed)
  pick = np.sort(rng.choice(len(synth['image']), n, replace=False))
  real = data.target.images[np.sort(rng.choice(len(data.target), n, replace=False))]
  extractor = features.load_feature_extractor(cfg.inception_path)

  def feats(x):
    return features.extract_features(extractor, x, cfg.batch_size)

  f_syn, f_real = feats(synth['image'][pick]), feats(real)
  f_src = feats(data.source.images[: n])
  f_test = feats(data.test.images[: n])

  not_computed: dict[str, str] = {}

  def fd(key, a, b):
    if reason := image_quality.too_few(len(a), len(b)):
      not_computed[key] = reason
      return None
    return image_quality.frechet_distance(*image_quality.gaussian_stats(a), *image_quality.gaussian_stats(b))

  kid_mean = kid_std = None
  if reason := image_quality.too_few(len(f_syn), len(f_real)):
    not_computed['kid_synthetic_vs_target'] = reason
  else:
    # Subsets of half the images (at most 1000, the usual KID subset): subsets of all n would all be the same
    # set, and their std (the ± in the report) would be 0 whatever the estimate's real spread.
    kid_mean, kid_std = image_quality.kernel_inception_distance(
        f_syn, f_real, subset_size=max(2, min(1000, n // 2)), seed=ctx.config.seed)
  model, params = student.load(ctx)
  refs = data.target.images[synth['reference_index'][pick]]
  ref_labels = batched_apply(functools.partial(inference.ffd_vae_labels, model=model), refs, cfg.batch_size,
                             ctx.mesh, args=(params,))
  mbs = image_quality.background_similarity_per_pair(synth['image'][pick], refs, synth['label'][pick], ref_labels)
  mbs = mbs[~np.isnan(mbs)]
  synth_labels = batched_apply(functools.partial(inference.ffd_vae_labels, model=model), synth['image'][pick],
                               cfg.batch_size, ctx.mesh, args=(params,))
  if not mbs.size:
    not_computed['background_distance_to_reference'] = 'not computed: no pair has background outside both foregrounds'
  return {
      'feature_network': extractor.name,
      'num_images': int(n),
      'fd_synthetic_vs_target': fd('fd_synthetic_vs_target', f_syn, f_real),
      'kid_synthetic_vs_target': kid_mean,
      'kid_synthetic_vs_target_std': kid_std,
      'fd_source_vs_target': fd('fd_source_vs_target', f_src, f_real),
      'fd_target_vs_target_test': fd('fd_target_vs_target_test', f_test, f_real),
      'background_distance_to_reference': float(mbs.mean()) if mbs.size else None,
      # The student's segmentation of the synthetic images against their given labels (no target label read).
      'synthetic_label_agreement': image_quality.label_agreement(np.asarray(synth_labels), synth['label'][pick],
                                                                 data.num_classes),
      'not_computed': not_computed,
  }


def run(ctx) -> None:
  exported = set(prediction_units(ctx).values())
  for (strategy, seed), unit in run_units(ctx).items():
    if not ctx.is_complete(unit):
      evaluate_run(ctx, strategy, seed, unit, unit in exported)
  if 'quality' in units(ctx) and not ctx.is_complete('quality'):
    ctx.save_unit_results('quality', image_quality_results(ctx))
    ctx.complete('quality')
  if not ctx.is_main_process:
    return  # process 0 wrote the results; it reports them
  for name, r in collect(ctx)['strategies'].items():
    logs.say(f'[evaluate] {name:9s} Dice {report.fmt(r["dice_mean"], 4)} ± {report.fmt(r["dice_std"], 4)}  '
             f'IoU {report.fmt(r["iou_mean"], 4)}  HD95 {report.fmt(r["hd95_mean"], 2)}'
             + ('  (ORACLE)' if r['oracle'] else ''))
