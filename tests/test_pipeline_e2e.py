"""The whole pipeline on embedded data with the tiny test config: every stage, outputs, resume and skip, and
run identity (reruns with changed fields recompute exactly what changed)."""

import json
import os
import shutil

import numpy as np
import pytest
from helpers import tiny_config

from diffuseg_jax import pipeline, run_identity, units, workdir
from diffuseg_jax.run_identity import Identities
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
  assert 0.0 <= quality['synthetic_label_agreement'] <= 1.0  # the student on synthetic images vs their labels


def test_outputs_on_disk(finished_run):
  for rel in ('config.json', 'report.md', 'log.txt', 'figures/synthesis_examples.png',
              'figures/ffd_vae_reconstructions.png', 'figures/ffd_vae_segmentations.png',
              'figures/loss_curves.png', 'figures/segmentation_examples.png', 'synthetic/manifest.jsonl'):
    assert os.path.exists(finished_run.path(rel)), rel
  report = open(finished_run.path('report.md')).read()
  assert 'Transfer (source only)' in report and 'DiffuSeg (synthetic only)' in report and 'ORACLE' in report
  assert "the denoiser sees the latent and `z_dom` (the paper's eq. 7)" in report  # configs/test.py: paper's loop
  assert os.listdir(os.path.join(finished_run.unit_dir('teacher'), 'tensorboard', 'teacher'))
  assert finished_run.training_log('teacher')[-1]['step'] == finished_run.config.vae.teacher_steps
  assert os.path.islink(finished_run.path('synthetic'))  # -> this run's synthesize unit


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
  assert out.count('reused') + out.count('nothing to train') == len(pipeline.STAGES)
  assert out.count('plan: ') == out.count(' reuse ') > 0


def test_killed_synthesis_resumes_only_missing_shards(finished_run, tmp_path):
  """Delete one finished shard (as if the job died before writing it): the rerun redoes exactly that one."""
  workdir = tmp_path / 'wd'
  shutil.copytree(finished_run.workdir, workdir, symlinks=True)
  root = workdir / 'synthetic'
  os.remove(root / '..' / 'complete.json')  # killed before the unit was complete
  os.remove(root / 'manifest.jsonl')
  os.remove(root / 'shards' / 'shard_00001.jsonl')
  before = os.path.getmtime(root / 'shards' / 'shard_00000.jsonl')
  config = tiny_config()
  config.stages = 'synthesize'
  pipeline.run(config, str(workdir), show_progress=False)
  assert os.path.getmtime(root / 'shards' / 'shard_00000.jsonl') == before
  rows = [json.loads(line) for line in open(root / 'manifest.jsonl')]
  assert sorted(r['mask_index'] for r in rows) == list(range(config.sampling.num_masks))


# ---- Run identity: a rerun recomputes exactly the units whose fields (or upstream units) changed, keeps ----
# every earlier output, and the top of the workdir always describes the current run. Each case copies the
# finished run; a reused unit keeps its folder untouched (no file in it changes), a redone one gets a new one.
STRATEGIES = ('transfer', 'self', 'semi', 'diffuseg')


def _config(**overrides):
  c = tiny_config()
  for dotted, value in overrides.items():
    section, field = dotted.split('.')
    c[section][field] = value
  return c


def test_a_path_field_is_fingerprinted_as_the_folder_it_names(tmp_path, monkeypatch):
  """data.root relative, absolute or through a link: one folder, one identity; the same relative path run from
  two folders (two datasets) must not share units."""
  for name in ('a', 'b'):
    (tmp_path / name / 'data').mkdir(parents=True)
  (tmp_path / 'link').symlink_to(tmp_path / 'a' / 'data')
  monkeypatch.chdir(tmp_path / 'a')
  relative = Identities(_config(**{'data.root': 'data'}))('teacher')
  absolute = Identities(_config(**{'data.root': str(tmp_path / 'a' / 'data')}))('teacher')
  linked = Identities(_config(**{'data.root': str(tmp_path / 'link')}))('teacher')
  assert relative.fingerprint == absolute.fingerprint == linked.fingerprint
  assert relative.fields['data.root'] == os.path.realpath(tmp_path / 'a' / 'data')
  monkeypatch.chdir(tmp_path / 'b')
  assert Identities(_config(**{'data.root': 'data'}))('teacher').fingerprint != relative.fingerprint
  monkeypatch.setenv('HOME', str(tmp_path / 'a'))
  assert Identities(_config(**{'data.root': '~/data'}))('teacher').fingerprint == relative.fingerprint


