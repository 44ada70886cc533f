"""The synthetic dataset on disk: pairs are identified by synthesis index, masks may repeat, old shards load."""

import json
import os
import types

import numpy as np

from diffuseg_jax import synthetic_io


def _ctx(workdir):
  """What synthetic_io reads of a context: the synthesize unit's folder."""
  return types.SimpleNamespace(unit_dir=lambda unit: os.path.join(str(workdir), 'units', unit, 'fp'))


def _write(root, shard, index, plan):
  n = len(index)
  images = np.linspace(-1, 1, n * 4 * 4).reshape(n, 4, 4, 1).astype(np.float32)
  labels = np.asarray(plan)[:, None, None] * np.ones((n, 4, 4), np.int32)
  synthetic_io.write_shard(root, shard, images, labels, np.asarray(index), np.asarray(plan), np.zeros(n, int),
                           np.ones((n, 2), np.float32), 'png')
  return images


def test_repeated_masks_give_distinct_pairs_in_synthesis_order(tmp_path):
  root = synthetic_io.synthetic_dir(_ctx(tmp_path))
  plan = np.array([0, 1, 2, 1, 0, 2, 2])  # 7 pairs from 3 masks
  # Shards written out of order (as processes finish them): the load order is the synthesis index.
  _write(root, 1, [4, 5, 6], plan[4:])
  _write(root, 0, [0, 1, 2, 3], plan[:4])
  assert synthetic_io.merge_manifest(root, 2) == 7
  rows = [json.loads(line) for line in open(os.path.join(root, 'manifest.jsonl'))]
  ids = [r['id'] for r in rows]
  assert len(set(ids)) == 7 and sorted(ids) == [f'{i:07d}' for i in range(7)]
  assert {r['id']: r['mask_index'] for r in rows} == {f'{i:07d}': int(m) for i, m in enumerate(plan)}
  assert len(os.listdir(os.path.join(root, 'images'))) == 7 == len(os.listdir(os.path.join(root, 'labels')))
  synth = synthetic_io.load_synthetic(_ctx(tmp_path))
  np.testing.assert_array_equal(synth['synthesis_index'], np.arange(7))
  np.testing.assert_array_equal(synth['mask_index'], plan)
  np.testing.assert_array_equal(synth['label'][:, 0, 0], plan)


def test_shards_without_synthesis_index_load_in_mask_order(tmp_path):
  """A synthetic set written before synthesis indices existed (npz without the field): mask order."""
  root = synthetic_io.synthetic_dir(_ctx(tmp_path))
  first = _write(root, 0, [0, 1], [0, 1])
  second = _write(root, 1, [2, 3], [2, 3])
  npz = synthetic_io.shard_paths(root, 0)[0]
  old = {k: v for k, v in np.load(npz).items() if k != 'synthesis_index'}  # the old format
  np.savez(npz, **old)
  synthetic_io.merge_manifest(root, 2)
  synth = synthetic_io.load_synthetic(_ctx(tmp_path))
  np.testing.assert_array_equal(synth['synthesis_index'], np.arange(4))
  np.testing.assert_array_equal(synth['mask_index'], np.arange(4))
  np.testing.assert_array_equal(synth['image'], np.concatenate([first, second]))
