"""Segmenter weights chosen on the validation split (diffuseg_jax/selection.py): the score against a hand
count, the chosen weights are the best validation ones, and the test split is never read while choosing."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from helpers import make_context, tiny_config

from diffuseg_jax import report, selection
from diffuseg_jax.stages import segment

STEPS, EVERY = 6, 2


def test_pooled_foreground_dice_by_hand():
  label = np.array([[[0, 1, 1], [2, 2, 0]]])
  pred = np.array([[[1, 1, 0], [2, 0, 0]]])
  # class 1: |P|=2, |G|=2, overlap 1 -> 0.5; class 2: |P|=1, |G|=2, overlap 1 -> 2/3
  assert selection.pooled_foreground_dice(pred, label, 3) == pytest.approx((0.5 + 2 / 3) / 2)
  assert selection.pooled_foreground_dice(pred, label, 4) == pytest.approx((0.5 + 2 / 3) / 2)  # class 3 absent
  assert selection.pooled_foreground_dice(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), 2) == 1.0
  assert selection.pooled_foreground_dice(np.ones((1, 2, 2)), np.zeros((1, 2, 2)), 2) == 0.0


class _Untouchable:
  """Stands in for the test split: any use of it fails the test."""

  def __getattr__(self, name):
    raise AssertionError(f'model selection read the test split (.{name})')

  def __len__(self):
    raise AssertionError('model selection read the test split (len)')


def _config(**segmentation):
  config = tiny_config()
  config.segmentation.update({'strategies': 'transfer', 'steps': STEPS, 'select_every': EVERY, **segmentation})
  return config


def _with_validation(ctx, test_split):
  """The tiny data with a labelled validation split (8 target-domain images) and `test_split` as the test."""
  data = ctx.data
  ctx.data = dataclasses.replace(data, val=data.test.subset(np.arange(8)), test=test_split)
  return ctx


@pytest.fixture(scope='module')
def chosen_run(tmp_path_factory):
  ctx = make_context(_config(), tmp_path_factory.mktemp('selection'))
  _with_validation(ctx, _Untouchable())
  segment.run(ctx)  # would raise if anything read the test split
  return ctx


def test_weights_are_chosen_on_validation_without_reading_the_test_split(chosen_run):
  ctx = chosen_run
  chosen = selection.read(ctx, 'segment/transfer_seed0')
  assert chosen['selected_on'] == 'val' and chosen['num_images'] == 8 and chosen['every'] == EVERY
  scores = {int(k): v for k, v in chosen['scores'].items()}
  assert sorted(scores) == list(range(EVERY, STEPS + 1, EVERY))
  best = max(scores, key=lambda k: (scores[k], -k))  # the first step with the best score
  assert chosen['best_step'] == best and chosen['best_val_dice'] == scores[best]
  # The weights evaluation reads score what the selection recorded, recomputed here from their predictions.
  model, params = segment.load(ctx, 'transfer', 0)
  chooser = selection.BestOnValidation(ctx, 'segment/transfer_seed0', model)
  assert chooser.score(params) == pytest.approx(chosen['best_val_dice'], abs=1e-7)


def test_changed_test_labels_change_no_choice(chosen_run, tmp_path):
  """The same run with the real test split in place: the same scores and the same step."""
  ctx = make_context(_config(), tmp_path)
  _with_validation(ctx, ctx.data.test)
  segment.run(ctx)
  assert selection.read(ctx, 'segment/transfer_seed0')['scores'] == selection.read(
      chosen_run, 'segment/transfer_seed0')['scores']


def test_without_validation_labels_the_final_weights_are_used(tmp_path):
  ctx = make_context(_config(steps=2), tmp_path)  # the tiny data has no validation split
  segment.run(ctx)
  chosen = selection.read(ctx, 'segment/transfer_seed0')
  assert chosen == {'selected_on': 'last step', 'reason': 'no labelled validation split', 'best_step': None}
  t = segment.task(ctx.config, ctx.data.spec, 'transfer', 0)
  assert segment.load(ctx, 'transfer', 0)[1] is ctx.load(t)
  lines = report.selection_lines({'transfer': {'per_seed': [{'selection': {
      'selected_on': 'last step', 'reason': 'no labelled validation split'}}]}}, ctx.config)
  assert 'final EMA weights (no labelled validation split)' in lines[0]


def test_damaged_selected_weights_are_refused(chosen_run, tmp_path):
  import shutil

  shutil.copytree(chosen_run.workdir, tmp_path / 'wd')
  ctx = _with_validation(make_context(_config(), tmp_path / 'wd'), _Untouchable())
  path = os.path.join(ctx.unit_dir('segment/transfer_seed0'), selection.PARAMS_FILE)
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b'\x00\x01\x02')
  with pytest.raises(Exception, match='changed since it was written'):
    segment.load(ctx, 'transfer', 0)
  assert json.load(open(os.path.join(ctx.unit_dir('segment/transfer_seed0'), selection.SELECTION_FILE)))


def test_the_best_scored_step_is_the_one_evaluated(tmp_path, monkeypatch):
  """Scores 0.5, 0.9, 0.1 at steps 2, 4, 6: evaluation gets step 4's EMA weights (its checkpoint's), not the
  final ones."""
  from diffuseg_jax.train import task as task_lib
  from diffuseg_jax.train.checkpoint import StageCheckpointer

  scores = iter([0.5, 0.9, 0.1])
  monkeypatch.setattr(selection.BestOnValidation, 'score', lambda self, params: next(scores))
  ctx = _with_validation(make_context(_config(), tmp_path), _Untouchable())
  ctx.config.checkpoint.every_steps = 2
  segment.run(ctx)
  assert selection.read(ctx, 'segment/transfer_seed0')['best_step'] == 4
  t = segment.task(ctx.config, ctx.data.spec, 'transfer', 0)
  checkpointer = StageCheckpointer(ctx.checkpoint_dir(t.checkpoint))
  step4, _, step = checkpointer.restore(task_lib.abstract_state(t, ctx.mesh), step=4)
  checkpointer.close()
  assert step == 4
  _, params = segment.load(ctx, 'transfer', 0)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(step4.ema_params), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  final = ctx.load(t)
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(final), strict=True))


def _vae_config(**vae):
  config = tiny_config()
  config.vae.update({'teacher_steps': STEPS, 'student_steps': STEPS, 'select': 'val', 'select_every': EVERY, **vae})
  return config


def _ffd_vae_val_dice(ctx, model, params) -> float:
  """The segmentation head's pooled Dice on the validation split, recomputed here: argmax of the posterior-mean
  logits of all validation images in one call (no batches, no padding, no mesh)."""
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x, sample=False)['seg_logits'])(params, ctx.data.val.images)
  return selection.pooled_foreground_dice(np.asarray(jax.numpy.argmax(logits, -1)), ctx.data.val.labels,
                                          ctx.data.num_classes)


BONUS = {2: 10.0}  # added to the teacher's 2nd score (step 4), so that the choice is not the final weights


@pytest.fixture(scope='module')
def chosen_vae(tmp_path_factory):
  """vae.select='val': the teacher trained with the test split replaced by a stand-in that fails on any use,
  its step-4 score raised by 10 (its real scores kept), then the student, whose `frozen` teacher is recorded.
  Returns (ctx, {teacher step: real score}, the teacher weights the student was distilled from)."""
  from diffuseg_jax.stages import student, teacher

  ctx = make_context(_vae_config(), tmp_path_factory.mktemp('vae_selection'))
  ctx.config.checkpoint.every_steps = 2
  test_split = ctx.data.test
  _with_validation(ctx, _Untouchable())
  real, calls, score = {}, [], selection.BestOnValidation.score

  def raised(self, params):
    calls.append(None)
    value = score(self, params)
    if self.folder == ctx.unit_dir('teacher'):
      real[EVERY * len(real) + EVERY] = value
    return value + BONUS.get(len(calls), 0.0)

  frozen = {}
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(selection.BestOnValidation, 'score', raised)
    teacher.run(ctx)  # would raise if anything read the test split
    ctx.data = dataclasses.replace(ctx.data, test=test_split)  # the student's diagnostics score the test split
    train = ctx.train

    def recording_train(t, arrays, **kwargs):
      frozen['params'] = kwargs.get('frozen')
      return train(t, arrays, **kwargs)

    patch.setattr(ctx, 'train', recording_train)
    student.run(ctx)
  return ctx, real, frozen['params']


def test_teacher_weights_are_chosen_on_validation_without_reading_the_test_split(chosen_vae):
  """The teacher is scored by its segmentation head on the validation split every select_every steps: each real
  score is that step's EMA weights' Dice recomputed here from its checkpoint; the best score's weights are the
  ones teacher.load gives."""
  from diffuseg_jax.stages import teacher
  from diffuseg_jax.train import task as task_lib
  from diffuseg_jax.train.checkpoint import StageCheckpointer

  ctx, real, _ = chosen_vae
  chosen = selection.read(ctx, 'teacher')
  assert chosen['selected_on'] == 'val' and chosen['every'] == EVERY and chosen['num_images'] == 8
  scores = {int(k): v for k, v in chosen['scores'].items()}
  assert sorted(scores) == sorted(real) == list(range(EVERY, STEPS + 1, EVERY))
  assert scores == {k: v + (BONUS[2] if k == 4 else 0.0) for k, v in real.items()} and chosen['best_step'] == 4
  t = teacher.task(ctx.config, ctx.data.spec)
  checkpointer = StageCheckpointer(ctx.checkpoint_dir(t.checkpoint))
  for step in sorted(set(checkpointer.all_steps()) & set(real)):
    state, _, _ = checkpointer.restore(task_lib.abstract_state(t, ctx.mesh), step=step)
    assert _ffd_vae_val_dice(ctx, t.model, state.ema_params) == pytest.approx(real[step], abs=1e-7), step
  checkpointer.close()
  assert _ffd_vae_val_dice(ctx, t.model, teacher.load(ctx)) == pytest.approx(real[4], abs=1e-7)


def test_the_student_distils_the_chosen_teacher_and_is_chosen_too(chosen_vae):
  """The student is distilled from the chosen teacher (step 4), not the final one, and is itself chosen on the
  validation split: student.load's weights score what its selection recorded."""
  from diffuseg_jax.stages import student, teacher

  ctx, _, frozen = chosen_vae
  for got, want in zip(jax.tree.leaves(frozen), jax.tree.leaves(teacher.load(ctx)), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  final = ctx.load(teacher.task(ctx.config, ctx.data.spec))
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(final), strict=True))
  chosen = selection.read(ctx, 'student')
  assert chosen['selected_on'] == 'val' and chosen['best_step'] in {int(k) for k in chosen['scores']}
  model, params = student.load(ctx)
  assert _ffd_vae_val_dice(ctx, model, params) == pytest.approx(chosen['best_val_dice'], abs=1e-7)


