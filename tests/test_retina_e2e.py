"""DRIVE -> IOSTAR as released (40 DRIVE images of 565 x 584, 30 IOSTAR of 1024 x 1024, on disk at full
resolution) through the pipeline with configs/iostar.py's own image size and batch sizes (tests/
test_medical_e2e.py `build_retina`): the medical end-to-end checks, plus the released sizes. In a module of
its own so that the parallel test workers share this and the other datasets' runs."""

import numpy as np
import pytest
import test_medical_e2e as medical
from medical_fixtures import DRIVE_HW, IOSTAR_HW
from test_medical_e2e import (  # noqa: F401 - pytest collects the imported tests here, on this module's fixture
    test_command_runs_on_the_layout,
    test_ground_truth_written_back_equals_the_label_files,
    test_predictions_on_the_original_grid,
    test_scores_and_units,
    test_synthetic_pairs_and_nnunet_export,
)

from diffuseg_jax.config_files import load_config, load_config_module
from diffuseg_jax.synthetic_io import load_synthetic

STRATEGIES = medical.STRATEGIES


@pytest.fixture(scope='module', params=['retina'])
def finished(request, tmp_path_factory):
  return medical.run_dataset(request.param, tmp_path_factory)


@pytest.fixture(scope='module')
def finished_full(finished):
  return finished


def test_retina_at_released_sizes(finished):
  """DRIVE -> IOSTAR (build_retina): every split at its released size, every batch the config's own, and
  every stage through `evaluate`, although the diffuseg network's training set is smaller than its batch."""
  _, ctx, _ = finished
  data, config, own = ctx.data, ctx.config, load_config('iostar')
  released = load_config_module('iostar').RELEASED_SPLITS  # 40 DRIVE; IOSTAR 21 / 3 / 6
  assert {k: len(getattr(data, k)) for k in ('source', 'target', 'val', 'test')} == released
  assert {info.extra['original_shape'] for info in data.source.volumes.values()} == {DRIVE_HW}
  assert {info.extra['original_shape'] for info in data.test.volumes.values()} == {IOSTAR_HW}
  assert data.source.images.shape == (40, 256, 256, 3) and data.test.labels.shape == (6, 256, 256)
  for section in ('vae', 'autoencoder', 'diffusion', 'sampling', 'segmentation', 'eval'):
    assert config[section].batch_size == own[section].batch_size
  assert config.data.image_size == own.data.image_size
  num_pairs = len(load_synthetic(ctx)['image'])
  assert num_pairs == 8 < config.segmentation.batch_size
  assert ctx.training_log('segment/diffuseg_seed0')[-1]['step'] == config.segmentation.steps
  strategies = ctx.read_results()['evaluate']['strategies']
  assert set(strategies) == set(STRATEGIES) and all(np.isfinite(r['dice_mean']) for r in strategies.values())
  # Latent diffusion through the KL autoencoder this run trained (factor 4: 64 x 64 x 4 latents).
  autoencoder = ctx.read_results()['autoencoder']
  assert autoencoder['kind'] == 'kl' and autoencoder['downsample'] == 4 and autoencoder['scaling_factor'] > 0
  assert load_synthetic(ctx)['image'].shape[1:] == (256, 256, 3)
