"""Loaders of the public medical datasets, on tiny copies of their exact layouts (medical_fixtures.py)."""

import medical_fixtures as mf
import nibabel as nib
import numpy as np
import pytest

from diffuseg_jax.config_files import load_config, load_config_module
from diffuseg_jax.data import acdc, load_domain_data, mmwhs, mscmr, retina
from diffuseg_jax.errors import ConfigError, DataError


def config(name: str, **data):
  c = load_config(name)
  c.data.image_size = 16
  for k, v in data.items():
    setattr(c.data, k, v)
  c.lock()
  return c.data


def names(split) -> set[str]:
  return {info.name for info in split.volumes.values()}


def assert_labels_match(split, expected: dict[str, np.ndarray], slice_axis: int = 2) -> None:
  """Every slice's labels equal the hand-computed canonical class volume of its case."""
  for case_id, info in split.volumes.items():
    rows = np.flatnonzero(split.case_ids == case_id)
    assert rows.size > 0
    for row in rows:
      want = np.take(expected[info.name], split.slice_index[row], axis=slice_axis)
      msg = f'{info.name} slice {split.slice_index[row]}'
      np.testing.assert_array_equal(split.labels[row], want, err_msg=msg)


def assert_common(data, num_classes: int, channels: int) -> None:
  splits = [s for s in (data.source, data.target, data.val, data.test) if s is not None]
  ids = [set(s.volumes) for s in splits]
  assert sum(len(i) for i in ids) == len(set().union(*ids)), 'case ids must be unique across splits'
  assert data.num_classes == num_classes and data.class_names[0] == 'background'
  for s in splits:
    assert s.images.dtype == np.float32 and s.images.shape[1:] == (16, 16, channels)
    assert s.images.min() >= -1.0 and s.images.max() <= 1.0
    assert s.labels is not None and s.labels.dtype == np.int32
    assert s.labels.min() >= 0 and s.labels.max() < num_classes


def subject(name: str) -> str:
  return name.split('_')[0]


# MSCMRseg -------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def mscmr_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('mscmr')
  return root, mf.make_mscmr(root)


def test_mscmr_splits_by_subject_and_maps_labels(mscmr_root):
  root, expected = mscmr_root
  data = load_domain_data(config('mscmr', root=str(root)), seed=0)
  assert_common(data, 4, 1)
  assert data.class_names == ('background', 'LV', 'RV', 'Myo')
  assert (data.spacing_unit, data.image_format) == ('mm', 'nifti')
  train = {subject(n) for n in names(data.source)}
  assert {n.split('_')[1] for n in names(data.source)} == {'C0'}
  assert names(data.target) == {f'{s}_DE' for s in train}  # target = DE of the SAME train subjects
  val, test = {subject(n) for n in names(data.val)}, {subject(n) for n in names(data.test)}
  assert names(data.test) == {f'{s}_DE' for s in test}
  assert not (train & val or train & test or val & test)
  assert len(train | val | test) == 6 and (len(train), len(val), len(test)) == (4, 1, 1)
  for split in (data.source, data.target, data.val, data.test):
    assert_labels_match(split, expected)
  # drop_source (the config's choice): the all-background slice 0 is gone from the source only.
  assert 0 not in data.source.slice_index and 0 in data.test.slice_index
  np.testing.assert_allclose(data.test.spacing, np.tile([0.75, 0.75], (len(data.test), 1)))


def test_mscmr_known_voxel(mscmr_root):
  """Each raw value lands on its class at the voxel nibabel's canonical image puts it (independent path)."""
  root, _ = mscmr_root
  data = mscmr.load(config('mscmr', root=str(root), source='DE', empty_slices='keep'), seed=0)
  (case_id, info), = [(i, v) for i, v in data.test.volumes.items()]
  path = root / 'labels' / f'{info.name}_manual.nii.gz'
  img = nib.load(str(path))
  canonical = np.asarray(nib.as_closest_canonical(img).dataobj)
  for value, cls in ((500, 1), (600, 2), (200, 3)):
    i, j, k = np.argwhere(canonical == value)[0]
    row = np.flatnonzero((data.test.case_ids == case_id) & (data.test.slice_index == k))[0]
    assert data.test.labels[row, i, j] == cls


