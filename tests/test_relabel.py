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
  # A second round's diffuseg segmenter may keep the first round's weights (relabel.weights_round): it lists
  # that segmenter, of its own seed only; the self-trained and semi segmenters do not.
  assert second('segment/diffuseg_seed1').upstream[f'{FIRST_ROUND}segment/diffuseg_seed1'] == first(
      'segment/diffuseg_seed1').fingerprint
  assert [u for u in second('segment/diffuseg_seed1').upstream if u.startswith(FIRST_ROUND)] == [
      f'{FIRST_ROUND}segment/diffuseg_seed1']
  for unit in ('segment/diffuseg_st_seed0', 'segment/semi_seed0'):
    assert not any(u.startswith(FIRST_ROUND) for u in second(unit).upstream)
  assert not any(u.startswith(FIRST_ROUND) for u in first('segment/diffuseg_seed0').upstream)
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


def _write_selection(round_ctx, seed, chosen):
  unit = f'segment/diffuseg_seed{seed}'
  path = units.unit_dir(round_ctx.workdir, unit, round_ctx.fingerprint(unit))
  atomic.write_json(f'{path}/{selection.SELECTION_FILE}', chosen)


def test_each_seed_keeps_the_round_whose_weights_score_higher_on_validation(tmp_path, monkeypatch):
  from diffuseg_jax import report
  from diffuseg_jax.stages import segment

  ctx = make_context(_config(seeds=(0, 1, 2, 3, 4)), tmp_path / 'wd')
  first = relabel.first_round_context(ctx)
  val = lambda dice: {'selected_on': 'val', 'best_val_dice': dice, 'best_step': 40}  # noqa: E731
  last = {'selected_on': 'last step', 'reason': 'no labelled validation split', 'best_step': None}
  cases = {  # seed: (first round's selection, second round's selection, the round whose weights are used)
      0: (val(0.8), val(0.7), 1),
      1: (val(0.6), val(0.7), 2),
      2: (val(0.7), val(0.7), 2),  # a tie keeps what the config asked for
      3: (last, last, 2),  # no validation split: nothing to choose on
      4: (None, val(0.5), 2),  # no first-round segmenter of this seed
  }
  for seed, (one, two, _) in cases.items():
    if one is not None:
      _write_selection(first, seed, one)
    _write_selection(ctx, seed, two)
  assert {k: relabel.weights_round(ctx, k) for k in cases} == {k: c[2] for k, c in cases.items()}
  unit = 'segment/diffuseg_seed0'
  assert relabel.weights_context(ctx, 'diffuseg', 0).fingerprint(unit) == first.fingerprint(unit)
  assert relabel.weights_context(ctx, 'diffuseg', 1) is ctx
  assert relabel.weights_context(ctx, 'diffuseg_st', 0) is ctx  # its own weights: trained in this round only
  assert relabel.weights_context(first, 'diffuseg', 0) is first  # an ordinary run chooses no round
  # segment.load reads the weights of the chosen round's unit. Only which unit it reads is checked here, the
  # task and weight loading stubbed: loading real weights of both rounds is the end-to-end test's work
  # (test_pipeline_e2e.py), and this test must not train two rounds.
  read = []
  monkeypatch.setattr(segment, 'task', lambda config, spec, strategy, seed: type('T', (), {
      'model': None, 'checkpoint': f'segment/{strategy}_seed{seed}'}))
  monkeypatch.setitem(ctx.__dict__, 'data', type('D', (), {'spec': None}))
  monkeypatch.setattr(selection, 'load_chosen', lambda c, t: read.append(c.fingerprint(t.checkpoint)))
  for seed in (0, 1):
    segment.load(ctx, 'diffuseg', seed)
  assert read == [first.fingerprint(unit), ctx.fingerprint('segment/diffuseg_seed1')]
  for seed in (3, 4):  # every seed scored in both rounds: the report says which kept the first round
    _write_selection(first, seed, val(0.5))
    _write_selection(ctx, seed, val(0.5))
  lines = report.second_round_lines(ctx)
  assert 'seed 0 kept the first round\'s weights' in lines[0]
  row = {'per_seed': [{'selection': {'selected_on': 'val', 'step': 40, 'round': 1}},
                      {'selection': {'selected_on': 'val', 'step': 120}}]}
  assert 'diffuseg 40 (round 1), 120' in report.selection_lines({'diffuseg': row}, ctx.config)[0]


class _Val:
  def __init__(self, n, labelled=True):
    self.n, self.labelled = n, labelled

  def __len__(self):
    return self.n


def _auto_context(val, **fields):
  import types

  c = tiny_config()
  c.diffusion.update(pseudo_labels_from='auto', mask_condition='pseudo_labels')
  c.segmentation.strategies = 'transfer,self,diffuseg'
  for dotted, value in fields.items():
    section, name = dotted.split('.')
    c[section][name] = value
  return types.SimpleNamespace(config=c, data=types.SimpleNamespace(val=val))


@pytest.mark.parametrize('val, fields, expected, why', [
    (_Val(50), {}, 'diffuseg', None),
    (None, {}, 'student', 'no labelled validation split'),
    (_Val(0), {}, 'student', 'no labelled validation split'),
    (_Val(50, labelled=False), {}, 'student', 'no labelled validation split'),
    (_Val(50), {'segmentation.select': 'last'}, 'student', 'segmentation.select=last'),
    (_Val(50), {'diffusion.mask_condition': 'none'}, 'student', 'diffusion.mask_condition=none'),
    (_Val(50), {'sampling.region_content': 'label'}, 'diffuseg', None),
    (_Val(50), {'segmentation.strategies': 'transfer,self'}, 'student', 'no diffuseg segmenter'),
])
def test_auto_runs_a_second_round_only_where_validation_can_choose_each_seeds_round(val, fields, expected, why):
  """'auto' -> 'diffuseg' exactly where a labelled validation split chooses between the rounds, the denoiser
  sees the label map and a diffuseg segmenter is trained; the resolved value replaces 'auto' in the config (so
  the fingerprints and config.json say what ran) and the logged line says why."""
  ctx = _auto_context(val, **fields)
  line = relabel.resolve_auto(ctx)
  assert ctx.config.diffusion.pseudo_labels_from == expected
  assert line.startswith(f'diffusion.pseudo_labels_from=auto -> {expected}')
  if why:
    assert why in line
  validate(ctx.config)
  # Resolved, the fingerprints are those of the value written out: a one-round run's are an ordinary run's.
  explicit = tiny_config()
  explicit.diffusion.update(pseudo_labels_from=expected, mask_condition=ctx.config.diffusion.mask_condition)
  explicit.sampling.region_content = ctx.config.sampling.region_content
  explicit.segmentation.update(strategies=ctx.config.segmentation.strategies, select=ctx.config.segmentation.select)
  assert Identities(ctx.config)('synthesize').fingerprint == Identities(explicit)('synthesize').fingerprint
  # A value other than 'auto' is left alone.
  assert relabel.resolve_auto(ctx) is None and ctx.config.diffusion.pseudo_labels_from == expected
