"""The pipeline on tiny copies of each medical dataset's public layout: every stage (teacher ... evaluate) on
one layout per kind of data, the first stage and the write-back of labels on the others (`FULL`).

Every dataset is built on disk in its release layout (tests/medical_fixtures.py, tests/fixtures.py) and run
with the tiny test config (2 steps per stage, strategies transfer + diffuseg), except DRIVE -> IOSTAR: its
released sizes, run with configs/iostar.py (`build_retina`; its tests run in tests/test_retina_e2e.py). The
checks are the outputs a user relies on: scores in metrics.json, predictions on the ORIGINAL voxel grid with
the ORIGINAL affine and the dataset's own label values, synthetic NIfTI pairs with their spacing, and the
nnU-Net export.

Compile time dominates on CPU, so the module shares one persistent XLA cache across its runs: datasets with
the same shapes (MSCMRseg, ACDC -> MSCMRseg) then reuse each other's programs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import fixtures
import jax
import medical_fixtures as mf
import nibabel as nib
import numpy as np
import pytest
from helpers import tiny_config
from jax.experimental.compilation_cache import compilation_cache

from diffuseg_jax import pipeline
from diffuseg_jax.config_files import load_config
from diffuseg_jax.context import Context
from diffuseg_jax.data import export, nifti, volumes
from diffuseg_jax.data.types import Split, VolumeInfo
from diffuseg_jax.stages import evaluate, synthesize
from diffuseg_jax.synthetic_io import load_synthetic

STRATEGIES = ('transfer', 'diffuseg')


@pytest.fixture(scope='module', autouse=True)
def shared_compile_cache(tmp_path_factory):
  """One persistent XLA cache for this module's runs; the previous settings are restored afterwards."""
  before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('xla')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  compilation_cache.reset_cache()
  yield
  jax.config.update('jax_compilation_cache_dir', before[0])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', before[1])
  compilation_cache.reset_cache()


def fast_config(**data):
  """configs/test.py shrunk further (2 steps everywhere), with the given `config.data` fields."""
  c = tiny_config()
  c.data.image_size = 16
  for key, value in data.items():
    c.data[key] = value
  c.vae.teacher_steps = c.vae.student_steps = 2
  c.diffusion.steps = 2
  c.sampling.num_steps = 2
  c.segmentation.steps = 2
  # Smaller programs (compile time dominates): a one-level diffusion UNet and segmentation UNet.
  c.diffusion.channel_mult, c.diffusion.attention_levels = (1,), (0,)
  c.segmentation.levels = 1
  c.segmentation.strategies = ','.join(STRATEGIES)
  # Batches of 8, one row per virtual device: the smallest training sets here have 8 to 12 slices.
  c.vae.batch_size = c.autoencoder.batch_size = c.diffusion.batch_size = c.segmentation.batch_size = 8
  c.sampling.batch_size = c.eval.batch_size = 8
  c.eval.num_figure_examples = 1
  return c


# Each builder writes its dataset under `root` and returns (config, {test image name: image file}).
def build_mscmr(root: pathlib.Path):
  mf.make_mscmr(root / 'MSCMRseg', sequences=('C0', 'DE'))
  config = fast_config(name='mscmr', root=str(root / 'MSCMRseg'), source='C0', target='DE',
                       empty_slices='drop_source')
  return config, _mscmr_images(root / 'MSCMRseg')


def build_acdc_mscmr(root: pathlib.Path):
  mf.make_acdc(root / 'ACDC', n_patients=3)
  mf.make_mscmr(root / 'MSCMRseg', sequences=('DE',), release='consecutive', seed=5)
  config = fast_config(name='acdc', root=str(root / 'ACDC'), target_root=str(root / 'MSCMRseg'), target='DE',
                       empty_slices='drop_source')
  return config, _mscmr_images(root / 'MSCMRseg')


def build_mmwhs(root: pathlib.Path):
  mf.make_mmwhs(root / 'MM-WHS', n_mr=3, n_ct=6)
  config = fast_config(name='mmwhs', root=str(root / 'MM-WHS'), source='mr', target='ct', slice_axis=2,
                       empty_slices='drop_source')
  images = {p.name[: -len('_image.nii.gz')]: p for p in (root / 'MM-WHS' / 'ct_train').glob('*_image.nii.gz')}
  return config, images