def _copy(finished_run, tmp_path) -> str:
  wd = str(tmp_path / 'wd')
  shutil.copytree(finished_run.workdir, wd, symlinks=True)
  return wd


def _snapshot(wd: str) -> dict[str, float]:
  """{unit/fingerprint: newest file time in it}: which unit folders exist, and whether any file changed."""
  out = {}
  for unit, fp, path in units.all_units(wd):
    out[f'{unit}/{fp}'] = max(os.path.getmtime(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
  return out


def _changes(before: dict, after: dict) -> tuple[set, set]:
  """(units with a new folder, units whose existing folder changed)."""
  new = {k.rsplit('/', 1)[0] for k in set(after) - set(before)}
  touched = {k.rsplit('/', 1)[0] for k in before if after.get(k) != before[k]}
  return new, touched


def test_fingerprints_follow_the_fields_each_unit_reads():
  base = Identities(_config())
  other = Identities(_config(**{'sampling.guidance_scale': 3.0}))
  for unit in ('teacher', 'student', 'diffusion', 'segment/transfer_seed0'):
    assert base(unit).fingerprint == other(unit).fingerprint, unit
  for unit in ('synthesize', 'segment/diffuseg_seed0', 'evaluate/diffuseg_seed0', 'quality'):
    assert base(unit).fingerprint != other(unit).fingerprint, unit
  student_only = Identities(_config(**{'vae.student_steps': 5}))
  assert base('teacher').fingerprint == student_only('teacher').fingerprint
  assert base('student').fingerprint != student_only('student').fingerprint
  unseen = Identities(_config(**{'train.progress': True, 'checkpoint.every_steps': 3, 'eval.batch_size': 8}))
  assert all(base(u).fingerprint == unseen(u).fingerprint for u in ('teacher', 'synthesize', 'quality'))
  for field, value in (('vae.distill_on', 'target_and_source'), ('vae.augment_target', True)):
    changed = Identities(_config(**{field: value}))  # the student's own fields keep the teacher
    assert base('teacher').fingerprint == changed('teacher').fingerprint, field
    assert base('student').fingerprint != changed('student').fingerprint, field
  papers_teacher = Identities(_config(**{'vae.augment_source_intensity': False}))  # the default is True
  assert all(base(u).fingerprint != papers_teacher(u).fingerprint for u in ('teacher', 'student', 'synthesize'))
  assert base('segment/transfer_seed0').fingerprint == papers_teacher('segment/transfer_seed0').fingerprint
  monotone = Identities(_config(**{'vae.source_intensity_curves': 'monotone'}))  # a teacher field (default per_class)
  assert all(base(u).fingerprint != monotone(u).fingerprint for u in ('teacher', 'student', 'synthesize'))
  assert 'vae.source_intensity_curves' not in monotone('teacher').fields  # neutral: earlier workdirs keep units
  assert base('teacher').fields['vae.source_intensity_curves'] == 'per_class'
  final = Identities(_config(**{'vae.select': 'last'}))  # the paper's final teacher and student (default val)
  assert all(base(u).fingerprint != final(u).fingerprint for u in ('teacher', 'student', 'synthesize'))
  assert 'vae.select' not in final('teacher').fields and 'vae.select_every' not in final('teacher').fields  # neutral
  assert base('teacher').fields['vae.select'] == 'val'
  contrast = Identities(_config(**{'segmentation.augment_intensity': 'transfer'}))  # only the strategies named
  assert base('synthesize').fingerprint == contrast('synthesize').fingerprint
  assert base('segment/transfer_seed0').fingerprint != contrast('segment/transfer_seed0').fingerprint
  assert all(base(f'segment/{s}_seed0').fingerprint == contrast(f'segment/{s}_seed0').fingerprint
             for s in ('self', 'diffuseg'))
  every = Identities(_config(**{'segmentation.augment_intensity': 'all'}))
  assert every('segment/transfer_seed0').fingerprint == contrast('segment/transfer_seed0').fingerprint
  assert base('segment/self_seed0').fingerprint != every('segment/self_seed0').fingerprint
  assert Identities(_config(**{'segmentation.augment_intensity': 'none'}))('segment/transfer_seed0').fingerprint == (
      base('segment/transfer_seed0').fingerprint)
  threshold = Identities(_config(**{'segmentation.st_threshold': 0.5}))
  assert base('segment/diffuseg_seed0').fingerprint == threshold('segment/diffuseg_seed0').fingerprint
  assert base('segment/diffuseg_st_seed0').fingerprint != threshold('segment/diffuseg_st_seed0').fingerprint
  diff = run_identity.differences(base('synthesize').fields, other('synthesize').fields)
  assert diff == ['sampling.guidance_scale: 1.0 -> 3.0']


def test_changed_sampling_and_denoiser_fields_redo_diffusion_and_what_follows(finished_run, tmp_path, capsys):
  """guidance 1 -> 3, the test labels as the mask set and a denoiser that sees the mask
  (diffusion.mask_condition=pseudo_labels; one rerun for the three, since each recompiles the stages after it):
  the denoiser, synthesis, the segmenters trained on it and their scores are redone, the FFD-VAE and the other
  segmenters reused; the report shows the new values and marks the test-label run ORACLE; the denoiser's
  input is latent + K-1 label channels and its output depends on them; the mask region is still pasted
  exactly (hard blend to the last step)."""
  wd = _copy(finished_run, tmp_path)
  before = _snapshot(wd)
  config = _config(**{'sampling.guidance_scale': 3.0, 'sampling.mask_set': 'test',
                      'diffusion.mask_condition': 'pseudo_labels'})
  ctx = pipeline.run(config, wd, show_progress=False)
  new, touched = _changes(before, _snapshot(wd))
  assert new == {'diffusion', 'synthesize', 'segment/diffuseg_seed0', 'segment/semi_seed0',
                 'evaluate/diffuseg_seed0', 'evaluate/semi_seed0', 'quality'}
  assert touched == set()  # teacher, student, transfer, self: reused as they were
  out = capsys.readouterr().out
  assert 'sampling.guidance_scale: 1.0 -> 3.0; sampling.mask_set: source -> test' in out and 'plan: teacher' in out
  assert 'diffusion.mask_condition: <unset> -> pseudo_labels' in out  # 'none' is neutral (run_identity.py)
  metrics = json.load(open(os.path.join(wd, 'metrics.json')))
  assert metrics['synthesize']['guidance_scale'] == 3.0
  speed = metrics['synthesize']
  assert speed['sampler_images_per_second'] > 0 and speed['writer_busy_seconds'] > 0
  if speed['stage_images_per_second'] is not None:  # more than one batch
    ratio = speed['stage_images_per_second'] / speed['sampler_images_per_second']
    assert speed['stage_vs_sampler'] == pytest.approx(ratio)
    assert speed['sampling_images_per_second'] >= speed['stage_images_per_second']  # before the last write
  assert metrics['synthesize']['fingerprint'] == ctx.fingerprint('synthesize') == metrics['fingerprints']['synthesize']
  strategies = metrics['evaluate']['strategies']
  assert strategies['diffuseg']['per_seed'][0]['fingerprint'] == ctx.fingerprint('evaluate/diffuseg_seed0')
  assert strategies['diffuseg']['oracle'] and not strategies['transfer']['oracle']
  report = open(os.path.join(wd, 'report.md')).read()
  assert 'guidance 3.0' in report and 'ORACLE: synthesised from the test labels' in report
  assert 'the denoiser also sees the label map (`diffusion.mask_condition=pseudo_labels`)' in report
  assert json.load(open(os.path.join(wd, 'config.json')))['sampling']['guidance_scale'] == 3.0
  assert os.path.realpath(os.path.join(wd, 'synthetic')).startswith(os.path.realpath(ctx.unit_dir('synthesize')))
  # The denoiser sees the label channels.
  from diffuseg_jax.stages import diffusion

  model, params, codec = diffusion.load(ctx)
  c, k = finished_run.data.channels, finished_run.data.num_classes
  assert params['conv_in']['kernel'].shape[2] == c + k - 1
  h, w = finished_run.data.image_size
  x = np.random.default_rng(0).standard_normal((1, h, w, c)).astype(np.float32)
  z = np.zeros((1, finished_run.config.vae.z_dom_dim), np.float32)
  t = np.full((1,), 500, np.int32)
  outs = [model.apply({'params': params}, np.concatenate([x, np.full((1, h, w, k - 1), v, np.float32)], -1), t, z)
          for v in (0.0, 1.0)]
  assert float(np.abs(outs[0] - outs[1]).max()) > 1e-4  # the label channels change what it predicts
  assert ctx.read_results()['synthesize']['region_max_abs_error_latent'] < 1e-4


def test_added_seed_trains_and_evaluates_only_that_seed(finished_run, tmp_path):
  wd = _copy(finished_run, tmp_path)
  before = _snapshot(wd)
  pipeline.run(_config(**{'segmentation.seeds': (0, 1)}), wd, show_progress=False)
  new, touched = _changes(before, _snapshot(wd))
  assert new == {f'{kind}/{s}_seed1' for kind in ('segment', 'evaluate') for s in STRATEGIES} and touched == set()
  metrics = json.load(open(os.path.join(wd, 'metrics.json')))
  assert metrics['evaluate']['strategies']['diffuseg']['seeds'] == [0, 1]
  assert '| 2 |' in open(os.path.join(wd, 'report.md')).read()  # the seeds column


def test_changed_network_shape_retrains_it_and_switching_back_trains_nothing(finished_run, tmp_path, capsys):
  """A wider segmentation UNet: every segmenter and its scores are redone, every earlier checkpoint kept;
  the original config again trains nothing; the listing and removal command see both fingerprints."""
  wd = _copy(finished_run, tmp_path)
  before = _snapshot(wd)
  pipeline.run(_config(**{'segmentation.base_channels': 12}), wd, show_progress=False)
  after = _snapshot(wd)
  new, touched = _changes(before, after)
  assert new == {f'{kind}/{s}_seed0' for kind in ('segment', 'evaluate') for s in STRATEGIES}
  assert touched == set() and set(before) <= set(after)  # every earlier checkpoint kept, unchanged
  capsys.readouterr()
  pipeline.run(_config(), wd, show_progress=False)  # the original config again
  assert _snapshot(wd) == after  # nothing trained, nothing written in any unit
  out = capsys.readouterr().out
  assert ' run ' not in out and 'running' not in out
  lines = [line for line in workdir.listing(wd) if line.startswith('segment/transfer_seed0 ')]
  assert len(lines) == 2 and any(line.endswith('current') for line in lines)
  assert any('segmentation.base_channels: 8 -> 12' in line for line in lines)
  # Removing the wider network's fingerprint removes that folder only.
  wider = [fp for fp in units.kept_fingerprints(wd, 'segment/transfer_seed0') if fp != finished_run.fingerprint(
      'segment/transfer_seed0')]
  assert workdir.main([wd, '--remove', f'segment/transfer_seed0/{wider[0]}']) == 0
  assert units.kept_fingerprints(wd, 'segment/transfer_seed0') == [finished_run.fingerprint('segment/transfer_seed0')]
  assert len(units.kept_fingerprints(wd, 'segment/diffuseg_seed0')) == 2  # not named: kept
  with pytest.raises(SystemExit, match='no unit folder'):
    workdir.remove(wd, ['000000000000'])


def test_garbled_final_checkpoint_redoes_its_stage_only(finished_run, tmp_path, capsys):
  wd = _copy(finished_run, tmp_path)
  ctx = pipeline.Context(config=_config(), workdir=wd, mesh=finished_run.mesh, show_progress=False)
  final = os.path.join(ctx.unit_dir('diffusion'), 'checkpoints', str(ctx.config.diffusion.steps))
  victim = max((os.path.join(r, f) for r, _, fs in os.walk(final) for f in fs), key=os.path.getsize)
  with open(victim, 'r+b') as f:  # same size, other bytes: only the recorded checksum can tell
    data = bytearray(f.read())
    data[len(data) // 2] ^= 0xFF
    f.seek(0)
    f.write(data)
  assert not ctx.is_complete('diffusion')
  before = _snapshot(wd)
  pipeline.run(_config(), wd, show_progress=False)
  out = capsys.readouterr().out
  assert 'diffusion' in out and 'redo' in out and 'changed since it was written' in out
  new, touched = _changes(before, _snapshot(wd))
  assert new == set() and touched == {'diffusion'}  # downstream units were made from the intact final model
  assert ctx.is_complete('diffusion')
  assert os.path.isdir(os.path.join(ctx.unit_dir('diffusion'), 'checkpoints.unreadable'))


def test_self_training_strategy_adds_only_its_own_units(finished_run, tmp_path, capsys):
  """diffuseg_st on a finished run: trains on the synthetic pairs plus the target images pseudo-labelled by
  the diffuseg segmenter of the same seed; nothing else is trained again, and it is scored beside the others."""
  wd = _copy(finished_run, tmp_path)
  before = _snapshot(wd)
  strategies = ','.join((*STRATEGIES, 'diffuseg_st'))
  ctx = pipeline.run(_config(**{'segmentation.strategies': strategies}), wd, show_progress=False)
  new, touched = _changes(before, _snapshot(wd))
  assert new == {'segment/diffuseg_st_seed0', 'evaluate/diffuseg_st_seed0'} and touched == set()
  out = capsys.readouterr().out
  n_synthetic, n_target = len(load_synthetic(ctx)['image']), len(ctx.data.target)
  assert f'diffuseg_st seed 0: {n_target} target images pseudo-labelled by diffuseg seed 0' in out
  assert f'diffuseg_st seed 0: {n_synthetic + n_target} training images' in out
  strategies = json.load(open(os.path.join(wd, 'metrics.json')))['evaluate']['strategies']
  assert 0.0 <= strategies['diffuseg_st']['dice_mean'] <= 1.0 and not strategies['diffuseg_st']['oracle']
  assert 'DiffuSeg + self-training' in open(os.path.join(wd, 'report.md')).read()
  spec = run_identity.spec('segment/diffuseg_st_seed0')
  assert spec.upstream == ('synthesize', 'segment/diffuseg_seed0')


def test_second_round_relabels_the_target_with_the_first_rounds_segmenters(finished_run, tmp_path, capsys):
  """diffusion.pseudo_labels_from=diffuseg on a finished run: the finished run is the first round (its units
  reused, none added), and the denoiser, the synthesis and the segmenters on synthetic pairs are trained again,
  the rendered region's class appearance measured under the first round's diffuseg segmentation of the target
  (checked against that segmenter's argmax, applied here)."""
  from diffuseg_jax.stages import segment, synthesize

  wd = _copy(finished_run, tmp_path)
  before = _snapshot(wd)
  ctx = pipeline.run(_config(**{'diffusion.pseudo_labels_from': 'diffuseg'}), wd, show_progress=False)
  new, touched = _changes(before, _snapshot(wd))
  assert new == {'diffusion', 'synthesize', 'segment/diffuseg_seed0', 'segment/semi_seed0', 'evaluate/diffuseg_seed0',
                 'evaluate/semi_seed0', 'quality'}
  assert touched == set()
  assert ctx.identities('diffusion').upstream['round1:segment/diffuseg_seed0'] == finished_run.fingerprint(
      'segment/diffuseg_seed0')
  assert 'diffusion.pseudo_labels_from: <unset> -> diffuseg' in capsys.readouterr().out
  model, params = segment.load(finished_run, 'diffuseg', 0)
  images = finished_run.data.target.images
  logits = np.asarray(model.apply({'params': params}, images), np.float64)
  labels = np.argmax(logits, -1)  # one seed: the mean softmax's argmax is the logits'
  expected = synthesize.appearance_statistics(images, labels, finished_run.data.num_classes)
  appearance = ctx.read_results()['synthesize']['class_appearance_mean']
  np.testing.assert_allclose(appearance, expected['mean'], atol=1e-5)
  first = synthesize.appearance_statistics(images, diffusion_labels_of(finished_run), finished_run.data.num_classes)
  assert not np.allclose(first['mean'], expected['mean'], atol=1e-3)  # the student's labels differ
  report = open(os.path.join(wd, 'report.md')).read()
  assert "a first round's diffuseg segmenters" in report
  assert 'without validation scores for both rounds' in report  # the embedded data have no validation split


def test_auto_is_one_round_without_a_validation_split_and_the_run_records_it(finished_run, tmp_path, capsys):
  """diffusion.pseudo_labels_from=auto on the embedded data (no validation split to choose a round on): the run
  says why it takes one round, reuses every unit of the finished one-round run and records 'student'."""
  wd = _copy(finished_run, tmp_path)
  before = _snapshot(wd)
  pipeline.run(_config(**{'diffusion.pseudo_labels_from': 'auto'}), wd, show_progress=False)
  assert _changes(before, _snapshot(wd)) == (set(), set())
  out = capsys.readouterr().out
  assert 'diffusion.pseudo_labels_from=auto -> student (one round: no labelled validation split)' in out
  with open(os.path.join(wd, 'config.json')) as f:
    assert json.load(f)['diffusion']['pseudo_labels_from'] == 'student'


def diffusion_labels_of(ctx):
  from diffuseg_jax.stages import diffusion

  return diffusion.pseudo_labels(ctx, ctx.data.target.images)