def test_mscmr_lps_voxel_by_hand(tmp_path):
  expected = mf.make_mscmr(tmp_path, n_subjects=3, sequences=('C0', 'DE'))
  data = mscmr.load(config('mscmr', root=str(tmp_path), empty_slices='keep', split_fractions=(1, 0, 1)),
                    seed=0)
  checked = 0
  for split in (data.source, data.target, data.test):
    for case_id, info in split.volumes.items():
      img = nib.load(str(tmp_path / 'labels' / f'{info.name}_manual.nii.gz'))
      if not np.allclose(np.diag(img.affine)[:3], [-info.spacing[0], -info.spacing[1], info.spacing[2]]):
        continue  # only the LPS-style (x, y flipped) headers
      raw = np.asarray(img.dataobj)
      i, j, k = np.argwhere(raw == 500)[0]
      row = np.flatnonzero((split.case_ids == case_id) & (split.slice_index == k))[0]
      assert split.labels[row, 15 - i, 15 - j] == 1
      assert expected[info.name][15 - i, 15 - j, k] == 1
      checked += 1
  assert checked > 0


def test_mscmr_consecutive_release_detected(tmp_path):
  expected = mf.make_mscmr(tmp_path, release='consecutive', sequences=('C0', 'DE'))
  assert mscmr.label_release(tmp_path / 'labels' / 'subject1_DE_manual.nii.gz') == 'consecutive'
  data = mscmr.load(config('mscmr', root=str(tmp_path)), seed=1)
  for split in (data.source, data.target, data.test):
    assert_labels_match(split, expected)


def test_mscmr_rejects_mixed_values_missing_label_and_empty_root(tmp_path):
  mf.make_mscmr(tmp_path / 'a', n_subjects=4, sequences=('C0', 'DE'))
  path = tmp_path / 'a' / 'labels' / 'subject2_DE_manual.nii.gz'
  img = nib.load(str(path))
  raw = np.asarray(img.dataobj).copy()
  raw[0, 0, 0] = 1  # a 1/2/3 value inside a 200/500/600 file
  nib.save(nib.Nifti1Image(raw, img.affine), str(path))
  with pytest.raises(DataError, match='subject2_DE_manual'):
    mscmr.load(config('mscmr', root=str(tmp_path / 'a')), seed=0)
  path.unlink()
  with pytest.raises(DataError, match=r'subject2_DE\.nii\.gz: no label subject2_DE_manual'):
    mscmr.load(config('mscmr', root=str(tmp_path / 'a')), seed=0)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DataError, match=f'{tmp_path / "empty"}.*no MSCMRseg'):
    mscmr.load(config('mscmr', root=str(tmp_path / 'empty')), seed=0)
  with pytest.raises(ConfigError, match='data.root'):
    mscmr.load(config('mscmr'), seed=0)
  with pytest.raises(ConfigError, match='data.target'):
    mscmr.load(config('mscmr', root=str(tmp_path / 'a'), target='FLAIR'), seed=0)


def test_slicing_across_thick_slices_is_rejected(mscmr_root):
  root, _ = mscmr_root
  with pytest.raises(DataError, match='slice_axis=2'):
    mscmr.load(config('mscmr', root=str(root), slice_axis=0), seed=0)


# ACDC -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def acdc_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('acdc')
  return root, mf.make_acdc(root)


def test_acdc_alone_ed_es_frames_and_mapping(acdc_root):
  root, expected = acdc_root
  data = load_domain_data(config('acdc', root=str(root), target='acdc', empty_slices='keep'), seed=0)
  assert_common(data, 4, 1)
  all_names = names(data.source) | names(data.val) | names(data.test)
  assert all_names == set(expected)  # ED + ES from Info.cfg; _4d and unlabelled frames ignored
  assert 'patient006_frame15' in all_names
  patients = [{subject(n) for n in names(s)} for s in (data.source, data.val, data.test)]
  assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
  for split in (data.source, data.target, data.val, data.test):
    assert_labels_match(split, expected)
  np.testing.assert_allclose(data.test.spacing[0], [1.5625, 1.5625])


