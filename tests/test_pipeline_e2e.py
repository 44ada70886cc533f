"""The whole pipeline on embedded data with the tiny test config: every stage, outputs, resume and skip."""

import json
import os
import shutil

import numpy as np
import pytest
from helpers import tiny_config

from diffuseg_jax import pipeline
from diffuseg_jax.synthetic_io import load_synthetic


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('e2e') / 'wd')
  config = tiny_config()
  ctx = pipeline.run(config, workdir, show_progress=False)
  return ctx


def test_metrics_json_has_the_stable_shape(finished_run):
  with open(finished_run.path('metrics.json')) as f:
    metrics = json.load(f)
  strategies = metrics['evaluate']['strategies']
  assert set(strategies) == {'transfer', 'self', 'semi', 'diffuseg'}
  for r in strategies.values():
    for key in ('dice_mean', 'dice_std', 'iou_mean', 'hd95_mean', 'per_class'):
      assert key in r
    assert 0.0 <= r['dice_mean'] <= 1.0
    assert 'digit' in r['per_class']
  assert strategies['self']['oracle'] and not strategies['diffuseg']['oracle']
  ffd = metrics['ffd_vae']
  for key in ('teacher_dice_target', 'student_dice_target', 'student_psnr_target', 'z_dom_variance_mean',
              'probe_accuracy_student'):
    assert key in ffd
  quality = metrics['evaluate']['image_quality']
  assert 'random-conv' in quality['feature_network'] and quality['fd_synthetic_vs_target'] >= 0
  assert quality['kid_synthetic_vs_target_std'] > 0  # a spread over distinct subsets, not identical ones


def test_outputs_on_disk(finished_run):
  for rel in ('config.json', 'report.md', 'metrics.jsonl', 'log.txt', 'figures/synthesis_examples.png',
              'figures/ffd_vae_reconstructions.png', 'figures/ffd_vae_segmentations.png',
              'figures/loss_curves.png', 'figures/segmentation_examples.png', 'synthetic/manifest.jsonl'):
    assert os.path.exists(finished_run.path(rel)), rel
  report = open(finished_run.path('report.md')).read()
  assert 'Transfer (source only)' in report and 'DiffuSeg (synthetic only)' in report and 'ORACLE' in report
  assert os.listdir(finished_run.path('tensorboard', 'teacher'))


def test_every_mask_synthesised_exactly_once(finished_run):
  with open(finished_run.path('synthetic', 'manifest.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  n = finished_run.config.sampling.num_masks
  assert sorted(r['mask_index'] for r in rows) == list(range(n))
  for r in rows[:3]:
    assert os.path.exists(finished_run.path('synthetic', r['image']))
  synth = load_synthetic(finished_run)
  np.testing.assert_array_equal(synth['label'], finished_run.data.source.labels[:n])
  assert synth['image'].shape == (n, 16, 16, 3) and np.all(np.abs(synth['image']) <= 1.0)
  assert not [f for f in os.listdir(finished_run.path('synthetic', 'images')) if '.tmp' in f]


def test_rerun_skips_every_stage(finished_run, capsys):
  pipeline.run(finished_run.config, finished_run.workdir, show_progress=False)
  out = capsys.readouterr().out
  assert out.count('skipped') + out.count('nothing to train') == len(pipeline.STAGES)


def test_killed_synthesis_resumes_only_missing_shards(finished_run, tmp_path):
  """Delete one finished shard (as if the job died before writing it): the rerun redoes exactly that one."""
  workdir = tmp_path / 'wd'
  shutil.copytree(finished_run.workdir, workdir)
  root = workdir / 'synthetic'
  os.remove(root / 'manifest.jsonl')
  os.remove(root / 'shards' / 'shard_00001.jsonl')
  before = os.path.getmtime(root / 'shards' / 'shard_00000.jsonl')
  config = tiny_config()
  config.stages = 'synthesize'
  pipeline.run(config, str(workdir), show_progress=False)
  assert os.path.getmtime(root / 'shards' / 'shard_00000.jsonl') == before
  rows = [json.loads(line) for line in open(root / 'manifest.jsonl')]
  assert sorted(r['mask_index'] for r in rows) == list(range(config.sampling.num_masks))


def test_kl_latent_space_path(finished_run, tmp_path):
  """Latent diffusion through a KL autoencoder trained here (reusing the finished FFD-VAE stages)."""
  workdir = tmp_path / 'wd'
  os.makedirs(workdir / 'checkpoints')
  for stage in ('teacher', 'student'):
    shutil.copytree(finished_run.path('checkpoints', stage), workdir / 'checkpoints' / stage)
  shutil.copy(finished_run.path('metrics.json'), workdir / 'metrics.json')
  config = tiny_config('kl')
  config.stages = 'autoencoder,diffusion,synthesize'
  ctx = pipeline.run(config, str(workdir), show_progress=False)
  metrics = ctx.read_results()
  assert metrics['autoencoder']['kind'] == 'kl' and metrics['autoencoder']['downsample'] == 2
  assert metrics['autoencoder']['scaling_factor'] > 0
  assert load_synthetic(ctx)['image'].shape[1:] == (16, 16, 3)
