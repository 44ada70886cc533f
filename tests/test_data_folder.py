"""The generic folder dataset (PNG and NIfTI trees), 2D raster IO and configs/folder.py."""

import shutil

import fixtures
import numpy as np
import pytest
from absl import flags
from ml_collections.config_flags import config_flags

from diffuseg_jax.config_files import load_config, load_config_module
from diffuseg_jax.data import folder, imageio, load_domain_data, transforms
from diffuseg_jax.errors import ConfigError, DataError


@pytest.fixture
def rng():
  return np.random.default_rng(0)


# -------------------------------------------------------------------------------------------- imageio


def test_read_image_2d_scaling(tmp_path, rng):
  gray = rng.integers(0, 256, (5, 4), dtype=np.uint8)
  out = imageio.read_image_2d(fixtures.write_image(tmp_path / 'g.png', gray))
  assert out.shape == (5, 4, 1) and out.dtype == np.float32
  np.testing.assert_allclose(out[..., 0], gray / 255.0, atol=1e-7)
  deep = (np.arange(20, dtype=np.uint16).reshape(5, 4) * 3000)
  np.testing.assert_allclose(imageio.read_image_2d(fixtures.write_image(tmp_path / 'd.png', deep))[..., 0],
                             deep / 65535.0, atol=1e-7)
  rgb = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
  for ext in ('png', 'tif', 'bmp'):
    np.testing.assert_allclose(imageio.read_image_2d(fixtures.write_image(tmp_path / f'c.{ext}', rgb)),
                               rgb / 255.0, atol=1e-7)
  jpg = imageio.read_image_2d(fixtures.write_image(tmp_path / 'c.jpg', rgb))
  assert jpg.shape == (5, 4, 3) and 0.0 <= jpg.min() and jpg.max() <= 1.0
  with pytest.raises(DataError, match='broken.png: cannot read image'):
    (tmp_path / 'broken.png').write_bytes(b'\x89PNG garbage')
    imageio.read_image_2d(tmp_path / 'broken.png')


def test_read_mask_2d_and_write_png(tmp_path):
  mask = np.array([[0, 1], [2, 255]], np.uint8)
  np.testing.assert_array_equal(imageio.read_mask_2d(fixtures.write_image(tmp_path / 'm.gif', mask)), mask)
  rgb = np.repeat(mask[..., None], 3, axis=-1)
  np.testing.assert_array_equal(imageio.read_mask_2d(fixtures.write_image(tmp_path / 'rgb.png', rgb)), mask)
  rgb[0, 0] = [255, 0, 0]
  with pytest.raises(DataError, match='colour.png: colour mask'):
    imageio.read_mask_2d(fixtures.write_image(tmp_path / 'colour.png', rgb))
  wide = np.array([[0, 300], [1000, 65535]], np.int64)
  imageio.write_png(tmp_path / 'out' / 'w.png', wide)
  np.testing.assert_array_equal(imageio.read_mask_2d(tmp_path / 'out' / 'w.png'), wide)
  imageio.write_png(tmp_path / 'out' / 'f.png', np.array([[0.0, 0.5], [1.0, 2.0]]))
  np.testing.assert_array_equal(imageio.read_mask_2d(tmp_path / 'out' / 'f.png'), [[0, 128], [255, 255]])
  assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['f.png', 'w.png']


# --------------------------------------------------------------------------------------------- folder


def test_folder_png_common_channels_and_labels_json(tmp_path, rng):
  root = fixtures.make_png_tree(tmp_path / 'data', rng)
  fixtures.write_labels_json(root, {0: 'background', 128: 'outer', 255: 'inner'})
  config = fixtures.data_config(name='folder', root=str(root), image_size=8)
  data = load_domain_data(config, seed=0)
  assert data.class_names == ('background', 'outer', 'inner')
  assert data.spacing_unit == 'px' and data.image_format == 'png' and data.val is None
  assert data.channels == 3  # gray source/test, RGB target -> RGB everywhere
  for split in (data.source, data.target, data.test):
    assert split.images.shape[1:] == (8, 8, 3)
    assert split.images.min() >= -1.0 and split.images.max() <= 1.0
  np.testing.assert_array_equal(data.source.images[..., 0], data.source.images[..., 2])  # replicated gray
  assert data.target.labels is None and len(data.target) == 3
  assert set(np.unique(data.source.labels)) == {0, 1, 2} and set(np.unique(data.test.labels)) == {0, 1, 2}
  ids = np.concatenate([data.source.case_ids, data.target.case_ids, data.test.case_ids])
  assert len(np.unique(ids)) == 7
  a = data.source.volumes[int(data.source.case_ids[0])]
  assert a.name == 'source_a' and a.shape == (12, 10, 1)
  np.testing.assert_allclose(data.source.spacing[0], [12 / 8, 10 / 8])
  # The source image equals its file, resized and mapped to [-1, 1] (independently recomputed).
  raw = imageio.read_image_2d(root / 'source' / 'images' / 'source_a.png')
  expected = transforms.to_unit_range(transforms.resize_image(raw, (8, 8)))
  np.testing.assert_allclose(data.source.images[0, ..., 0], expected[..., 0], atol=1e-6)


