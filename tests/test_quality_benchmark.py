"""The quality benchmark (benchmarks/quality.py): its generated settings have the properties they are named for,
its summary is the stated means, and the whole harness runs at the smoke size."""


import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from benchmarks import quality, quality_data

COUNTS = {'source': 6, 'target': 6, 'val': 2, 'test': 2}


def _split(root, split, kind):
  return np.stack([np.asarray(Image.open(p)) for p in sorted((root / split / kind).glob('*.png'))])


@pytest.mark.parametrize('name', quality_data.SETTINGS)
def test_generated_setting_is_deterministic_and_complete(name, tmp_path):
  k = quality_data.write_setting(name, tmp_path / 'a', COUNTS, 48, seed=0)
  quality_data.write_setting(name, tmp_path / 'b', COUNTS, 48, seed=0)
  assert k == len(quality_data.CLASS_NAMES[name])
  for split, n in COUNTS.items():
    for kind in ('images', 'labels'):
      a, b = _split(tmp_path / 'a', split, kind), _split(tmp_path / 'b', split, kind)
      assert a.shape == (n, 48, 48) and a.dtype == np.uint8
      np.testing.assert_array_equal(a, b)
  labels = _split(tmp_path / 'a', 'source', 'labels')
  assert set(np.unique(labels)) == set(range(k))  # every class present


def _class_means(root, split, k):
  images, labels = _split(root, split, 'images'), _split(root, split, 'labels')
  return np.array([images[labels == c].mean() for c in range(k)])


@pytest.mark.parametrize('name', quality_data.SETTINGS)
def test_domains_differ_in_contrast_not_anatomy(name, tmp_path):
  """The class intensity order differs between source and target: a segmenter of intensities fails."""
  k = quality_data.write_setting(name, tmp_path, COUNTS, 48, seed=1)
  source, target = _class_means(tmp_path, 'source', k), _class_means(tmp_path, 'test', k)
  assert list(np.argsort(source)) != list(np.argsort(target))
  np.testing.assert_allclose(source / 255, quality_data.CONTRAST[name][0], atol=0.12)


def test_dense_tissue_covers_most_of_the_image(tmp_path):
  quality_data.write_setting('dense_tissue', tmp_path, COUNTS, 48, seed=0)
  assert (_split(tmp_path, 'source', 'labels') > 0).mean() > 0.6


def test_thin_vessels_are_one_to_three_pixels_wide(tmp_path):
  quality_data.write_setting('thin_vessels', tmp_path, COUNTS, 64, seed=0)
  labels = _split(tmp_path, 'source', 'labels') > 0
  for label in labels:
    depth = ndimage.distance_transform_cdt(np.pad(label, 1), metric='chessboard')[1:-1, 1:-1]
    assert depth.max() <= 3  # no wider than 3 px, except where branches cross
    thin = label & ~ndimage.binary_erosion(label, np.ones((3, 3)))
    assert thin.sum() > 0.5 * label.sum()  # mostly edge pixels: thin structures


def test_summary_means_over_settings():
  results = {
      'a': {'strategies': {'transfer': {'dice_mean': 0.4}, 'self': {'dice_mean': 0.8},
                           'diffuseg': {'dice_mean': 0.6}, 'diffuseg_st': {'dice_mean': 0.7}}},
      'b': {'strategies': {'transfer': {'dice_mean': 0.5}, 'self': {'dice_mean': 0.5},
                           'diffuseg': {'dice_mean': 0.4}}},
  }
  s = quality.summarise(results)
  assert s['diffuseg_minus_transfer'] == pytest.approx((0.2 - 0.1) / 2)
  assert s['diffuseg_frac_of_oracle'] == pytest.approx((0.75 + 0.8) / 2)
  assert s['st_minus_transfer'] == pytest.approx(0.3) and s['st_frac_of_oracle'] == pytest.approx(0.875)
  assert quality.summary_line(s) == ('diffuseg_minus_transfer=0.050 frac_of_oracle=0.775 st_minus_transfer=0.300 '
                                     'st_frac_of_oracle=0.875 settings=2')


