"""`report.md` in the workdir: the results table (paper Table II strategies), FFD-VAE diagnostics, image
quality, and the figures (synthesis examples like the paper's Fig. 4/6, test predictions, loss curves)."""

from __future__ import annotations

import datetime
import os

import jax
import numpy as np

from diffuseg_jax import atomic, figures

STRATEGY_TEXT = {
    'transfer': ('Transfer (source only)', 'source images + labels'),
    'self': ('Self (ORACLE: real target labels)', 'target images + real target labels'),
    'semi': ('Semi-self (ORACLE + synthetic)', 'target labels + synthetic pairs'),
    'diffuseg': ('DiffuSeg (synthetic only)', 'synthetic images + given labels'),
    'diffuseg_st': ('DiffuSeg + self-training', 'synthetic pairs + confident target pseudo-labels'),
}


# Fewer target training images than this: the report flags a few-shot target domain.
FEW_SHOT_TARGET = 10


def data_counts(data) -> dict:
  """metrics.json["data"]: images (2D slices) and cases (subjects / volumes / images) of each split, and
  whether the target is few-shot (fewer than FEW_SHOT_TARGET training images)."""
  out: dict = {}
  for name in ('source', 'target', 'test'):
    split = getattr(data, name)
    out[f'num_{name}'] = len(split)
    out[f'num_{name}_cases'] = int(len(np.unique(split.case_ids)))
  out['few_shot_target'] = out['num_target'] < FEW_SHOT_TARGET
  return out


def data_lines(counts: dict, config) -> list[str]:
  """The report's data line, and a visible note when the target is few-shot."""
  def images(split, kind):
    n, cases = counts[f'num_{split}'], counts[f'num_{split}_cases']
    return f'{n} {kind} image{"s" * (n != 1)}' + (f' ({cases} cases)' if cases != n else '')

  lines = [f'Data: {images("source", "labelled source")}, **{images("target", "unlabelled target training")}**, '
           f'{images("test", "labelled target test")}.', '']
  if counts['few_shot_target']:
    on = {True: 'on', False: 'off'}
    lines += [f'> **Few-shot target: {counts["num_target"]} target training image'
              f'{"s" * (counts["num_target"] != 1)}** (fewer than {FEW_SHOT_TARGET}). The student, the '
              'diffusion model and the synthesis references learn the target domain from these images alone; '
              'distribution statistics that need more images are reported as n/a. Target augmentation: '
              f'student {on[bool(config.vae.augment_target)]} (`vae.augment_target`), diffusion '
              f'{on[bool(config.diffusion.augment)]} (`diffusion.augment`).', '']
  return lines


def fmt(v, digits: int = 3) -> str:
  return 'n/a' if v is None else f'{v:.{digits}f}'


def pm(mean, std, digits: int = 3) -> str:
  return f'{fmt(mean, digits)} ± {fmt(std, digits)}'


def results_table(strategies: dict, unit: str) -> list[str]:
  lines = [
      f'| strategy | training data | seeds | Dice | IoU (= Jaccard) | HD ({unit}) | HD95 ({unit}) |',
      '|---|---|---|---|---|---|---|',
  ]
  for name in STRATEGY_TEXT:
    if name not in strategies:
      continue
    r = strategies[name]
    title, used = STRATEGY_TEXT[name]
    if r.get('oracle') and 'ORACLE' not in title:
      title += ' (ORACLE: synthesised from the test labels, sampling.mask_set=test)'
    lines.append(f'| {title} | {used} | {len(r["seeds"])} | {pm(r["dice_mean"], r["dice_std"])} | '
                 f'{pm(r["iou_mean"], r["iou_std"])} | {pm(r["hd_mean"], r["hd_std"], 2)} | '
                 f'{pm(r["hd95_mean"], r["hd95_std"], 2)} |')
  return lines


