"""diffusion.pseudo_labels_from=diffuseg (relabel.py): the first round's identities, the seeds' joint labels,
and the config checks. The whole second round on a finished run: tests/test_pipeline_e2e.py."""

import jax
import numpy as np
import pytest
from helpers import make_context, tiny_config

from diffuseg_jax import atomic, inference, relabel, selection, units
from diffuseg_jax.config_validation import validate
from diffuseg_jax.errors import ConfigError
from diffuseg_jax.models.seg_unet import build_seg_unet
from diffuseg_jax.run_identity import FIRST_ROUND, Identities


def _config(source='diffuseg', seeds=(0, 1)):
  c = tiny_config()
  c.diffusion.pseudo_labels_from = source
  c.segmentation.seeds = seeds
  return c


def test_second_round_depends_on_the_first_rounds_segmenters_and_shares_everything_before():
  second, first = Identities(_config()), Identities(_config('student'))
  for unit in ('teacher', 'student', 'autoencoder', 'segment/transfer_seed0', 'segment/self_seed1'):
    assert second(unit).fingerprint == first(unit).fingerprint
  upstream = second('diffusion').upstream
  assert upstream == {'student': first('student').fingerprint, 'autoencoder': first('autoencoder').fingerprint,
                      f'{FIRST_ROUND}segment/diffuseg_seed0': first('segment/diffuseg_seed0').fingerprint,
                      f'{FIRST_ROUND}segment/diffuseg_seed1': first('segment/diffuseg_seed1').fingerprint}
  for unit in ('diffusion', 'synthesize', 'segment/diffuseg_seed0', 'segment/semi_seed1', 'quality'):
    assert second(unit).fingerprint != first(unit).fingerprint
  # 'student' is the value every run had before the field: it leaves every fingerprint as it was.
  c = _config('student')
  del c.diffusion['pseudo_labels_from']
  assert Identities(c)('diffusion').fingerprint == first('diffusion').fingerprint
  # The first round's segmenters do not depend on which seeds the second round has.
  assert Identities(_config(seeds=(1,)))('diffusion').upstream[f'{FIRST_ROUND}segment/diffuseg_seed1'] == (
      upstream[f'{FIRST_ROUND}segment/diffuseg_seed1'])


def test_ensemble_labels_are_the_argmax_of_the_mean_softmax():
  c = tiny_config()
  model = build_seg_unet(c.segmentation, 3)
  x = np.random.default_rng(0).standard_normal((4, 16, 16, 1)).astype(np.float32)
  params = [model.init(jax.random.key(k), x)['params'] for k in (0, 1, 2)]
  logits = [np.asarray(model.apply({'params': p}, x), np.float64) for p in params]
  probs = [np.exp(v - v.max(-1, keepdims=True)) / np.exp(v - v.max(-1, keepdims=True)).sum(-1, keepdims=True)
           for v in logits]
  expected = np.argmax(sum(probs) / 3, -1)
  got = np.asarray(inference.ensemble_labels(x, tuple(params), model=model))
  assert got.dtype == np.int32 and got.shape == (4, 16, 16)
  assert (got == expected).mean() > 0.999  # ties within float32 rounding aside
  # Each seed alone, and the mean of the logits, disagree with the vote on far more than 0.1 % of the pixels, so
  # a labeller that read one seed or averaged logits would fail the check above.
  for wrong in (*[np.argmax(v, -1) for v in logits], np.argmax(sum(logits), -1)):
    assert (wrong != expected).mean() > 0.01


def test_unknown_source_and_a_config_that_would_not_read_the_labels_are_clear_errors():
  c = tiny_config()
  c.diffusion.pseudo_labels_from = 'teacher'
  with pytest.raises(ConfigError, match='pseudo_labels_from=.teacher. is not one of student, diffuseg'):
    validate(c)
  c = tiny_config()  # the test config: diffusion.mask_condition='none'
  c.diffusion.pseudo_labels_from = 'diffuseg'
  c.sampling.region_content = 'label'
  with pytest.raises(ConfigError, match='leave it at'):
    validate(c)
  c.sampling.region_content = 'rendered'
  validate(c)


def test_validation_dice_of_both_rounds_is_read_from_the_units_and_creates_no_folder(tmp_path):
  ctx = make_context(_config(), tmp_path / 'wd')
  first = relabel.first_round_context(ctx)
  assert relabel.validation_dice(ctx) == {'round 1': None, 'round 2': None}
  assert not (tmp_path / 'wd' / units.UNITS_DIR).exists()
  for round_ctx, scores in ((first, (0.5, 0.7)), (ctx, (0.6, 0.9))):
    for seed, score in zip((0, 1), scores, strict=True):
      unit = f'segment/diffuseg_seed{seed}'
      path = units.unit_dir(ctx.workdir, unit, round_ctx.fingerprint(unit))
      atomic.write_json(f'{path}/{selection.SELECTION_FILE}', {'best_val_dice': score, 'selected_on': 'val'})
  assert relabel.validation_dice(ctx) == pytest.approx({'round 1': 0.6, 'round 2': 0.75})