def test_overrides_reach_the_setting_config(tmp_path):
  overrides = quality.parse_overrides(['diffusion.mask_condition=pseudo_labels', 'sampling.blend_until=0.5'])
  assert overrides == {'diffusion.mask_condition': 'pseudo_labels', 'sampling.blend_until': 0.5}
  config = quality.setting_config('dense_tissue', 'smoke', str(tmp_path), (0,), overrides)
  assert config.diffusion.mask_condition == 'pseudo_labels' and config.sampling.blend_until == 0.5
  with pytest.raises(KeyError, match='no field'):
    quality.setting_config('dense_tissue', 'smoke', str(tmp_path), (0,), {'sampling.blend_unti': 0.5})
  with pytest.raises(ValueError, match='FIELD=VALUE'):
    quality.parse_overrides(['sampling.blend_until'])


def test_quick_preset_screens_with_the_quick_recipe_on_the_cpu_presets_data(tmp_path):
  from diffuseg_jax.config_files import load_config

  quick = load_config('mnist_m:quick')
  config = quality.setting_config('multiclass', 'quick', str(tmp_path), (0, 1, 2))
  assert config.diffusion.steps == quick.diffusion.steps and config.vae.teacher_steps == 3 * quick.vae.teacher_steps
  assert config.vae.select == 'val'  # the longer teacher's weights chosen on the validation split
  assert config.segmentation.seeds == (0, 1, 2) and config.segmentation.strategies == ','.join(quality.STRATEGIES)
  assert config.data.name == 'folder' and config.data.image_size == quality.GENERATED['cpu'][1]
  assert quality.DATA_OF_PRESET['quick'] == 'cpu'  # the same images as the CPU preset, not new ones


@pytest.mark.parametrize('name', quality_data.SETTINGS)
def test_no_generated_image_is_flat_or_blown_out(name):
  """The bias field is a gain near 1 (zero-mean smooth noise), so no image saturates as a whole; 1,000 target
  images at the CPU preset's 32 x 32 once held an all-black one."""
  rng = np.random.default_rng([0, quality_data.SETTINGS.index(name), 1])
  for _ in range(300):
    image = quality_data.render(name, quality_data.LABELS[name](rng, 32), 1, rng)
    assert image.max() > image.min()
    assert np.mean((image == 0) | (image == 255)) < 0.5
  field = quality_data.smooth_noise(rng, 32, 8.0)
  assert abs(field.mean()) < 1e-9 and field.std() == pytest.approx(1.0)


def test_the_harness_runs_a_generated_setting_end_to_end_at_the_smoke_size(tmp_path, capsys):
  """`python -m benchmarks.quality --preset=smoke` on one generated setting: data written, the default pipeline
  (a second round: the setting has a validation split) run for every strategy, the table and the summary line
  printed, and the summary file holding the same numbers. Its Dice values mean nothing at this size."""
  summary = quality.main(['--preset=smoke', '--settings=multiclass', '--seeds=0', f'--workdir={tmp_path}'])
  out = capsys.readouterr().out
  assert 'diffusion.pseudo_labels_from=auto -> diffuseg' in out
  assert (tmp_path / 'data' / 'multiclass_smoke' / 'labels.json').exists()
  saved = json.loads((tmp_path / 'summary_smoke.json').read_text())
  strategies = saved['results']['multiclass']['strategies']
  assert set(strategies) == set(quality.STRATEGIES)
  assert saved['summary'] == summary and summary['settings'] == 1
  d, t, o = (strategies[k]['dice_mean'] for k in ('diffuseg', 'transfer', 'self'))
  assert summary['diffuseg_minus_transfer'] == pytest.approx(d - t)
  assert summary['diffuseg_frac_of_oracle'] == pytest.approx(d / o)
  assert out.strip().splitlines()[-1] == quality.summary_line(summary)
