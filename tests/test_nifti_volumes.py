"""NIfTI reading/writing, intensity normalisation, slicing, subject splits and reassembly."""

import os

import fixtures
import nibabel as nib
import numpy as np
import pytest

from diffuseg_jax.data import nifti, volumes
from diffuseg_jax.errors import ConfigError, DataError, UserError


@pytest.fixture
def rng():
  return np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------- nifti


def test_read_image_canonical_orientation_and_spacing(tmp_path, rng):
  stored = fixtures.random_volume(rng, (4, 8, 6), np.int16)
  vol = nifti.read_image(fixtures.write_volume(tmp_path / 'img.nii.gz', stored))
  np.testing.assert_array_equal(vol.data, fixtures.to_canonical_by_hand(stored).astype(np.float32))
  assert vol.data.dtype == np.float32 and vol.shape == (8, 6, 4)
  np.testing.assert_allclose(vol.spacing, [0.75, 0.75, 10.0])
  assert vol.original_shape == (4, 8, 6)
  np.testing.assert_allclose(vol.original_affine, fixtures.PERMUTED_LPS_AFFINE, atol=1e-6)
  # Canonical voxel (0, 0, 0) is stored voxel (0, 7, 5): both must map to the same world point.
  world_stored = fixtures.PERMUTED_LPS_AFFINE @ np.array([0, 7, 5, 1.0])
  np.testing.assert_allclose(vol.affine @ np.array([0, 0, 0, 1.0]), world_stored, atol=1e-5)
  assert np.all(np.diag(vol.affine)[:3] > 0)  # RAS+


def test_read_image_float32_ras_is_unchanged(tmp_path, rng):
  data = rng.normal(size=(5, 4, 3)).astype(np.float32)
  affine = np.diag([0.75, 0.75, 10.0, 1.0])
  vol = nifti.read_image(fixtures.write_volume(tmp_path / 'f.nii', data, affine))
  np.testing.assert_array_equal(vol.data, data)
  np.testing.assert_allclose(vol.spacing, [0.75, 0.75, 10.0])


def test_read_image_2d_and_trailing_singleton(tmp_path, rng):
  data2d = rng.normal(size=(5, 4)).astype(np.float32)
  vol = nifti.read_image(fixtures.write_volume(tmp_path / 'a.nii.gz', data2d, np.diag([0.5, 0.5, 1.0, 1.0])))
  assert vol.shape == (5, 4, 1) and vol.original_shape == (5, 4)
  np.testing.assert_array_equal(vol.data[..., 0], data2d)
  vol4 = nifti.read_image(fixtures.write_volume(tmp_path / 'b.nii.gz', data2d[:, :, None, None], np.eye(4)))
  assert vol4.shape == (5, 4, 1)


@pytest.mark.parametrize('case', ['missing', 'truncated', 'garbage', '4d', 'nan'])
def test_read_image_errors(tmp_path, rng, case):
  path = tmp_path / f'{case}.nii.gz'
  if case in ('truncated', 'garbage'):
    fixtures.write_volume(path, np.tile(np.arange(64, dtype=np.int16), (64, 64, 1)))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 3 // 5] if case == 'truncated' else b'not a nifti' * 40)
  elif case == '4d':
    fixtures.write_volume(path, np.zeros((4, 4, 3, 2), np.float32))
  elif case == 'nan':
    data = np.zeros((4, 4, 3), np.float32)
    data[1, 2, 0] = np.nan
    fixtures.write_volume(path, data)
  with pytest.raises(DataError, match=f'{case}.nii.gz') as err:
    nifti.read_image(path)
  message = str(err.value)
  assert '\n' not in message
  expected = {'missing': 'not found', 'truncated': 'cannot read', 'garbage': 'cannot read', '4d': '4D',
              'nan': 'NaN'}
  assert expected[case] in message