def test_acdc_to_mscmr_shares_one_class_list(acdc_root, mscmr_root):
  (root, expected), (mroot, mexpected) = acdc_root, mscmr_root
  data = load_domain_data(config('acdc', root=str(root), target_root=str(mroot)), seed=0)
  assert_common(data, 4, 1)
  assert names(data.source) == set(expected)  # every ACDC patient is source
  assert {n.split('_')[1] for s in (data.target, data.val, data.test) for n in names(s)} == {'DE'}
  assert_labels_match(data.source, expected)
  for split in (data.target, data.test):
    assert_labels_match(split, mexpected)
  with pytest.raises(ConfigError, match='target_root'):
    acdc.load(config('acdc', root=str(root)), seed=0)


def test_acdc_missing_label_and_empty_root(tmp_path):
  mf.make_acdc(tmp_path / 'a', n_patients=3)
  (tmp_path / 'a' / 'training' / 'patient001' / 'patient001_frame10_gt.nii.gz').unlink()
  with pytest.raises(DataError, match='patient001_frame10.nii.gz: no label patient001_frame10_gt'):
    acdc.load(config('acdc', root=str(tmp_path / 'a'), target='acdc'), seed=0)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DataError, match='no ACDC frame files'):
    acdc.load(config('acdc', root=str(tmp_path / 'empty'), target='acdc'), seed=0)


def test_acdc_info_cfg(tmp_path):
  path = tmp_path / 'Info.cfg'
  path.write_text('Weight: 7\n ED : 3\nES:14\nNbFrame: 30\n')
  assert acdc.read_phases(path) == (3, 14)
  path.write_text('ED: 3\n')
  with pytest.raises(DataError, match='ES'):
    acdc.read_phases(path)


# MM-WHS ---------------------------------------------------------------------------------------------------
def test_mmwhs_mr_to_ct(tmp_path):
  expected = mf.make_mmwhs(tmp_path)
  data = load_domain_data(config('mmwhs', root=str(tmp_path), empty_slices='keep'), seed=0)
  assert_common(data, 8, 1)
  assert data.class_names == ('background', 'LV', 'RV', 'LA', 'RA', 'Myo', 'Ao', 'PA')
  assert names(data.source) == {f'mr_train_{1001 + i}' for i in range(4)}  # mr_test_* (unlabelled) ignored
  ct = [names(s) for s in (data.target, data.val, data.test)]
  assert sum(map(len, ct)) == 6 and len(set().union(*ct)) == 6
  assert all(n.startswith('ct_train_') for s in ct for n in s)
  for split in (data.source, data.target, data.val, data.test):
    assert_labels_match(split, expected)  # 421 -> LA is part of ct_train_1001's expectation
  raw = np.asarray(nib.load(str(tmp_path / 'ct_train' / 'ct_train_1001_label.nii.gz')).dataobj)
  assert 421 in raw and 420 in raw


def test_mmwhs_errors(tmp_path):
  mf.make_mmwhs(tmp_path, n_mr=2, n_ct=3)
  (tmp_path / 'ct_train' / 'ct_train_1002_label.nii.gz').unlink()
  with pytest.raises(DataError, match='ct_train_1002_image.nii.gz: no label'):
    mmwhs.load(config('mmwhs', root=str(tmp_path)), seed=0)
  with pytest.raises(ConfigError, match='data.source'):
    mmwhs.load(config('mmwhs', root=str(tmp_path), source='pet'), seed=0)
  (tmp_path / 'e').mkdir()
  with pytest.raises(DataError, match='no MM-WHS ct files'):
    mmwhs.load(config('mmwhs', root=str(tmp_path / 'e')), seed=0)