def test_folder_png_without_labels_json_and_forced_gray(tmp_path, rng):
  root = fixtures.make_png_tree(tmp_path / 'data', rng, mask_values=(0, 3, 9))
  data = folder.load(fixtures.data_config(name='folder', root=str(root), image_size=8, channels=1), seed=0)
  assert data.class_names == ('background', 'label_3', 'label_9')
  assert data.channels == 1 and data.target.images.shape[-1] == 1
  # Target labels are optional (oracle only) and must use the known values.
  for name in ('t1', 't2', 't3'):
    fixtures.write_image(root / 'target' / 'labels' / f'{name}.png', np.full((14, 14), 3, np.uint8))
  data = folder.load(fixtures.data_config(name='folder', root=str(root), image_size=8), seed=0)
  assert data.target.labels is not None and np.all(data.target.labels == 1)
  fixtures.write_image(root / 'target' / 'labels' / 't2.png', np.full((14, 14), 4, np.uint8))
  with pytest.raises(DataError, match=r't2.png: unexpected label values 4'):
    folder.load(fixtures.data_config(name='folder', root=str(root), image_size=8), seed=0)


def test_folder_nifti_tree(tmp_path, rng):
  root = fixtures.make_nifti_tree(tmp_path / 'data', rng, shape=(4, 8, 6))
  fixtures.write_labels_json(root, {0: 'background', 1: 'myo', 2: 'lv'})
  data = folder.load(fixtures.data_config(name='folder', root=str(root), image_size=8,
                                          empty_slices='drop_source'), seed=0)
  assert data.spacing_unit == 'mm' and data.image_format == 'nifti' and data.channels == 1
  assert len(data.source) == 2 * 2 and len(data.test) == 2 * 4 and len(data.target) == 4  # empties dropped
  np.testing.assert_allclose(data.test.spacing[0], [0.75 * 8 / 8, 0.75 * 6 / 8])
  info = data.test.volumes[int(data.test.case_ids[0])]
  assert info.shape == (8, 6, 4) and info.extra['original_shape'] == (4, 8, 6)


@pytest.mark.parametrize(
    'case', ['no_root', 'no_test', 'empty', 'missing_label', 'bad_value', 'json_no_zero'])
def test_folder_errors(tmp_path, rng, case):
  root = fixtures.make_png_tree(tmp_path / 'data', rng)
  fixtures.write_labels_json(root, {0: 'background', 128: 'outer', 255: 'inner'})
  expected = {
      'no_root': 'nowhere: data root folder not found',
      'no_test': 'test/images: folder not found',
      'empty': 'target/images: no image files',
      'missing_label': r'source_b.png: no label file named source_b\.\*',
      'bad_value': r'test_a.png: unexpected label values 7',
      'json_no_zero': r'labels.json: value 0 \(background',
  }[case]
  if case == 'no_root':
    root = tmp_path / 'nowhere'
  elif case == 'no_test':
    shutil.rmtree(root / 'test')
  elif case == 'empty':
    for path in (root / 'target' / 'images').iterdir():
      path.unlink()
    (root / 'target' / 'images' / 'notes.txt').write_text('not an image')
  elif case == 'missing_label':
    (root / 'source' / 'labels' / 'source_b.png').unlink()
  elif case == 'bad_value':
    fixtures.write_image(root / 'test' / 'labels' / 'test_a.png', np.full((12, 10), 7, np.uint8))
  elif case == 'json_no_zero':
    fixtures.write_labels_json(root, {1: 'a'})
  with pytest.raises(DataError, match=expected) as err:
    folder.load(fixtures.data_config(name='folder', root=str(root), image_size=8), seed=0)
  assert '\n' not in str(err.value)
  with pytest.raises(ConfigError, match='data.root'):
    folder.load(fixtures.data_config(name='folder'), seed=0)


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')  # inside ml_collections
def test_folder_config_from_any_directory_and_command_line(tmp_path, rng, monkeypatch):
  root = fixtures.make_png_tree(tmp_path / 'data', rng)
  monkeypatch.chdir(tmp_path)  # not the repo root: configs/ is not importable from here
  path = str(fixtures.REPO / 'configs' / 'folder.py')
  argv = ['main', f'--config={path}', f'--config.data.root={root}', '--config.data.image_size=8',
          '--config.data.channels=1']
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  assert config.data.name == 'folder' and config.data.root == str(root) and config.data.channels == 1
  assert config.vae.z_dom_dim == fixtures.default_config().vae.z_dom_dim  # everything else from default.py
  data = load_domain_data(config.data, seed=config.seed)
  assert data.target.images.shape[1:] == (8, 8, 1)
  assert load_config(path).data.root is None
  doc = load_config_module(path).__doc__
  assert 'python -m diffuseg_jax.main --config=configs/folder.py --config.data.root=PATH' in doc