def per_class_table(strategies: dict) -> list[str]:
  names = list(next(iter(strategies.values()))['per_class'])
  lines = ['| strategy | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
  for name, r in strategies.items():
    lines.append(f'| {name} | ' + ' | '.join(fmt(r['per_class'][c]['dice_mean']) for c in names) + ' |')
  return lines


def results_training_units(ctx) -> list[str]:
  """This run's training units (those with checkpoints), in pipeline order."""
  from diffuseg_jax import results

  return [u for u in results.run_units(ctx) if u.split('/')[0] in TRAINING_UNITS]


TRAINING_UNITS = ('teacher', 'student', 'autoencoder', 'diffusion', 'segment')


def selection_lines(strategies: dict, config) -> list[str]:
  """Which split chose each segmenter's weights (selection.py): never the test split."""
  chosen = {s: [r.get('selection') or {} for r in v.get('per_seed', [])] for s, v in strategies.items()}
  on_val = {s: [f'{c["step"]}{" (round 1)" if c.get("round") == 1 else ""}' for c in cs
               if c.get('selected_on') == 'val'] for s, cs in chosen.items()}
  if not any(on_val.values()):
    reasons = sorted({c.get('reason') or 'last step' for cs in chosen.values() for c in cs})
    return [f'Segmenter weights: the final EMA weights ({"; ".join(reasons)}); nothing is chosen on the test '
            'split.', ''] if reasons else []
  steps = '; '.join(f'{s} {", ".join(str(k) for k in ks)}' for s, ks in on_val.items() if ks)
  return [f'Segmenter weights: the EMA weights with the best mean foreground Dice on the labelled validation '
          f'split, scored every {config.segmentation.select_every} steps and at the last; steps chosen (per seed): '
          f'{steps}. Nothing is chosen on the test split.', '']


def second_round_lines(ctx) -> list[str]:
  """With diffusion.pseudo_labels_from=diffuseg: the diffuseg segmenters' validation Dice in both rounds."""
  if ctx.config.diffusion.pseudo_labels_from != 'diffuseg':
    return []
  from diffuseg_jax import relabel

  scores = relabel.validation_dice(ctx)
  if None in scores.values():
    return ['Second round (`diffusion.pseudo_labels_from=diffuseg`): the denoiser and the rendered region learned '
            "the target's classes from a first round's diffuseg segmenters; without validation scores for both "
            'rounds, nothing here says whether it helped.', '']
  seeds = [int(k) for k in ctx.config.segmentation.seeds]
  kept = [k for k in seeds if relabel.weights_round(ctx, k) == 1]
  which = (f'seed{"s" if len(kept) > 1 else ""} {", ".join(map(str, kept))} kept the first round\'s weights, which '
           'scored higher there' if kept else 'every seed uses the second round\'s weights')
  return [f'Second round (`diffusion.pseudo_labels_from=diffuseg`): the diffuseg segmenters\' mean validation Dice '
          f'{scores["round 1"]:.3f} in the first round (whose segmentation of the target images taught this one) '
          f'and {scores["round 2"]:.3f} in the second. Each seed\'s DiffuSeg weights are the better round\'s on the '
          f'validation split: {which}. Nothing is chosen on the test split.', '']


def write_report(ctx, metrics: dict) -> str:
  """report.md and its figures for this run (`metrics`: results.gather)."""
  from diffuseg_jax.stages import evaluate

  ev = metrics.get('evaluate', {})
  predictions = {s: evaluate.load_predictions(ctx, u) for s, u in evaluate.first_seed_units(ctx).items()}
  data, cfg = ctx.data, ctx.config
  fig_dir = ctx.path('figures')
  k = min(cfg.eval.num_figure_examples, len(data.test))
  order = sorted(predictions)
  figures.image_rows(
      [data.test.images[:k]] * (1 + len(order)), ['ground truth'] + order,
      os.path.join(fig_dir, 'segmentation_examples.png'),
      labels=[data.test.labels[:k]] + [predictions[s][:k] for s in order], num_classes=data.num_classes,
      title='target test images with label contours: ground truth and each strategy (first seed)',
  )
  rows = [r for unit in results_training_units(ctx) for r in ctx.training_log(unit)]
  by_stage: dict[str, list] = {}
  for r in rows:
    stage = r['stage']
    key = 'segment' if stage.startswith('segment_') else stage
    by_stage.setdefault(key, []).append({**r, 'run': stage[len('segment_'):] if key == 'segment' else ''})
  figures.loss_curves(by_stage, os.path.join(fig_dir, 'loss_curves.png'))

  unit = ev.get('distance_unit', 'px')
  lines = [
      f'# DiffuSeg report: {cfg.data.name}',
      '',
      f'Generated {datetime.datetime.now().isoformat(timespec="seconds")} on {jax.device_count()} '
      f'{jax.devices()[0].platform} device(s). Workdir `{os.path.abspath(ctx.workdir)}`; full config in '
      '`config.json`, raw numbers in `metrics.json`.',
      '',
      *data_lines(data_counts(data), cfg),
      f'Test split: {len(data.test)} labelled target images ({ev.get("num_test_cases")} cases), '
      f'classes {", ".join(data.class_names)}. Scores are means over test cases of the mean over foreground '
      'classes; ± is the standard deviation over training seeds. IoU is the same quantity as the paper\'s '
      'Jaccard index. HD95 is the 95th percentile of the pooled symmetric surface distances.',
      '',
      '## Segmentation on the target test split',
      '',
      *results_table(ev.get('strategies', {}), unit),
      '',
      'Rows marked ORACLE train on real target labels, which DiffuSeg never uses: they are upper bounds, '
      'not competitors.',
      '',
  ]
  lines += selection_lines(ev.get('strategies', {}), cfg)
  lines += second_round_lines(ctx)
  if ev.get('strategies'):
    lines += ['Per-class Dice:', '', *per_class_table(ev['strategies']), '']
  if os.path.isdir(ctx.path('predictions')):
    lines += ['Test predictions (first seed) on each test image\'s original voxel grid and affine, in the '
              'dataset\'s own label values: `predictions/<strategy>/<case>.nii.gz`.', '']
  lines += ['![segmentation examples](figures/segmentation_examples.png)', '']
  q = ev.get('image_quality')
  if q:
    lines += [
        '## Synthetic image quality',
        '',
        f'Features: **{q["feature_network"]}** ({q["num_images"]} images per set). Lower is better.',
        '',
        '| comparison | Fréchet distance | KID |',
        '|---|---|---|',
        f'| synthetic vs real target | {fmt(q["fd_synthetic_vs_target"], 2)} | '
        f'{pm(q["kid_synthetic_vs_target"], q["kid_synthetic_vs_target_std"], 4)} |',
        f'| source vs real target (domain gap before synthesis) | {fmt(q["fd_source_vs_target"], 2)} | |',
        f'| target test vs target train (floor) | {fmt(q["fd_target_vs_target_test"], 2)} | |',
        '',
        f'Background distance to the z_dom reference (100 × mean |synthetic − reference| outside both '
        f'foregrounds, lower = closer; the two images share only z_dom, not anatomy, so this is not the paper\'s '
        f'paired MBS): {fmt(background_distance(q), 2)}',
        '',
        'Label agreement of the synthetic pairs (mean foreground Dice of the FFD-VAE student\'s segmentation of '
        'the synthetic images against their given labels; reads no target label, higher = the images show the '
        f'labelled anatomy where the label puts it): {fmt(q.get("synthetic_label_agreement"), 3)}',
        '',
    ]
    if q.get('not_computed'):
      lines += ['n/a above:', '', *[f'- `{k}`: {reason}' for k, reason in q['not_computed'].items()], '']
  syn = metrics.get('synthesize')
  if syn:
    lines += [
        '## Synthesis',
        '',
        f'{syn["num_images"]} images; blended DDIM with {syn["num_steps"]} steps, eta {syn["eta"]}, guidance '
        f'{syn["guidance_scale"]}, blend mode {syn["blend_mode"]} until {syn["blend_until"]:.0%} of the steps, '
        f'region content `{syn["region_content"]}`; {denoiser_words(cfg.diffusion)}. Pairs in '
        '`synthetic/images/` + `synthetic/labels/`'
        + (f'; as an nnU-Net v2 raw dataset in `{syn["nnunet_dataset"]}/`.' if syn.get('nnunet_dataset')
           else '.'),
        '',
        *synthesis_speed(syn),
        '![synthesis examples](figures/synthesis_examples.png)',
        '',
    ]
  ffd = metrics.get('ffd_vae')
  if ffd:
    lines += [
        '## FFD-VAE (teacher S, student T)',
        '',
        '| quantity | value |',
        '|---|---|',
        *[f'| {k} | {fmt(v) if v is None or isinstance(v, float) else v} |' for k, v in ffd.items()],
        '',
        '![reconstructions](figures/ffd_vae_reconstructions.png)',
        '![segmentations](figures/ffd_vae_segmentations.png)',
        '',
    ]
  lines += ['## Training curves', '', '![loss curves](figures/loss_curves.png)', '']
  path = ctx.path('report.md')
  atomic.write_text(path, '\n'.join(lines))
  return path


def denoiser_words(diffusion) -> str:
  """Which denoiser drew the images (the paper's, eq. 7, or one that also saw the label map), and whose labels
  of the target images it and the rendered region learned from (config.diffusion)."""
  if diffusion.mask_condition == 'none':
    words = "the denoiser sees the latent and `z_dom` (the paper's eq. 7)"
  else:
    words = f'the denoiser also sees the label map (`diffusion.mask_condition={diffusion.mask_condition}`)'
  if diffusion.pseudo_labels_from == 'diffuseg':
    words += ('; a second round: the target labels it learned from are those of a first round\'s diffuseg '
              'segmenters (`diffusion.pseudo_labels_from=diffuseg`)')
  return words


def synthesis_speed(syn: dict) -> list[str]:
  """One line: the stage's images/s against the bare sampler's (the same compiled program without host work)."""
  stage, sampler = syn.get('stage_images_per_second'), syn.get('sampler_images_per_second')
  if not sampler:
    return []
  if not stage:
    return [f'Sampler {sampler:.1f} images/s (one batch: no steady-state stage rate).', '']
  return [f'Speed: the stage (sampling, copies, writing files) {stage:.1f} images/s after its first batch; the '
          f'bare sampler {sampler:.1f} images/s; stage / sampler = {stage / sampler:.0%}.', '']


def background_distance(quality: dict) -> float | None:
  """The background score of `image_quality`; workdirs from before its rename call it mbs_synthetic_vs_reference."""
  return quality.get('background_distance_to_reference', quality.get('mbs_synthetic_vs_reference'))