def test_read_label_matches_image_and_validates(tmp_path, rng):
  stored = fixtures.blob_labels((4, 8, 6))
  image_path = fixtures.write_volume(tmp_path / 'img.nii.gz', fixtures.random_volume(rng, (4, 8, 6)))
  image = nifti.read_image(image_path)
  label = nifti.read_label(fixtures.write_volume(tmp_path / 'lab.nii.gz', stored, dtype=np.uint8), image)
  assert label.dtype == np.int32
  np.testing.assert_array_equal(label, fixtures.to_canonical_by_hand(stored))
  # Float rounding of the affine within tolerance is accepted.
  nudged = fixtures.PERMUTED_LPS_AFFINE + 1e-5
  nudged[3] = [0, 0, 0, 1]
  nifti.read_label(fixtures.write_volume(tmp_path / 'ok.nii.gz', stored, nudged), image)

  with pytest.raises(DataError, match=r'bad_shape.nii.gz: label shape \(4, 8, 5\) differs'):
    nifti.read_label(fixtures.write_volume(tmp_path / 'bad_shape.nii.gz', stored[:, :, :5]), image)
  shifted = fixtures.PERMUTED_LPS_AFFINE.copy()
  shifted[0, 3] += 0.5
  with pytest.raises(DataError, match='bad_affine.nii.gz: label affine differs .* by up to 0.5'):
    nifti.read_label(fixtures.write_volume(tmp_path / 'bad_affine.nii.gz', stored, shifted), image)
  with pytest.raises(DataError, match=r'frac.nii.gz: label values must be integers, found \[0.5\]'):
    nifti.read_label(fixtures.write_volume(tmp_path / 'frac.nii.gz', stored.astype(np.float32) / 2), image)


def test_write_nifti_roundtrip_atomic_and_unwritable(tmp_path, rng):
  data = rng.integers(0, 5, (6, 5, 4)).astype(np.int64)
  path = nifti.write_nifti(tmp_path / 'sub' / 'out.nii.gz', data, fixtures.PERMUTED_LPS_AFFINE)
  img = nib.load(str(path))
  assert img.get_data_dtype() == np.int32
  np.testing.assert_array_equal(np.asarray(img.dataobj), data)
  np.testing.assert_allclose(img.affine, fixtures.PERMUTED_LPS_AFFINE, atol=1e-6)
  np.testing.assert_allclose(img.header.get_zooms(), [10.0, 0.75, 0.75])
  assert sorted(os.listdir(tmp_path / 'sub')) == ['out.nii.gz']  # no temporary file left behind
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  with pytest.raises(UserError, match='a_file'):
    nifti.write_nifti(blocker / 'out.nii.gz', data, np.eye(4))


# -------------------------------------------------------------------------------------------- volumes


def _percentile_by_hand(values: np.ndarray, q: float) -> float:
  """Linear-interpolation percentile from the sorted values (numpy's default definition)."""
  s = np.sort(values.ravel().astype(np.float64))
  pos = q / 100.0 * (s.size - 1)
  lo = int(np.floor(pos))
  hi = min(lo + 1, s.size - 1)
  return float(s[lo] + (pos - lo) * (s[hi] - s[lo]))


def test_normalise_intensity_against_hand_percentiles(rng):
  vol = fixtures.random_volume(rng, (6, 7, 5)).astype(np.float32)
  out = volumes.normalise_intensity(vol, (0.5, 99.5))
  lo, hi = _percentile_by_hand(vol, 0.5), _percentile_by_hand(vol, 99.5)
  expected = np.clip((vol.astype(np.float64) - lo) / (hi - lo), 0, 1)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, expected, atol=1e-5)
  assert out.min() == 0.0 and out.max() == 1.0
  const = volumes.normalise_intensity(np.full((3, 3, 3), 7.0), (0.5, 99.5))
  assert np.all(const == 0.0) and not np.any(np.isnan(const))


def test_map_labels():
  raw = np.array([[0, 200], [500, 600]])
  mapped = volumes.map_labels(raw, {0: 0, 200: 1, 500: 2, 600: 3}, 'f')
  np.testing.assert_array_equal(mapped, [[0, 1], [2, 3]])
  assert mapped.dtype == np.int32
  with pytest.raises(DataError, match=r'lab.nii.gz: unexpected label values 500, 600'):
    volumes.map_labels(raw, {0: 0, 200: 1}, 'lab.nii.gz')


