"""Host-side (numpy) array transforms shared by every loader.

Channel policy: the source and target domains may differ in channel count (e.g. grayscale MNIST -> RGB
MNIST-M, or a grayscale MRI source for an RGB target). Every split of a `DomainData` is brought to ONE common
channel count C (the larger of the two, unless `data.channels` forces one): grayscale is replicated to RGB,
and RGB is reduced to grayscale by ITU-R BT.601 luma when C = 1. The networks therefore always see C channels.
"""

from __future__ import annotations

import numpy as np
from skimage.transform import resize as _sk_resize

LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def harmonise_channels(images: np.ndarray, channels: int) -> np.ndarray:
  """[N, H, W, c] -> [N, H, W, channels] (c, channels in {1, 3}); see the module docstring."""
  c = images.shape[-1]
  if c == channels:
    return images
  if c == 1 and channels == 3:
    return np.repeat(images, 3, axis=-1)
  if c == 3 and channels == 1:
    return np.tensordot(images, LUMA, axes=([-1], [0]))[..., None].astype(images.dtype)
  if c == 4 and channels in (1, 3):  # RGBA: drop alpha
    return harmonise_channels(images[..., :3], channels)
  raise ValueError(f'cannot convert {c} channels to {channels}')


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[H, W, C] float -> [size[0], size[1], C], bilinear with anti-aliasing when shrinking."""
  if tuple(image.shape[:2]) == tuple(size):
    return image.astype(np.float32)
  shrink = image.shape[0] > size[0] or image.shape[1] > size[1]
  out = _sk_resize(image, (*size, image.shape[2]), order=1, anti_aliasing=shrink, preserve_range=True)
  return out.astype(np.float32)


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[H, W] integer labels -> [size[0], size[1]] by nearest neighbour (no new label values appear)."""
  if tuple(labels.shape) == tuple(size):
    return labels
  rows = np.minimum((np.arange(size[0]) + 0.5) * labels.shape[0] / size[0], labels.shape[0] - 1).astype(int)
  cols = np.minimum((np.arange(size[1]) + 0.5) * labels.shape[1] / size[1], labels.shape[1] - 1).astype(int)
  return labels[rows[:, None], cols[None, :]]


def to_unit_range(images: np.ndarray) -> np.ndarray:
  """[0, 1] -> [-1, 1], the range every network sees."""
  return (images * 2.0 - 1.0).astype(np.float32)


def from_unit_range(images: np.ndarray) -> np.ndarray:
  """[-1, 1] -> [0, 1], clipped (for writing images and for figures)."""
  return np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)
