"""The in-memory form every dataset loader produces.

All datasets (embedded MNIST-M, the generic folder layout, MSCMR, ACDC, MM-WHS, retina) are reduced to
2D slices at the model resolution, so that every stage sees the same arrays:

  images   float32 [N, H, W, C], intensities in [-1, 1], C = DomainData.channels (common to all splits)
  labels   int32   [N, H, W] class indices 0..K-1 (0 = background), or None where a split is unlabelled
  case_ids int32   [N] the subject/volume/image each slice came from (metrics are averaged per case)
  spacing  float32 [N, 2] physical pixel size (mm) of the *resized* slice along (H, W); 1.0 for natural images

Volumes keep enough geometry (`VolumeInfo`) to reassemble slice predictions into the original grid.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class VolumeInfo:
  """Geometry of one original image/volume, to put 2D slice predictions back into it.

  name: case name (file stem); shape: original array shape (after canonical reorientation);
  affine: 4x4 voxel->world of the original file; slice_axis: axis the 2D slices were taken along;
  spacing: original voxel size (mm) per axis; extra: loader-specific info (e.g. crop box, orientation).
  """

  name: str
  shape: tuple[int, ...]
  affine: np.ndarray
  slice_axis: int
  spacing: tuple[float, ...]
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of 2D slices; see the module docstring for shapes and dtypes."""

  images: np.ndarray
  labels: np.ndarray | None
  case_ids: np.ndarray
  spacing: np.ndarray
  slice_index: np.ndarray | None = None  # [N] index of the slice inside its volume (volumes only)
  volumes: dict[int, VolumeInfo] | None = None  # case_id -> geometry (volumes only)

  def __post_init__(self):
    n = self.images.shape[0]
    if self.images.ndim != 4:
      raise ValueError(f'images must be [N, H, W, C], got shape {self.images.shape}')
    if self.labels is not None and self.labels.shape != self.images.shape[:3]:
      raise ValueError(f'labels shape {self.labels.shape} != images {self.images.shape[:3]}')
    if self.case_ids.shape != (n,):
      raise ValueError(f'case_ids shape {self.case_ids.shape} != ({n},)')
    if self.spacing.shape != (n, 2):
      raise ValueError(f'spacing shape {self.spacing.shape} != ({n}, 2)')

  def __len__(self) -> int:
    return int(self.images.shape[0])

  @property
  def labelled(self) -> bool:
    return self.labels is not None

  def subset(self, index: np.ndarray) -> Split:
    """Rows `index` of every per-slice array (volume geometry is kept whole)."""
    return dataclasses.replace(
        self,
        images=self.images[index],
        labels=None if self.labels is None else self.labels[index],
        case_ids=self.case_ids[index],
        spacing=self.spacing[index],
        slice_index=None if self.slice_index is None else self.slice_index[index],
    )


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What a network is built from: slices of `image_size` (H, W) with `channels` channels, `num_classes`
  classes (background included). The benchmarks build the same networks from a spec without any data."""

  image_size: tuple[int, int]
  channels: int
  num_classes: int

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (*self.image_size, self.channels)


@dataclasses.dataclass(frozen=True)
class DomainData:
  """Everything DiffuSeg needs, from one dataset config.

  source: labelled source-domain slices (train the teacher, provide the default mask set).
  target: target-domain training slices; their labels, when the dataset has them, are used ONLY by the
    oracle strategies `self`/`semi` of the segmentation stage, never by DiffuSeg itself.
  test: labelled target-domain slices, evaluation only.
  val: optional labelled target validation slices (subject split 70/10/20 for medical data).
  class_names: names of classes 0..K-1, index 0 is background.
  spacing_unit: 'mm' for medical data (distances in mm), 'px' for natural images.
  image_format: 'png' or 'nifti', how synthetic pairs are written.
  """

  source: Split
  target: Split
  test: Split
  class_names: tuple[str, ...]
  spacing_unit: str = 'px'
  image_format: str = 'png'
  val: Split | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def channels(self) -> int:
    return int(self.target.images.shape[-1])

  @property
  def image_size(self) -> tuple[int, int]:
    return tuple(self.target.images.shape[1:3])

  @property
  def spec(self) -> DataSpec:
    return DataSpec(self.image_size, self.channels, self.num_classes)
