"""A few-shot target domain: a folder dataset with 2 unlabelled target images runs the whole pipeline to
`evaluate`, the report says how many target images there were, and no statistic is a NaN passed off as a
number (too few images: None / n/a with the reason)."""

import json
import math
import re

import fixtures
import numpy as np
import pytest
from helpers import tiny_config

from diffuseg_jax import pipeline, report
from diffuseg_jax.metrics import image_quality
from diffuseg_jax.synthetic_io import load_synthetic

NUM_SOURCE, NUM_TARGET, NUM_TEST = 4, 2, 3


def _box_image(rng, size=16, tint=None):
  """A gray (or tinted RGB) image with one bright box, and its label map (1 inside the box)."""
  y, x = rng.integers(2, size - 8, 2)
  h, w = rng.integers(4, 7, 2)
  label = np.zeros((size, size), np.uint8)
  label[y:y + h, x:x + w] = 1
  image = (60 + 140 * label + rng.normal(0, 15, (size, size))).clip(0, 255)
  if tint is not None:
    image = image[..., None] * np.asarray(tint)
  return image.astype(np.uint8), label


@pytest.fixture(scope='module')
def few_shot_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('few_shot_data')
  rng = np.random.default_rng(0)
  for split, n in (('source', NUM_SOURCE), ('test', NUM_TEST), ('target', NUM_TARGET)):
    for i in range(n):
      image, label = _box_image(rng, tint=None if split == 'source' else (1.0, 0.6, 0.3))
      fixtures.write_image(root / split / 'images' / f'{split}{i}.png', image)
      if split != 'target':  # the target is unlabelled
        fixtures.write_image(root / split / 'labels' / f'{split}{i}.png', label)
  config = tiny_config()
  config.data.update(name='folder', root=str(root))
  config.segmentation.strategies = 'diffuseg'  # self/semi need target labels; transfer never sees the target
  config.checkpoint.every_steps = config.vae.teacher_steps  # one save per stage: this test is about data sizes
  config.vae.augment_target = config.diffusion.augment = True  # what a few-shot run may turn on
  # ... and the options beyond the paper that change what the teacher, the student and the segmenter see
  config.vae.augment_source_intensity, config.segmentation.augment_intensity = True, 'diffuseg'
  config.vae.distill_on = 'target_and_source'
  workdir = tmp_path_factory.mktemp('few_shot') / 'wd'
  return pipeline.run(config, str(workdir), show_progress=False)


def _numbers(tree, path=''):
  """Every (path, float) in a JSON tree."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _numbers(v, f'{path}.{k}')
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      yield from _numbers(v, f'{path}[{i}]')
  elif isinstance(tree, float):
    yield path, tree


def test_pipeline_reaches_evaluate_with_two_target_images(few_shot_run):
  ctx = few_shot_run
  assert len(ctx.data.target) == NUM_TARGET and not ctx.data.target.labelled
  with open(ctx.path('metrics.json')) as f:
    metrics = json.load(f)
  assert metrics['data']['num_target'] == NUM_TARGET and metrics['data']['few_shot_target']
  assert (metrics['data']['num_source'], metrics['data']['num_test']) == (NUM_SOURCE, NUM_TEST)
  strategies = metrics['evaluate']['strategies']
  assert set(strategies) == {'diffuseg'}
  for r in strategies.values():
    assert 0.0 <= r['dice_mean'] <= 1.0
  nan = [path for path, v in _numbers(metrics) if not math.isfinite(v)]
  assert not nan, nan
  quality = metrics['evaluate']['image_quality']
  assert quality['num_images'] == NUM_TARGET
  for key in ('fd_synthetic_vs_target', 'kid_synthetic_vs_target', 'fd_source_vs_target'):
    assert quality[key] is None and 'needs at least' in quality['not_computed'][key]
  assert quality['background_distance_to_reference'] >= 0.0  # a per-pair mean: defined for 2 pairs


def test_report_says_how_many_target_images(few_shot_run):
  report = open(few_shot_run.path('report.md')).read()
  assert f'**{NUM_TARGET} unlabelled target training images**' in report
  assert f'Few-shot target: {NUM_TARGET} target training images' in report
  assert 'Target augmentation: student on (`vae.augment_target`), diffusion on' in report
  assert not re.search(r'\bnan\b|\binf\b', report, re.IGNORECASE)
  assert 'n/a above' in report and 'fd_synthetic_vs_target' in report


def test_synthesis_makes_the_pairs_asked_for_from_few_masks(few_shot_run):
  """32 pairs (sampling.num_masks) from 4 source masks: 8 passes, each pair its own file and reference."""
  n = few_shot_run.config.sampling.num_masks
  synth = load_synthetic(few_shot_run)
  np.testing.assert_array_equal(synth['synthesis_index'], np.arange(n))
  np.testing.assert_array_equal(np.bincount(synth['mask_index']), [n // NUM_SOURCE] * NUM_SOURCE)
  np.testing.assert_array_equal(synth['label'], few_shot_run.data.source.labels[synth['mask_index']])
  assert len({image.tobytes() for image in synth['image']}) == n  # a repeated mask gives a new image
  assert few_shot_run.read_results()['synthesize']['num_images'] == n


def test_student_is_distilled_on_what_distill_on_says(few_shot_run):
  from diffuseg_jax.stages import student

  data, config = few_shot_run.data, few_shot_run.config.copy_and_resolve_references()
  both = student.distillation_images(config, data)
  np.testing.assert_array_equal(both, np.concatenate([data.target.images, data.source.images]))
  config.vae.distill_on = 'target'
  np.testing.assert_array_equal(student.distillation_images(config, data), data.target.images)


def test_data_line_counts_cases_and_flags_only_few_shot_targets():
  counts = {'num_source': 120, 'num_source_cases': 6, 'num_target': 1, 'num_target_cases': 1, 'num_test': 40,
            'num_test_cases': 2, 'few_shot_target': True}
  config = tiny_config()
  config.vae.augment_target = True
  text = '\n'.join(report.data_lines(counts, config))
  assert '120 labelled source images (6 cases), **1 unlabelled target training image**, 40 labelled' in text
  assert 'Few-shot target: 1 target training image**' in text
  assert 'student on (`vae.augment_target`), diffusion off' in text
  counts.update(num_target=report.FEW_SHOT_TARGET, num_target_cases=report.FEW_SHOT_TARGET, few_shot_target=False)
  assert 'Few-shot' not in '\n'.join(report.data_lines(counts, config))


def test_distribution_statistics_need_enough_images_per_set():
  assert image_quality.too_few(10, 500) is None
  assert image_quality.too_few(500, 9) == 'not computed: needs at least 10 images per set, has 500 and 9'