def build_folder_nifti(root: pathlib.Path, shape=(6, 8, 8)):
  """The folder layout with 3D NIfTI volumes (fixtures.PERMUTED_LPS_AFFINE) and raw label values 10 / 20 / 30,
  no labels.json: classes come from the values found (4 classes, like MSCMRseg: shared compiled programs)."""
  rng = np.random.default_rng(0)
  labels = fixtures.blob_labels(shape, values=(10, 20))
  labels[1:-1, :2, :3] = 30
  for split, names in (('source', ('s1', 's2')), ('target', ('t1', 't2')), ('test', ('x1', 'x2'))):
    for name in names:
      fixtures.write_volume(root / 'mydata' / split / 'images' / f'{name}.nii.gz', fixtures.random_volume(rng, shape))
      if split != 'target':
        fixtures.write_volume(root / 'mydata' / split / 'labels' / f'{name}.nii.gz', labels, dtype=np.uint8)
  config = fast_config(name='folder', root=str(root / 'mydata'), empty_slices='drop_source')
  return config, {nifti.nifti_stem(p): p for p in (root / 'mydata' / 'test' / 'images').iterdir()}


def build_retina(root: pathlib.Path):
  """DRIVE -> IOSTAR as released: 40 labelled DRIVE images of 565 x 584 and 30 IOSTAR images of 1024 x 1024,
  at full resolution on disk, run with configs/iostar.py: its image size (256), its batch sizes (8 and 16,
  evaluation 8) and data settings. Reduced: the steps (1 per stage, 2 DDIM steps), the synthetic pairs (8:
  fewer than the segmentation batch of 16, so the diffuseg network draws batches from a smaller set), one
  seed, STRATEGIES, the FFD-VAE's final weights (not chosen on validation), and the networks' widths and
  depths (`small_networks`). With the config's own networks this case takes about 6 minutes on 2 CPU cores
  (about 2 with small ones), over the suite's budget; set DIFFUSEG_TEST_OWN_NETWORKS=1 to run it so."""
  mf.make_drive(root / 'DRIVE', hw=mf.DRIVE_HW, training=range(21, 41), test=range(1, 21))
  mf.make_iostar(root / 'IOSTAR', n=30, hw=mf.IOSTAR_HW)
  config = load_config('iostar')
  config.data.update(root=str(root / 'DRIVE'), target_root=str(root / 'IOSTAR'))
  config.vae.teacher_steps = config.vae.student_steps = config.autoencoder.steps = 1
  config.diffusion.steps = config.segmentation.steps = 1
  config.sampling.num_steps = 2
  config.sampling.num_masks = 8
  config.segmentation.update(seeds=(0,), strategies=','.join(STRATEGIES))
  config.vae.select = 'last'  # choosing on validation scores 256 x 256 images twice more (tests/test_selection.py)
  config.train.progress = False
  if os.environ.get('DIFFUSEG_TEST_OWN_NETWORKS') != '1':
    small_networks(config)
  return config, {}


def small_networks(c) -> None:
  """Narrow, shallow networks at the config's image size: the diffusion UNet keeps two levels with attention
  only in the middle block (32 x 32 tokens of 64 x 64 latents; one level would attend over 64 x 64)."""
  c.vae.update(base_channels=8, levels=1, z_seg_channels=4, z_dom_dim=4)
  c.autoencoder.base_channels = 8
  c.diffusion.update(base_channels=8, channel_mult=(1, 1), attention_levels=(), num_heads=2, num_cond_tokens=2,
                     num_timesteps=100)
  c.segmentation.update(base_channels=8, levels=1)


def _mscmr_images(root: pathlib.Path) -> dict[str, pathlib.Path]:
  return {nifti.nifti_stem(p): p for p in (root / 'c0t2lge').glob('subject*_DE.nii.gz')}


BUILDERS = {'mscmr': build_mscmr, 'acdc_mscmr': build_acdc_mscmr, 'folder_nifti': build_folder_nifti,
            'mmwhs': build_mmwhs, 'retina': build_retina}
