"""grain input pipelines over in-memory arrays: infinite seeded training batches and padded eval batches.

Every stage keeps its data as a dict of host numpy arrays with a common leading dimension N (e.g.
{'image': float32 [N, H, W, C], 'label': int32 [N, H, W]}). Batches are dicts of the same keys with
leading dimension = the per-process batch size, ready for `jax.make_array_from_process_local_data`.

Multi-host: each process reads only its own rows, so a global batch is the concatenation of the
process-local batches. Training shards rows round-robin (`process_index::process_count`, so every shard
sees every part of the data, e.g. sorted classes; with fewer rows than processes, every process reads all
of them); evaluation shards contiguous blocks (`shard_rows`), so that predictions gathered in process
order come back in dataset order.

Determinism: shuffling and augmentation are pure functions of (seed, process, epoch, position), so an
iterator restored with `set_iterator_state` into a fresh pipeline built with the same arguments yields
exactly the batches the original would have.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np

from diffuseg_jax.data import intensity as intensity_lib
from diffuseg_jax.errors import ConfigError, DataError

Batch = dict[str, np.ndarray]
# Arrays are in memory: two reader threads and a few batches of look-ahead hide the per-record Python
# work (gather, flips) behind the device step without holding much memory.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if count < 1 or not 0 <= index < count:
    raise ValueError(f'process_index={index} must lie in [0, process_count={count})')
  return index, count


def _num_rows(arrays: dict[str, np.ndarray]) -> int:
  if not arrays:
    raise ValueError('arrays must hold at least one array')
  lengths = {key: np.shape(value)[0] for key, value in arrays.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f'arrays must share their leading dimension, got {lengths}')
  return next(iter(lengths.values()))


def _derive_seed(seed: int, process_index: int, purpose: int) -> int:
  """A 32-bit seed (what grain accepts) that differs per process and per use, from any int seed."""
  entropy = [abs(int(seed)), int(seed < 0), process_index, purpose]
  return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _spatial_keys(arrays: dict[str, np.ndarray]) -> tuple[tuple[str, ...], tuple[int, int] | None]:
  """Keys whose records are [H, W, ...] with the image's (H, W); those are augmented together."""
  per_record = {key: np.shape(value)[1:] for key, value in arrays.items()}
  reference = per_record.get('image')
  if reference is None or len(reference) < 2:
    reference = next((shape for shape in per_record.values() if len(shape) >= 2), None)
  if reference is None:
    return (), None
  hw = tuple(reference[:2])
  return tuple(k for k, shape in per_record.items() if len(shape) >= 2 and shape[:2] == hw), hw


def _make_augment(keys: tuple[str, ...], hw: tuple[int, int]):
  """Random dihedral transform (rot90 for square images, vertical and horizontal flips) of one record."""
  square = hw[0] == hw[1]

  def augment(record: Batch, rng: np.random.Generator) -> Batch:
    k = int(rng.integers(4))  # drawn even when unused, so the stream does not depend on the shape
    flip_v, flip_h = rng.random(2) < 0.5
    out = dict(record)
    for key in keys:
      value = record[key]
      if square and k:
        value = np.rot90(value, k, axes=(0, 1))
      if flip_v:
        value = value[::-1]
      if flip_h:
        value = value[:, ::-1]
      out[key] = value
    return out

  return augment


def _remap_image(record: Batch, rng: np.random.Generator, *, curves: str, bias_blur: bool) -> Batch:
  return {**record, 'image': intensity_lib.augment_intensity(record['image'], rng, curves=curves,
                                                             bias_blur=bias_blur, label=record.get('label'))}