def test_volume_to_slices_shapes_range_spacing_and_drop(rng):
  image = rng.normal(size=(8, 6, 4)).astype(np.float32)
  label = np.zeros((8, 6, 4), np.int32)
  label[2:5, 1:4, 1] = 200
  label[3, 2, 2] = 500
  out = volumes.volume_to_slices(
      image, label, slice_axis=2, image_size=16, percentiles=(0.5, 99.5), empty_slices='keep',
      label_map={0: 0, 200: 1, 500: 2}, spacing=(0.75, 0.5, 10.0))
  assert out['images'].shape == (4, 16, 16, 1) and out['images'].dtype == np.float32
  assert out['images'].min() >= -1.0 and out['images'].max() <= 1.0
  assert out['labels'].shape == (4, 16, 16) and set(np.unique(out['labels'])) == {0, 1, 2}
  np.testing.assert_array_equal(out['slice_index'], [0, 1, 2, 3])
  np.testing.assert_allclose(out['spacing'], np.tile([0.75 * 8 / 16, 0.5 * 6 / 16], (4, 1)))

  dropped = volumes.volume_to_slices(
      image, label, slice_axis=2, image_size=(8, 6), percentiles=(0.5, 99.5), empty_slices='drop',
      label_map={0: 0, 200: 1, 500: 2}, spacing=(0.75, 0.5, 10.0))
  np.testing.assert_array_equal(dropped['slice_index'], [1, 2])
  # Without resizing, slices are exactly the normalised volume, mapped to [-1, 1].
  norm = volumes.normalise_intensity(image, (0.5, 99.5))
  np.testing.assert_allclose(dropped['images'][..., 0], np.moveaxis(norm, 2, 0)[[1, 2]] * 2 - 1, atol=1e-6)
  np.testing.assert_allclose(dropped['spacing'], [[0.75, 0.5]] * 2)

  along0 = volumes.volume_to_slices(image, None, slice_axis=0, image_size=(6, 4), percentiles=(0, 100),
                                    empty_slices='drop', spacing=(0.75, 0.5, 10.0))
  assert along0['labels'] is None and along0['images'].shape == (8, 6, 4, 1)  # no labels: drop keeps all
  np.testing.assert_allclose(along0['spacing'][0], [0.5, 10.0])


def test_subject_split_partition_seeded_and_small_n():
  names = [f'subject{i}' for i in range(10)]
  split = volumes.subject_split(names, (0.7, 0.1, 0.2), seed=3)
  assert [len(split[k]) for k in ('train', 'val', 'test')] == [7, 1, 2]
  assert sorted(sum(split.values(), [])) == sorted(names)
  assert volumes.subject_split(names[::-1], (0.7, 0.1, 0.2), seed=3) == split  # input order irrelevant
  others = [volumes.subject_split(names, (0.7, 0.1, 0.2), seed=s)['test'] for s in range(4, 10)]
  assert any(o != split['test'] for o in others)
  three = volumes.subject_split(['a', 'b', 'c'], (0.7, 0.1, 0.2), seed=0)
  assert [len(three[k]) for k in ('train', 'val', 'test')] == [1, 1, 1]
  assert [len(v) for v in volumes.subject_split(['a', 'b'], seed=0).values()] == [1, 0, 1]
  assert volumes.subject_split(['a'], seed=0) == dict(train=['a'], val=[], test=[])
  assert volumes.subject_split(list('abcd'), (1.0, 0.0, 0.0), seed=0)['train'] == list('abcd')
  with pytest.raises(ConfigError):
    volumes.subject_split(names, (0.5, -0.1, 0.6), seed=0)