# Retina ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def retina_roots(tmp_path_factory):
  drive, iostar = tmp_path_factory.mktemp('drive'), tmp_path_factory.mktemp('iostar')
  return drive, mf.make_drive(drive), iostar, mf.make_iostar(iostar)


def test_retina_drive_to_iostar(retina_roots):
  drive, dexp, iostar, iexp = retina_roots
  data = load_domain_data(config('iostar', root=str(drive), target_root=str(iostar)), seed=0)
  assert_common(data, 2, 3)
  assert (data.spacing_unit, data.image_format) == ('px', 'png')
  assert names(data.source) == set(dexp)  # training and test images of DRIVE; 2nd_manual ignored
  target_names = [names(s) for s in (data.target, data.val, data.test)]
  assert set().union(*target_names) == set(iexp) and sum(map(len, target_names)) == 6
  for split in (data.target, data.val, data.test):  # 16 x 16 files: no resize, labels exact
    assert_labels_match(split, {k: v[:, :, None].astype(np.int32) for k, v in iexp.items()})
  np.testing.assert_allclose(data.source.spacing, np.tile([18 / 16, 20 / 16], (6, 1)))
  fovs = {info.name: info.extra['fov']
          for s in (data.target, data.val, data.test) for info in s.volumes.values()}
  yy, xx = np.mgrid[:16, :16]
  np.testing.assert_array_equal(fovs['STAR 01_OSC'], (yy - 8) ** 2 + (xx - 8) ** 2 <= 64)
  assert fovs['STAR 06_ODC'].all()  # no FOV file: whole image
  # Vessel pixels are darker in every channel (the images are the fundus, not the masks).
  src = data.source
  assert src.images[src.labels == 1].mean() < src.images[src.labels == 0].mean()


def test_retina_swapped_and_single_dataset(retina_roots):
  drive, dexp, iostar, iexp = retina_roots
  data = retina.load(config('iostar', root=str(iostar), target_root=str(drive), source='iostar',
                            target='drive'), seed=0)
  assert names(data.source) == set(iexp)
  assert set().union(*(names(s) for s in (data.target, data.val, data.test))) == set(dexp)
  alone = retina.load(config('iostar', root=str(drive), source='drive', target=None), seed=0)
  assert names(alone.source) == names(alone.target)
  assert not names(alone.source) & names(alone.test)


def test_retina_errors(tmp_path, retina_roots):
  drive, *_ = retina_roots
  mf.make_iostar(tmp_path / 'i', n=3)
  (tmp_path / 'i' / 'GT' / 'STAR 02_ODC_GT.png').unlink()
  with pytest.raises(DataError, match='STAR 02_ODC.jpg: no vessel label'):
    retina.load(config('iostar', root=str(drive), target_root=str(tmp_path / 'i')), seed=0)
  (tmp_path / 'e').mkdir()
  with pytest.raises(DataError, match='no DRIVE images'):
    retina.load(config('iostar', root=str(tmp_path / 'e'), target_root=str(tmp_path / 'i')), seed=0)
  with pytest.raises(ConfigError, match='target_root'):
    retina.load(config('iostar', root=str(drive)), seed=0)


def test_binary_mask_threshold():
  np.testing.assert_array_equal(retina.binary_mask(np.array([0, 1, 127, 128, 255])), [0, 0, 0, 1, 1])
  np.testing.assert_array_equal(retina.binary_mask(np.array([0, 1, 0])), [0, 1, 0])


# Configs --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name,dataset', [('mscmr', 'mscmr'), ('acdc', 'acdc'), ('mmwhs', 'mmwhs'),
                                          ('iostar', 'retina')])
def test_configs(name, dataset):
  c = load_config(name)
  size = 256 if name == 'iostar' else 128  # retina: vessels a few pixels wide in 565 x 584 / 1024 x 1024
  assert c.data.name == dataset and c.data.image_size == size
  assert c.autoencoder.kind == 'kl' and c.data.image_size // c.autoencoder.downsample == size // 4
  assert c.autoencoder.latent_channels == 4
  assert f'--config=configs/{name}.py' in load_config_module(name).__doc__
