"""Synthetic pairs as NIfTI and the nnU-Net v2 export."""

import json

import fixtures
import nibabel as nib
import numpy as np
import pytest

from diffuseg_jax.data import export, folder
from diffuseg_jax.errors import ConfigError, DataError


def _synthetic(rng, n=3, h=6, w=5, c=1, k=3):
  return dict(
      images=rng.uniform(-1, 1, (n, h, w, c)).astype(np.float32),
      labels=rng.integers(0, k, (n, h, w)).astype(np.int32),
      spacing=np.stack([np.full(n, 1.5), np.linspace(0.5, 1.0, n)], axis=1),
      names=[f'syn_{i:04d}' for i in range(n)],
  )


def test_write_synthetic_nifti(tmp_path):
  syn = _synthetic(np.random.default_rng(0))
  written = export.write_synthetic_nifti(tmp_path / 'synthetic', syn['images'], syn['labels'], syn['spacing'],
                                         syn['names'])
  assert [p.name for p, _ in written] == [f'{n}.nii.gz' for n in syn['names']]
  for i, (image_path, label_path) in enumerate(written):
    image, label = nib.load(str(image_path)), nib.load(str(label_path))
    assert image.shape == (6, 5, 1) and label.shape == (6, 5, 1)
    np.testing.assert_allclose(np.asarray(image.dataobj)[..., 0], (syn['images'][i, ..., 0] + 1) / 2,
                               atol=1e-6)
    assert label.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(label.dataobj)[..., 0], syn['labels'][i])
    np.testing.assert_allclose(image.header.get_zooms(), [1.5, syn['spacing'][i, 1], 1.0], atol=1e-6)
    np.testing.assert_allclose(label.affine, image.affine)
  assert not [p for p in (tmp_path / 'synthetic').rglob('.*')]  # no temporary files left
  # The synthetic folder is a valid folder-dataset split.
  assert [c.name for c in folder.split_cases(tmp_path / 'synthetic', labels_required=True)] == syn['names']


@pytest.mark.parametrize('from_dir', [True, False])
def test_export_nnunet_layout_and_dataset_json(tmp_path, from_dir):
  syn = _synthetic(np.random.default_rng(1), c=2 if from_dir else 1)  # a 2-channel slice is [H, W, 1, 2]
  channel_names = ['T1', 'T2'] if from_dir else ['LGE']
  if from_dir:
    export.write_synthetic_nifti(
        tmp_path / 'synthetic', syn['images'], syn['labels'], syn['spacing'], syn['names'])
    source = tmp_path / 'synthetic'
  else:
    source = syn
  root = export.export_nnunet(source, tmp_path / 'nnUNet_raw', 7, 'DiffuSegLGE', ['background', 'myo', 'lv'],
                              channel_names)
  assert root == tmp_path / 'nnUNet_raw' / 'Dataset007_DiffuSegLGE'
  meta = json.loads((root / 'dataset.json').read_text())
  assert meta == {
      'channel_names': {str(i): n for i, n in enumerate(channel_names)},
      'labels': {'background': 0, 'myo': 1, 'lv': 2},
      'numTraining': 3,
      'file_ending': '.nii.gz',
      'name': 'DiffuSegLGE',
  }
  c = len(channel_names)
  assert sorted(p.name for p in (root / 'imagesTr').iterdir()) == sorted(
      f'{n}_{ch:04d}.nii.gz' for n in syn['names'] for ch in range(c))
  assert sorted(p.name for p in (root / 'labelsTr').iterdir()) == sorted(f'{n}.nii.gz' for n in syn['names'])
  for i, name in enumerate(syn['names']):
    for ch in range(c):
      img = nib.load(str(root / 'imagesTr' / f'{name}_{ch:04d}.nii.gz'))
      assert img.shape == (6, 5, 1)
      np.testing.assert_allclose(np.asarray(img.dataobj)[..., 0], (syn['images'][i, ..., ch] + 1) / 2,
                                 atol=1e-6)
      np.testing.assert_allclose(img.header.get_zooms()[:2], syn['spacing'][i], atol=1e-6)
    label = nib.load(str(root / 'labelsTr' / f'{name}.nii.gz'))
    np.testing.assert_array_equal(np.asarray(label.dataobj)[..., 0], syn['labels'][i])
  # Re-exporting fewer cases removes the stale files, so numTraining matches the folder.
  fewer = dict(syn, images=syn['images'][:1], labels=syn['labels'][:1], spacing=syn['spacing'][:1],
               names=syn['names'][:1])
  export.export_nnunet(fewer, tmp_path / 'nnUNet_raw', 7, 'DiffuSegLGE', ['background', 'myo', 'lv'],
                       channel_names)
  assert len(list((root / 'labelsTr').iterdir())) == 1 and len(list((root / 'imagesTr').iterdir())) == c
  assert json.loads((root / 'dataset.json').read_text())['numTraining'] == 1


def test_export_nnunet_from_png_pairs(tmp_path):
  rng = np.random.default_rng(2)
  for i in range(2):
    syn = tmp_path / 'syn'
    fixtures.write_image(syn / 'images' / f'p{i}.png', rng.integers(0, 256, (6, 5), dtype=np.uint8))
    fixtures.write_image(syn / 'labels' / f'p{i}.png', rng.integers(0, 2, (6, 5), dtype=np.uint8))
  root = export.export_nnunet(syn, tmp_path / 'out', 12, 'Png', ['background', 'vessel'], ['gray'])
  assert sorted(p.name for p in (root / 'imagesTr').iterdir()) == ['p0_0000.nii.gz', 'p1_0000.nii.gz']


def test_export_errors(tmp_path):
  syn = _synthetic(np.random.default_rng(3), k=4)
  with pytest.raises(DataError, match=r'syn_0000: label values \[3\] are not class indices 0..2'):
    export.export_nnunet(syn, tmp_path, 1, 'X', ['background', 'a', 'b'], ['MR'])
  with pytest.raises(ConfigError, match='channel'):
    export.export_nnunet(syn, tmp_path, 1, 'X', ['background', 'a', 'b', 'c'], ['MR', 'CT'])
  with pytest.raises(ConfigError, match='1..999'):
    export.export_nnunet(syn, tmp_path, 1000, 'X', ['background', 'a', 'b', 'c'], ['MR'])
  with pytest.raises(ConfigError, match='dataset name'):
    export.export_nnunet(syn, tmp_path, 1, '../X', ['background', 'a', 'b', 'c'], ['MR'])
  with pytest.raises(ConfigError, match='case name'):
    export.write_synthetic_nifti(tmp_path, syn['images'], syn['labels'], syn['spacing'], ['a/b', 'c', 'd'])
  with pytest.raises(DataError, match='not found'):
    export.export_nnunet(tmp_path / 'missing', tmp_path, 1, 'X', ['background', 'a'], ['MR'])