def train_iterator(
    arrays: dict[str, np.ndarray],
    global_batch_size: int,
    seed: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    augment: bool = False,
    intensity: bool = False,
    curves: str = 'monotone',
    bias_blur: bool = False,
) -> grain.DatasetIterator:
  """Infinite, checkpointable iterator of this process's training batches, from a split of any size >= 1.

  Args:
    arrays: key -> array [N, ...] (all with the same N >= 1), e.g. 'image' [N, H, W, C] and
      'label' [N, H, W].
    global_batch_size: batch size summed over processes; each process yields
      global_batch_size // process_count rows per batch. It may exceed N (see below).
    seed: shuffling / augmentation seed. Every epoch of the process's shard is reshuffled (seed folded with
      the epoch).
    process_index, process_count: this process and how many there are (default: from jax). Process p
      reads rows p::process_count; if N < process_count (so that some of those shards would be empty),
      every process reads all N rows instead, each in its own shuffled order.
    augment: random rot90 (square images only) and horizontal/vertical flips, applied identically to every
      key whose records are [H, W, ...] with the image's (H, W); seeded per record position in the
      stream, so a row repeated in another epoch gets an independent transform.
    intensity: remap each record's 'image' through a random intensity curve plus noise
      (`intensity.augment_intensity`; other keys untouched), from its own seeded stream.
    curves: the family of those curves, one of `intensity.CURVES` ('classes' and 'per_class' read each record's
      'label').
    bias_blur: with `intensity`, also a random bias field and blur per record (`intensity.augment_intensity`).

  Two constructions, chosen once for all processes (epochs repeated and reshuffled, never sampling with
  replacement):
  - Every shard holds at least one per-process batch (N // process_count >= per-process batch):
    `range(shard).shuffle.map(gather)[.random_map].batch(drop_remainder=True).repeat()`: each epoch is a
    fresh permutation of the shard, cut into whole batches, its last incomplete batch dropped.
  - Otherwise (a small split): `range(shard).shuffle.map(gather)[.random_map].repeat().batch()`:
    successive reshuffled epochs of the shard are concatenated into one endless stream of records and
    cut into full batches, so a batch may span several epochs and hold a row more than once; nothing is
    dropped. The user never has to lower the batch size.
  Both are index-based grain MapDatasets, so the iterator state is {'next_index': batches yielded} either
  way (the first construction is the one every earlier version used: its batches and checkpoints are
  unchanged).

  Returns:
    A grain DatasetIterator of dicts {key: [global_batch_size // process_count, ...]} (numpy, dtypes kept);
    see `get_iterator_state` / `set_iterator_state`.

  Raises:
    DataError: the split has no rows.
    ConfigError: global_batch_size is not a positive multiple of process_count.
  """
  index, count = _process(process_index, process_count)
  num_rows = _num_rows(arrays)
  if num_rows == 0:
    raise DataError('the training split is empty (0 rows): there is nothing to train on')
  if global_batch_size < 1 or global_batch_size % count:
    raise ConfigError(
        f'batch size {global_batch_size} must be a positive multiple of the number of processes ({count})')
  batch_size = global_batch_size // count
  whole_epochs = batch_size <= num_rows // count  # every shard holds a batch: the original construction

  rows = np.arange(index, num_rows, count) if num_rows >= count else np.arange(num_rows)

  def gather(i: int) -> Batch:
    row = rows[i]
    return {key: value[row] for key, value in arrays.items()}

  ds = grain.MapDataset.range(len(rows)).shuffle(seed=_derive_seed(seed, index, 0)).map(gather)
  if augment:
    keys, hw = _spatial_keys(arrays)
    if keys:
      ds = ds.random_map(_make_augment(keys, hw), seed=_derive_seed(seed, index, 1))
  if intensity:
    if 'image' not in arrays:
      raise ValueError(f'intensity augmentation needs an "image" key, got {sorted(arrays)}')
    intensity_lib.check_curves(curves)  # here, not later in a reader thread
    if curves in intensity_lib.BY_LABEL and 'label' not in arrays:
      raise ValueError(f"intensity curves {curves!r} need a 'label' key, got {sorted(arrays)}")
    remap = functools.partial(_remap_image, curves=curves, bias_blur=bias_blur)
    ds = ds.random_map(remap, seed=_derive_seed(seed, index, 2))
  if whole_epochs:
    ds = ds.batch(batch_size, drop_remainder=True).repeat()
  else:
    ds = ds.repeat().batch(batch_size, drop_remainder=True)
  return iter(ds.to_iter_dataset(READ_OPTIONS))


def get_iterator_state(it: grain.DatasetIterator) -> dict[str, Any]:
  """The iterator's position as a JSON-serialisable dict (saved with the train-state checkpoint)."""
  state = it.get_state()
  return json.loads(json.dumps(state))  # fails loudly now, not at checkpoint time, if grain changes


def set_iterator_state(it: grain.DatasetIterator, state: dict[str, Any]) -> None:
  """Moves a freshly built iterator (same arguments) to a saved position."""
  try:
    it.set_state(state)
  except (KeyError, TypeError, IndexError) as e:
    raise DataError(f'data iterator state {state!r} does not fit this input pipeline ({e})') from None


def shard_rows(n: int, process_index: int, process_count: int) -> np.ndarray:
  """int64 [~n / process_count]: the contiguous block of rows 0..n-1 that `process_index` evaluates.

  Blocks differ in size by at most one row and, concatenated in process order, give arange(n).
  """
  index, count = _process(process_index, process_count)
  bounds = (np.arange(count + 1) * n) // count
  return np.arange(bounds[index], bounds[index + 1])


def eval_batches(
    arrays: dict[str, np.ndarray],
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[tuple[Batch, int]]:
  """Yields (batch, num_valid) over this process's `shard_rows`, in order, each batch exactly batch_size.

  The last batch is padded by repeating the last row; only the first num_valid rows are real. Every
  process yields the same number of batches (ceil(ceil(N / process_count) / batch_size)), so that sharded
  eval steps stay in lockstep across hosts: a process whose shard runs out first yields padding batches
  with num_valid = 0.
  """
  if batch_size < 1:
    raise ConfigError(f'eval batch size {batch_size} must be positive')
  index, count = _process(process_index, process_count)
  num_rows = _num_rows(arrays)
  if num_rows == 0:
    return
  rows = shard_rows(num_rows, index, count)
  num_batches = math.ceil(math.ceil(num_rows / count) / batch_size)
  filler = rows[-1] if rows.size else num_rows - 1
  for b in range(num_batches):
    chunk = rows[b * batch_size:(b + 1) * batch_size]
    num_valid = int(chunk.size)
    take = np.concatenate([chunk, np.full(batch_size - num_valid, chunk[-1] if num_valid else filler)])
    yield {key: np.asarray(value[take]) for key, value in arrays.items()}, num_valid
