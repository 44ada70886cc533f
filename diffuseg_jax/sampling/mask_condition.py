"""A denoiser that also sees the label map: D([x_t, L(m)], t, z_dom), L(m) = label channels at latent size.

diffusion.mask_condition='pseudo_labels' trains the denoiser on target latents with the student's
pseudo-labels of the same images as L(m), so it learns how each labelled structure (and the unlabelled
background) looks in the target domain; at sampling L(m) comes from the given label map, so the whole image,
not only the pasted region, agrees with the label. 'none' is the paper's D(x_t, t, z_dom).

  label_channels(labels [B, H, W] int, num_classes K, factor f) -> [B, H/f, W/f, K-1] float32
      the fraction of each foreground class (1..K-1) in every f x f block (1 or 0 in pixel space, f = 1);
  conditioned(apply, channels) -> apply': the same call signature as `apply`, with L(m) concatenated to x_t
      (repeated along the batch when classifier-free guidance doubles it).
"""

from __future__ import annotations

from collections.abc import Callable

import einops
import jax
import jax.numpy as jnp
import numpy as np

MASK_CONDITIONS = ('none', 'pseudo_labels')


def num_channels(mode: str, num_classes: int) -> int:
  """Extra denoiser input channels of `mode`."""
  if mode not in MASK_CONDITIONS:
    raise ValueError(f'mask_condition={mode!r} is not one of {MASK_CONDITIONS}')
  return 0 if mode == 'none' else max(num_classes - 1, 1)


def label_channels(labels, num_classes: int, factor: int):
  """Per-block fraction of each foreground class; numpy in, numpy out (jax in, jax out)."""
  xp = jnp if isinstance(labels, jax.Array) else np
  k = max(num_classes, 2)
  one_hot = (labels[..., None] == xp.arange(1, k)).astype(xp.float32)
  return einops.reduce(one_hot, 'b (h f1) (w f2) k -> b h w k', 'mean', f1=factor, f2=factor)


def conditioned(apply: Callable[..., jax.Array], channels: jax.Array) -> Callable[..., jax.Array]:
  """apply(x_t, t, z, drop) -> apply([x_t, channels], t, z, drop); channels [B, h, w, K-1] for x_t [nB, ...]."""

  def call(x_t, t, z_dom, drop):
    reps = x_t.shape[0] // channels.shape[0]
    extra = jnp.concatenate([channels] * reps) if reps > 1 else channels
    return apply(jnp.concatenate([x_t, extra.astype(x_t.dtype)], axis=-1), t, z_dom, drop)

  return call