# Every stage runs on one layout per kind of data: 4-class cardiac volumes (MSCMRseg), 8-class volumes with a
# non-consecutive raw value (MM-WHS) and 2D colour images with FOV masks (DRIVE -> IOSTAR). ACDC -> MSCMRseg
# (two roots, consecutive raw values) and the NIfTI folder (raw values found in the files, a permuted LPS
# affine) share MSCMRseg's shapes and so every program after loading: they run the first stage (the layout
# loads and trains) and the write-back of their raw values and affines
# (test_ground_truth_written_back_equals_the_label_files), which is where they differ.
FULL = ('mscmr', 'mmwhs', 'retina')
VOLUMETRIC = ('mscmr', 'acdc_mscmr', 'folder_nifti', 'mmwhs')
# Raw label values of each class index, as the dataset's own files store them.
RAW_VALUES = {
    'mscmr': (0, 500, 600, 200),  # the challenge release of the fixture
    'acdc_mscmr': (0, 3, 1, 2),  # the target MSCMRseg fixture uses the consecutive (ACDC-style) values
    'mmwhs': (0, 500, 600, 420, 550, 205, 820, 850),  # 421 (an LA artefact of some files) is written as 420
    'folder_nifti': (0, 10, 20, 30),
}


_RUNS: dict[str, tuple] = {}  # one run per dataset, shared by the `finished` and `finished_full` fixtures


def run_dataset(name: str, tmp_path_factory):
  """(dataset, Context of the finished run, {test case name: original image file}); run once per dataset."""
  if name not in _RUNS:
    root = tmp_path_factory.mktemp(name)
    config, images = BUILDERS[name](root)
    if name not in FULL:
      config.stages = 'teacher'
    _RUNS[name] = name, pipeline.run(config, str(root / 'workdir'), show_progress=False), images
  return _RUNS[name]


# DRIVE -> IOSTAR at released sizes runs these tests in its own module (tests/test_retina_e2e.py), so that
# the parallel test workers share the two longest modules.
@pytest.fixture(scope='module', params=[name for name in BUILDERS if name != 'retina'])
def finished(request, tmp_path_factory, shared_compile_cache):
  del shared_compile_cache
  return run_dataset(request.param, tmp_path_factory)


@pytest.fixture(scope='module', params=[name for name in FULL if name != 'retina'])
def finished_full(request, tmp_path_factory, shared_compile_cache):
  """The datasets that ran every stage."""
  del shared_compile_cache
  return run_dataset(request.param, tmp_path_factory)


def test_command_runs_on_the_layout(finished):
  """Every dataset: the run loads the layout and trains; data in the right units/format."""
  name, ctx, _ = finished
  teacher = ctx.training_log('teacher')
  assert teacher and teacher[-1]['step'] == ctx.config.vae.teacher_steps and np.isfinite(teacher[-1]['loss'])
  data = ctx.data
  expected_classes = {'mmwhs': 8, 'retina': 2, 'folder_nifti': 4}.get(name, 4)
  size = 256 if name == 'retina' else 16  # retina: configs/iostar.py's own size
  assert data.num_classes == expected_classes and data.image_size == (size, size)
  assert data.channels == (3 if name == 'retina' else 1)
  assert (data.spacing_unit, data.image_format) == (('px', 'png') if name == 'retina' else ('mm', 'nifti'))
  assert evaluate.is_volumetric(ctx) == export.has_volumes(ctx.data) == (name in VOLUMETRIC)
  if name == 'retina':  # FOV masks reach the evaluation; IOSTAR's last image has none (full FOV)
    fov = evaluate.field_of_view(data.test)
    assert fov is not None and fov.shape == data.test.labels.shape
  else:
    assert evaluate.field_of_view(data.test) is None
    assert all(v.extra['label_values'] == RAW_VALUES[name] for v in data.test.volumes.values())