def test_the_paper_keeps_the_final_teacher(tmp_path):
  """vae.select='last', or no validation labels: the teacher trains without a selection hook, selection.json says
  why, and teacher.load gives the final weights (the stage around a stand-in context; nothing is trained)."""
  from types import SimpleNamespace

  from diffuseg_jax.stages import teacher

  config = _vae_config(select='last')
  source = SimpleNamespace(images=np.zeros((2, 8, 8, 1), np.float32), labels=np.zeros((2, 8, 8), np.int32))
  calls, final = [], object()
  ctx = SimpleNamespace(config=config, data=SimpleNamespace(source=source, spec=None, val=None),
                        is_main_process=True, unit_dir=lambda unit: str(tmp_path / unit),
                        train=lambda t, arrays, **kwargs: calls.append(kwargs), load=lambda t: final)
  t = SimpleNamespace(name='teacher', checkpoint='teacher', model=None, init_params=None, rng=None)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(teacher, 'task', lambda config, spec: t)
    teacher.run(ctx)
    assert 'select' not in calls[0]
    assert selection.read(ctx, 'teacher') == {'selected_on': 'last step', 'reason': 'vae.select=last',
                                              'best_step': None}
    assert teacher.load(ctx) is final
    config.vae.select = 'val'  # no validation split
    teacher.run(ctx)
    assert 'select' not in calls[1]
    assert selection.read(ctx, 'teacher')['reason'] == 'no labelled validation split'
