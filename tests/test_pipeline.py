"""Tests for the grain input pipelines (diffuseg_jax/data/pipeline.py)."""

import itertools
import json

import numpy as np
import pytest

from diffuseg_jax.data import pipeline
from diffuseg_jax.errors import ConfigError


def make_arrays(n: int, h: int = 4, w: int = 4) -> dict[str, np.ndarray]:
  """'row' [N] identifies each record; image channel 0 equals the (random, asymmetric) label map."""
  rng = np.random.default_rng(0)
  label = rng.integers(0, 5, (n, h, w)).astype(np.int32)
  noise = rng.random((n, h, w)).astype(np.float32)
  image = np.stack([label.astype(np.float32), noise], axis=-1)
  return {'image': image, 'label': label, 'row': np.arange(n, dtype=np.int64)}


def take(it, count: int) -> list[dict[str, np.ndarray]]:
  return list(itertools.islice(it, count))


def test_epochs_cover_each_row_once_and_reshuffle():
  arrays = make_arrays(26)
  batches = take(pipeline.train_iterator(arrays, 8, seed=3, process_index=0, process_count=1), 9)
  assert all(b['image'].shape == (8, 4, 4, 2) and b['label'].dtype == np.int32 for b in batches)
  epochs = [np.concatenate([b['row'] for b in batches[i:i + 3]]) for i in (0, 3, 6)]
  for rows in epochs:  # 26 rows, batch 8: 3 batches per epoch, 2 rows dropped, no repeats within an epoch
    assert len(np.unique(rows)) == 24 and rows.min() >= 0 and rows.max() < 26
  assert not np.array_equal(epochs[0], epochs[1])
  for b in batches:  # records are the rows they claim to be
    np.testing.assert_array_equal(b['label'], arrays['label'][b['row']])
    np.testing.assert_array_equal(b['image'], arrays['image'][b['row']])


def test_seeded_order():
  arrays = make_arrays(32)
  rows = lambda seed: np.stack([b['row'] for b in take(pipeline.train_iterator(
      arrays, 8, seed=seed, process_index=0, process_count=1), 4)])
  np.testing.assert_array_equal(rows(0), rows(0))
  assert not np.array_equal(rows(0), rows(1))


def test_default_process_from_jax():
  arrays = make_arrays(16)
  batch = next(pipeline.train_iterator(arrays, 4, seed=0))
  assert batch['image'].shape == (4, 4, 4, 2)  # one process: per-process batch = global batch


@pytest.mark.parametrize('augment', [False, True])
def test_state_restore_reproduces_batches(augment):
  arrays = make_arrays(20)
  make = lambda: pipeline.train_iterator(arrays, 6, seed=5, process_index=0, process_count=1, augment=augment)
  it = make()
  take(it, 4)  # crosses into the second epoch (3 batches per epoch)
  state = json.loads(json.dumps(pipeline.get_iterator_state(it)))
  expected = take(it, 5)
  restored = make()
  pipeline.set_iterator_state(restored, state)
  for got, want in zip(take(restored, 5), expected, strict=True):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_process_shards_are_disjoint_and_cover_the_data():
  arrays = make_arrays(24)
  seen = []
  for index in range(2):
    it = pipeline.train_iterator(arrays, 8, seed=0, process_index=index, process_count=2)
    batches = take(it, 3)  # 12 rows per process, batch 4: one epoch
    assert all(b['row'].shape == (4,) for b in batches)
    rows = np.concatenate([b['row'] for b in batches])
    np.testing.assert_array_equal(np.sort(rows), np.arange(index, 24, 2))
    seen.append(set(rows.tolist()))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(24))


def test_batch_size_errors():
  arrays = make_arrays(10)
  with pytest.raises(ConfigError, match='multiple of the number of processes'):
    pipeline.train_iterator(arrays, 5, seed=0, process_index=0, process_count=2)
  with pytest.raises(ConfigError, match='larger than the data'):
    pipeline.train_iterator(arrays, 12, seed=0, process_index=0, process_count=2)
  with pytest.raises(ConfigError, match='larger than the data'):
    pipeline.train_iterator(arrays, 11, seed=0, process_index=0, process_count=1)


def dihedral(x: np.ndarray, square: bool) -> list[np.ndarray]:
  """Every rotation/flip combination of x [H, W, ...] that the augmentation may produce."""
  out = []
  for k in range(4 if square else 1):
    r = np.rot90(x, k, axes=(0, 1))
    out += [r, r[::-1], r[:, ::-1], r[::-1, ::-1]]
  return out


@pytest.mark.parametrize('h,w', [(5, 5), (4, 6)])
def test_augment_keeps_image_and_label_aligned(h, w):
  arrays = make_arrays(16, h, w)
  it = pipeline.train_iterator(arrays, 8, seed=1, process_index=0, process_count=1, augment=True)
  batches = take(it, 6)
  transforms_seen = set()
  for b in batches:
    assert b['image'].shape == (8, h, w, 2) and b['label'].shape == (8, h, w)
    assert b['label'].dtype == np.int32 and b['image'].dtype == np.float32
    np.testing.assert_array_equal(b['image'][..., 0], b['label'])  # same transform for image and label
    for image, row in zip(b['image'], b['row'], strict=True):
      candidates = dihedral(arrays['image'][row], h == w)
      matches = [i for i, c in enumerate(candidates) if np.array_equal(c, image)]
      assert matches  # the record is a rotation/flip of its own source row
      transforms_seen.add(matches[0])
  assert len(transforms_seen) >= (5 if h == w else 3)  # augmentation really varies


def test_shard_rows():
  for n, count in [(10, 3), (2, 3), (7, 1), (9, 4)]:
    shards = [pipeline.shard_rows(n, i, count) for i in range(count)]
    np.testing.assert_array_equal(np.concatenate(shards), np.arange(n))  # contiguous, in order
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_eval_batches_padding_and_num_valid():
  arrays = make_arrays(10)
  out = list(pipeline.eval_batches(arrays, 4, process_index=0, process_count=1))
  assert [n for _, n in out] == [4, 4, 2]
  assert all(b['image'].shape == (4, 4, 4, 2) for b, _ in out)
  np.testing.assert_array_equal(out[-1][0]['row'], [8, 9, 9, 9])
  np.testing.assert_array_equal(out[-1][0]['label'], arrays['label'][[8, 9, 9, 9]])
  valid = np.concatenate([b['row'][:n] for b, n in out])
  np.testing.assert_array_equal(valid, np.arange(10))


def test_eval_batches_multi_process_lockstep():
  arrays = make_arrays(10)
  per_process = [list(pipeline.eval_batches(arrays, 3, process_index=i, process_count=3)) for i in range(3)]
  assert {len(batches) for batches in per_process} == {2}  # ceil(ceil(10 / 3) / 3) batches everywhere
  valid = np.concatenate([b['row'][:n] for batches in per_process for b, n in batches])
  np.testing.assert_array_equal(valid, np.arange(10))
  # More processes than rows: the empty process still yields one padding batch, with num_valid = 0.
  empty = list(pipeline.eval_batches(make_arrays(2), 4, process_index=0, process_count=3))
  assert len(empty) == 1 and empty[0][1] == 0 and empty[0][0]['row'].shape == (4,)
