"""The synthetic dataset on disk: written shard by shard, atomically, so a killed job resumes exactly.

  synthetic/images/<id>.png | .nii.gz    synthetic image (8-bit RGB/gray PNG, or float32 NIfTI with spacing)
  synthetic/labels/<id>.png | .nii.gz    the given label map (class indices)
  synthetic/shards/shard_<k>.npz         float32 images, int32 labels, mask/reference indices of shard k
  synthetic/shards/shard_<k>.jsonl       the shard's manifest rows; written LAST: its presence = shard done
  synthetic/manifest.jsonl               all rows, merged when every shard is done

A shard is work unit k = synthesis indices [k*shard_size, (k+1)*shard_size); process p handles shards
k % P == p. Rows: {"id", "image", "label", "synthesis_index", "mask_index", "reference_index", "shard"}
(paths relative to synthetic/). The synthesis index is the pair's identity (its <id>, its place in
`load_synthetic`); mask_index is the mask-set row its label map came from, which repeats when more pairs
are synthesised than there are masks. Shards written before synthesis indices existed (one pair per mask)
lack the field: there the synthesis index is the mask index.
"""

from __future__ import annotations

import glob
import json
import os

import nibabel as nib
import numpy as np
from PIL import Image

from diffuseg_jax import atomic
from diffuseg_jax.data.transforms import from_unit_range
from diffuseg_jax.errors import UserError


def synthetic_dir(ctx) -> str:
  """This run's synthetic set: the synthesize unit's folder (`<workdir>/synthetic` links to it)."""
  return os.path.join(ctx.unit_dir('synthesize'), 'synthetic')


def shard_paths(root: str, shard: int) -> tuple[str, str]:
  base = os.path.join(root, 'shards', f'shard_{shard:05d}')
  return base + '.npz', base + '.jsonl'


def shard_done(root: str, shard: int) -> bool:
  return os.path.exists(shard_paths(root, shard)[1])


def write_shard(root: str, shard: int, images: np.ndarray, labels: np.ndarray, synthesis_index: np.ndarray,
                mask_index: np.ndarray, reference_index: np.ndarray, spacing: np.ndarray, image_format: str) -> None:
  """Write one finished shard: per-image files (named by synthesis index), then the npz, then (last) the
  shard manifest."""
  rows = []
  ext = '.nii.gz' if image_format == 'nifti' else '.png'
  for i in range(len(images)):
    sid = f'{int(synthesis_index[i]):07d}'
    img_rel, lab_rel = f'images/{sid}{ext}', f'labels/{sid}{ext}'
    if image_format == 'nifti':
      _write_nifti(os.path.join(root, img_rel), images[i], spacing[i], np.float32)
      _write_nifti(os.path.join(root, lab_rel), labels[i][..., None], spacing[i], np.uint8)
    else:
      _write_png(os.path.join(root, img_rel), (from_unit_range(images[i]) * 255).round().astype(np.uint8))
      _write_png(os.path.join(root, lab_rel), labels[i].astype(np.uint8)[..., None])
    rows.append({'id': sid, 'image': img_rel, 'label': lab_rel, 'synthesis_index': int(synthesis_index[i]),
                 'mask_index': int(mask_index[i]), 'reference_index': int(reference_index[i]), 'shard': shard})
  npz, jsonl = shard_paths(root, shard)
  with atomic.atomic_path(npz) as tmp:
    np.savez(tmp, image=images.astype(np.float32), label=labels.astype(np.int32),
             synthesis_index=np.asarray(synthesis_index, np.int64), mask_index=np.asarray(mask_index, np.int64),
             reference_index=np.asarray(reference_index, np.int64))
  atomic.write_text(jsonl, ''.join(json.dumps(r) + '\n' for r in rows))


def merge_manifest(root: str, num_shards: int) -> int:
  """Concatenate every shard manifest (in shard order) into manifest.jsonl; returns the row count."""
  lines = []
  for k in range(num_shards):
    with open(shard_paths(root, k)[1]) as f:
      lines.extend(line for line in f if line.strip())
  atomic.write_text(os.path.join(root, 'manifest.jsonl'), ''.join(lines))
  return len(lines)


def load_synthetic(ctx) -> dict[str, np.ndarray]:
  """All synthetic pairs in synthesis-index order: {'image': [N,H,W,C] f32 in [-1,1], 'label': [N,H,W] int32,
  'synthesis_index', 'mask_index', 'reference_index': int64 [N]}."""
  root = synthetic_dir(ctx)
  manifest = os.path.join(root, 'manifest.jsonl')
  if not os.path.exists(manifest):
    raise UserError(f'no synthetic dataset in {root} (manifest.jsonl missing): run stage synthesize first')
  shards = sorted(glob.glob(os.path.join(root, 'shards', 'shard_*.npz')))
  parts = [dict(np.load(p)) for p in shards]
  for part in parts:  # a shard from before synthesis indices: one pair per mask, named by its mask index
    part.setdefault('synthesis_index', part['mask_index'])
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  order = np.argsort(out['synthesis_index'], kind='stable')
  return {k: v[order] for k, v in out.items()}


def _write_png(path: str, array: np.ndarray) -> None:
  img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
  with atomic.atomic_path(path) as tmp:
    img.save(tmp, format='PNG')


def _write_nifti(path: str, array: np.ndarray, spacing: np.ndarray, dtype) -> None:
  """2D slice [H,W,C] -> NIfTI [H,W,1(,C)] with the in-plane pixel spacing (mm) in the header."""
  data = np.asarray(array, dtype)
  data = data[:, :, None, :] if data.shape[-1] > 1 else data
  affine = np.diag([float(spacing[0]), float(spacing[1]), 1.0, 1.0])
  img = nib.Nifti1Image(data, affine)
  img.header.set_zooms((float(spacing[0]), float(spacing[1]), 1.0, *([1.0] * (data.ndim - 3))))
  with atomic.atomic_path(path) as tmp:
    nib.save(img, tmp)