def test_scores_and_units(finished_full):
  name, ctx, _ = finished_full
  ev = ctx.read_results()['evaluate']
  assert set(ev['strategies']) == set(STRATEGIES)
  for r in ev['strategies'].values():
    assert 0.0 <= r['dice_mean'] <= 1.0 and 0.0 <= r['iou_mean'] <= 1.0
    assert set(r['per_class']) == set(ctx.data.class_names[1:])
  assert ev['distance_unit'] == ('px' if name == 'retina' else 'mm')
  assert ev['num_test_cases'] == len(np.unique(ctx.data.test.case_ids))
  report = open(ctx.path('report.md')).read()
  volumetric = 'predictions/<strategy>/<case>.nii.gz' in report and 'synthetic/nnunet/Dataset501_' in report
  assert volumetric == (name in VOLUMETRIC)


def test_predictions_on_the_original_grid(finished_full):
  """One file per test case and strategy, with exactly the original image's shape and affine."""
  name, ctx, images = finished_full
  if name not in VOLUMETRIC:  # 2D images: scored in pixels, no volumes to write back
    assert not os.path.exists(ctx.path('predictions'))
    return
  test_names = sorted(info.name for info in ctx.data.test.volumes.values())
  assert test_names and set(test_names) <= set(images)
  for strategy in STRATEGIES:
    files = sorted(os.listdir(ctx.path('predictions', strategy)))
    assert files == [f'{n}.nii.gz' for n in test_names]
    for case in test_names:
      original = nib.load(str(images[case]))
      pred = nib.load(ctx.path('predictions', strategy, f'{case}.nii.gz'))
      assert pred.shape == original.shape
      np.testing.assert_array_equal(pred.affine, original.affine)
      values = set(np.unique(np.asarray(pred.dataobj)).tolist())
      assert values <= set(RAW_VALUES[name]), values


def test_ground_truth_written_back_equals_the_label_files(finished, tmp_path):
  """The writer itself, fed the test LABELS as predictions: the files must reproduce the label files
  voxel for voxel in raw values, MM-WHS 421 -> 420. In-plane sizes are 16 x 16 (the model size) or 8 x 8
  (folder: nearest x2 and back), so resizing is exact."""
  name, ctx, images = finished
  copy = Context(config=ctx.config, workdir=str(tmp_path), mesh=ctx.mesh, show_progress=False)
  copy.data = ctx.data  # the run's data (loading it again costs seconds at retina's released sizes)
  written = export.write_volume_predictions(copy.data, copy.data.test.labels, copy.path('predictions', 'ground_truth'))
  if name not in VOLUMETRIC:
    assert written == [] and not (tmp_path / 'predictions').exists()
    return
  assert len(written) == len(copy.data.test.volumes)
  for path in written:
    case = nifti.nifti_stem(path)
    info = next(v for v in copy.data.test.volumes.values() if v.name == case)
    expected = np.asarray(nib.load(info.extra['label_path']).dataobj).astype(np.int64)
    expected[expected == 421] = 420
    got = nib.load(path)
    np.testing.assert_array_equal(np.asarray(got.dataobj).astype(np.int64), expected)
    np.testing.assert_array_equal(got.affine, nib.load(str(images[case])).affine)


