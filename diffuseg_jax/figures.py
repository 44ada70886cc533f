"""Figures people would rather look at than read: image grids, label contours over images, loss curves.

All inputs are host numpy arrays: images [N, H, W, C] in [-1, 1] (C = 1 or 3), labels [N, H, W] int.
Files are written atomically (PNG via a temp file + rename).
"""

from __future__ import annotations

import matplotlib

matplotlib.use('Agg')

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from diffuseg_jax import atomic  # noqa: E402
from diffuseg_jax.data.transforms import from_unit_range  # noqa: E402

CONTOUR_COLOURS = ('#ff3b30', '#34c759', '#007aff', '#ffcc00', '#af52de', '#ff9500', '#5ac8fa', '#ff2d55')


def _show(ax, image):
  img = from_unit_range(image)
  if img.shape[-1] == 1:
    ax.imshow(img[..., 0], cmap='gray', vmin=0, vmax=1, interpolation='nearest')
  else:
    ax.imshow(img, interpolation='nearest')
  ax.set_xticks([])
  ax.set_yticks([])


def _contours(ax, label, num_classes, linewidth=1.0):
  for k in range(1, num_classes):
    mask = (label == k).astype(float)
    if mask.any():
      ax.contour(mask, levels=[0.5], colors=[CONTOUR_COLOURS[(k - 1) % len(CONTOUR_COLOURS)]],
                 linewidths=linewidth)


def _save(fig, path: str) -> None:
  with atomic.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110, bbox_inches='tight', format='png')
  plt.close(fig)


def image_rows(rows: list[np.ndarray], row_titles: list[str], path: str, *, labels: list | None = None,
               num_classes: int = 2, title: str | None = None) -> None:
  """One row per array in `rows` ([N,H,W,C] each), N columns; optional label contours per row."""
  n = min(len(r) for r in rows)
  fig, axes = plt.subplots(len(rows), n, figsize=(1.4 * n + 1.2, 1.4 * len(rows) + 0.4), squeeze=False)
  for i, (row, name) in enumerate(zip(rows, row_titles, strict=True)):
    for j in range(n):
      _show(axes[i, j], row[j])
      if labels is not None and labels[i] is not None:
        _contours(axes[i, j], labels[i][j], num_classes)
    axes[i, 0].set_ylabel(name, fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  _save(fig, path)


def label_image(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """[N,H,W] int -> [N,H,W,3] in [-1,1]: background black, classes in the contour colours."""
  palette = np.array([[0, 0, 0]] + [matplotlib.colors.to_rgb(c) for c in CONTOUR_COLOURS], np.float32)
  idx = np.where(labels > 0, (labels - 1) % len(CONTOUR_COLOURS) + 1, 0)
  del num_classes
  return palette[idx] * 2.0 - 1.0


def synthesis_figure(masks: np.ndarray, synthetic: np.ndarray, references: np.ndarray, path: str,
                     num_classes: int, title: str | None = None) -> None:
  """Paper Fig. 4/6 style: columns = examples; rows = given mask | synthetic (+ mask contours) | reference."""
  image_rows(
      [label_image(masks, num_classes), synthetic, references],
      ['given mask', 'synthetic\n+ mask contour', 'target reference'],
      path, labels=[None, masks, None], num_classes=num_classes, title=title,
  )


def loss_curves(rows_by_stage: dict[str, list[dict]], path: str) -> None:
  """One panel per stage: 'loss' against step (log scale when positive)."""
  stages = [s for s, r in rows_by_stage.items() if r]
  if not stages:
    return
  fig, axes = plt.subplots(1, len(stages), figsize=(3.2 * len(stages), 2.6), squeeze=False)
  for ax, stage in zip(axes[0], stages, strict=True):
    rows = rows_by_stage[stage]
    groups: dict[str, list] = {}
    for r in rows:
      groups.setdefault(r.get('run', ''), []).append(r)
    for run, rs in groups.items():
      steps = [r['step'] for r in rs if 'loss' in r]
      vals = [r['loss'] for r in rs if 'loss' in r]
      ax.plot(steps, vals, label=run or None, linewidth=1)
    if all(r.get('loss', 1) > 0 for r in rows):
      ax.set_yscale('log')
    ax.set_title(stage, fontsize=9)
    ax.set_xlabel('step', fontsize=8)
    ax.tick_params(labelsize=7)
    if len(groups) > 1:
      ax.legend(fontsize=6)
  fig.tight_layout()
  _save(fig, path)