@pytest.mark.parametrize('shape,image_size,empty_slices', [((4, 8, 8), 8, 'keep'), ((4, 8, 6), 16, 'drop')])
def test_build_split_and_reassemble_exact(tmp_path, rng, shape, image_size, empty_slices):
  stored_label = fixtures.blob_labels(shape, values=(200, 500))
  cases = []
  for i in range(2):
    image = fixtures.write_volume(tmp_path / f'c{i}.nii.gz', fixtures.random_volume(rng, shape))
    label = fixtures.write_volume(tmp_path / f'c{i}_gt.nii.gz', stored_label, dtype=np.int16)
    cases.append(volumes.CaseFiles(f'c{i}', image, label))
  config = fixtures.data_config(image_size=image_size, slice_axis=2, empty_slices=empty_slices)
  split = volumes.build_split(cases, data_config=config, label_map={0: 0, 200: 1, 500: 2}, case_id_offset=5)
  n_slices = 4 if empty_slices == 'keep' else 2  # stored axis 0 = canonical axis 2; first/last are empty
  assert split.images.shape[0] == 2 * n_slices and split.labels.shape[0] == 2 * n_slices
  assert set(split.volumes) == {5, 6} and np.array_equal(np.unique(split.case_ids), [5, 6])
  assert split.images.shape[1:] == (image_size, image_size, 1)
  np.testing.assert_allclose(split.spacing[0], [0.75 * shape[1] / image_size, 0.75 * shape[2] / image_size])
  info = split.volumes[5]
  assert info.name == 'c0' and info.shape == (shape[1], shape[2], 4) and info.slice_axis == 2
  np.testing.assert_allclose(info.affine, fixtures.PERMUTED_LPS_AFFINE, atol=1e-6)
  np.testing.assert_allclose(info.spacing, (0.75, 0.75, 10.0))

  rows = split.case_ids == 5
  back = volumes.reassemble(split.labels[rows], split.slice_index[rows], info)
  expected = volumes.map_labels(stored_label, {0: 0, 200: 1, 500: 2})
  np.testing.assert_array_equal(back, expected)  # original (non-canonical) orientation, exactly
  # Written with the original affine it overlays the original image: read back onto the image's grid.
  out = nifti.write_nifti(tmp_path / 'pred.nii.gz', back, info.affine, dtype=np.uint8)
  reference = nifti.read_image(cases[0].image_path)
  np.testing.assert_array_equal(nifti.read_label(out, reference), fixtures.to_canonical_by_hand(expected))


def test_reassemble_fills_missing_slices_with_background():
  info = volumes.VolumeInfo(name='v', shape=(4, 3, 5), affine=np.eye(4), slice_axis=1, spacing=(1, 1, 1))
  preds = np.ones((2, 4, 5), np.int32)
  back = volumes.reassemble(preds, np.array([0, 2]), info)
  expected = np.zeros((4, 3, 5), np.int32)
  expected[:, [0, 2], :] = 1
  np.testing.assert_array_equal(back, expected)


def test_build_split_empty_policy_and_errors(tmp_path, rng):
  assert volumes.empty_slice_policy('drop_source', 'source') == 'drop'
  assert volumes.empty_slice_policy('drop_source', 'test') == 'keep'
  assert volumes.empty_slice_policy('drop', 'target') == 'keep'
  with pytest.raises(ConfigError, match='empty_slices'):
    volumes.empty_slice_policy('sometimes', 'source')
  image = fixtures.write_volume(tmp_path / 'i.nii.gz', fixtures.random_volume(rng, (4, 8, 6)))
  label = fixtures.write_volume(tmp_path / 'l.nii.gz', fixtures.blob_labels((4, 8, 6), (1, 7)))
  with pytest.raises(DataError, match=r'l.nii.gz: unexpected label values 7'):
    volumes.build_split([volumes.CaseFiles('i', image, label)], data_config=fixtures.data_config(),
                        label_map={0: 0, 1: 1})


@pytest.mark.parametrize('slice_axis', [0, 2])
def test_2d_nifti_is_one_slice_whatever_the_axis(tmp_path, rng, slice_axis):
  affine = np.diag([-0.5, 0.8, 3.0, 1.0])  # x flipped: canonical differs from stored
  label = np.zeros((6, 6), np.uint8)
  label[1:3, 2:5] = 1
  image = fixtures.write_volume(tmp_path / 'a.nii.gz', rng.normal(size=(6, 6)).astype(np.float32), affine)
  label_path = fixtures.write_volume(tmp_path / 'a_gt.nii.gz', label, affine)
  config = fixtures.data_config(image_size=6, slice_axis=slice_axis)
  split = volumes.build_split([volumes.CaseFiles('a', image, label_path)], data_config=config, label_map=None)
  assert split.images.shape == (1, 6, 6, 1) and split.volumes[0].slice_axis == 2
  np.testing.assert_allclose(split.spacing, [[0.5, 0.8]])
  np.testing.assert_array_equal(split.labels[0], label[::-1])  # canonical: x axis reversed
  back = volumes.reassemble(split.labels, split.slice_index, split.volumes[0])
  np.testing.assert_array_equal(back, label)