def test_synthetic_pairs_and_nnunet_export(finished_full):
  name, ctx, _ = finished_full
  synth_dir = pathlib.Path(ctx.path('synthetic'))
  rows = [json.loads(line) for line in open(synth_dir / 'manifest.jsonl')]
  if name not in VOLUMETRIC:  # 2D natural images: PNG pairs, no nnU-Net (NIfTI) export
    assert rows and rows[0]['image'].endswith('.png') and rows[0]['label'].endswith('.png')
    assert not (synth_dir / 'nnunet').exists() and 'nnunet_dataset' not in ctx.read_results()['synthesize']
    return
  assert rows and rows[0]['image'].endswith('.nii.gz')
  spacing = synthesize.mask_spacing(ctx, np.array([r['mask_index'] for r in rows]))
  for row, (sh, sw) in list(zip(rows, spacing, strict=True))[:4]:
    for rel in (row['image'], row['label']):
      img = nib.load(str(synth_dir / rel))
      np.testing.assert_allclose(img.header.get_zooms()[:2], (sh, sw), rtol=1e-5)
  nnunet = synth_dir / 'nnunet'
  folders = list(nnunet.glob('Dataset501_*'))
  assert [f.name for f in folders] == [f'Dataset501_{ctx.config.data.name}']
  meta = json.loads((folders[0] / 'dataset.json').read_text())
  assert meta['labels'] == {'background': 0, **{c: i for i, c in enumerate(ctx.data.class_names) if i}}
  assert meta['numTraining'] == len(rows) == len(list((folders[0] / 'labelsTr').glob('*.nii.gz')))
  assert meta['file_ending'] == '.nii.gz' and meta['channel_names'] == {'0': 'image'}
  assert ctx.read_results()['synthesize']['nnunet_dataset'] == os.path.join('synthetic', 'nnunet',
                                                                            folders[0].name)
  # nnU-Net case files carry the spacing too, and the labels are the synthetic (given) masks.
  synth = load_synthetic(ctx)
  first = f'{ctx.config.data.name}_{int(synth["mask_index"][0]):07d}'
  label = nib.load(str(folders[0] / 'labelsTr' / f'{first}.nii.gz'))
  np.testing.assert_array_equal(np.asarray(label.dataobj)[..., 0], synth['label'][0])
  np.testing.assert_allclose(label.header.get_zooms()[:2], spacing[0], rtol=1e-5)


def _fov_split(fov: np.ndarray, labels: np.ndarray) -> Split:
  n = labels.shape[0]
  volumes = {i: VolumeInfo(name=f'img{i}', shape=(*labels.shape[1:], 1), affine=np.eye(4), slice_axis=2,
                           spacing=(1.0, 1.0, 1.0), extra={'fov': fov[i]}) for i in range(n)}
  return Split(images=np.zeros((*labels.shape, 3), np.float32), labels=labels,
               case_ids=np.arange(n, dtype=np.int32), spacing=np.ones((n, 2), np.float32),
               slice_index=np.zeros(n, np.int32), volumes=volumes)


def test_errors_outside_the_field_of_view_are_not_scored():
  """Retina: flipping predictions outside the FOV leaves every score unchanged; inside, it does not."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:12, :12]
  fov = np.broadcast_to((yy - 5.5) ** 2 + (xx - 5.5) ** 2 <= 30, (2, 12, 12))
  labels = (rng.random((2, 12, 12)) < 0.3).astype(np.int32) * fov
  pred = labels.copy()
  pred[:, 5:7, 2:9] = 1  # a few true errors inside the FOV
  split = _fov_split(fov, labels)
  names = ('background', 'vessel')
  base = evaluate.score_predictions(pred, split, names, False, 95.0)
  noisy = np.where(fov, pred, 1 - pred)  # every pixel outside the FOV is wrong
  assert evaluate.score_predictions(noisy, split, names, False, 95.0) == base
  # Reference Dice by hand on the FOV pixels, image by image, then the mean over images.
  dice = [2 * np.sum((pred[i] == 1) & (labels[i] == 1) & fov[i])
          / (np.sum((pred[i] == 1) & fov[i]) + np.sum((labels[i] == 1) & fov[i])) for i in range(2)]
  np.testing.assert_allclose(base['dice_mean'], np.mean(dice), rtol=1e-12)
  # Without the FOV the same outside errors would count: the masking is what keeps the score.
  no_fov = dataclasses.replace(split, volumes=None)
  assert evaluate.score_predictions(noisy, no_fov, names, False, 95.0)['dice_mean'] < base['dice_mean'] - 0.1


def test_raw_label_values_by_hand():
  """Class index -> raw value: the first raw value of each class in the map's order; None with a gap."""
  assert volumes.raw_label_values({0: 0, 500: 1, 420: 2, 421: 2, 205: 3}) == (0, 500, 420, 205)
  assert volumes.raw_label_values({0: 0, 3: 1, 1: 2, 2: 3}) == (0, 3, 1, 2)
  assert volumes.raw_label_values({0: 0, 7: 2}) is None and volumes.raw_label_values(None) is None
  np.testing.assert_array_equal(export.to_raw_values(np.array([[0, 2], [1, 2]]), (0, 500, 420)),
                                [[0, 420], [500, 420]])
