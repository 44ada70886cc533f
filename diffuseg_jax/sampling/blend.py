"""Blending the denoised latent with the noised mask-region content (paper section III-C).

Arrays are NHWC: latents x [B, h, w, C], masks m [B, h, w, 1] in [0, 1] (1 = the labelled region whose content
comes from r(m)). What each mode preserves exactly (where the mask region of the output equals x_seg
bit-for-bit):
  hard     x_dom (1 - m) + x_seg m. Wherever m = 1 the output is x_seg, wherever m = 0 it is x_dom.
  soft     the same with m_soft = max(m, blur(m)): the feather grows *outwards* only, so the region m = 1 is
           still exactly x_seg; pixels farther than the blur radius from the region are exactly x_dom; a band
           of ~3 sigma outside the region mixes the two.
  soft_vp  soft, variance-preserving (`variance_preserving_blend`): the clean estimates are mixed with m_soft
           and the two independent noises with m_soft / sqrt(m_soft^2 + (1 - m_soft)^2), so the feather band
           keeps the noise variance 1 - a that the next step expects (a plain soft blend leaves
           ((1 - m)^2 + m^2)(1 - a) there: half of it where m = 0.5). Where m_soft is 0 or 1 it is x_dom or
           x_seg, as soft.
  pyramid  Burt & Adelson (1983): every Laplacian level is blended with the Gaussian-pyramid mask of that
           level, then the pyramid is collapsed. The boundary is smooth at every scale, but nothing is
           exactly preserved (coarse levels leak across the edge); equals x_seg only for an all-ones mask.

The pixel mask becomes a latent mask (`mask_to_latent`) by one of LATENT_MASKS: 'coverage' (default: every
latent pixel that holds any labelled pixel, so a 1-pixel vessel keeps all its pixels inside the preserved
region whatever the autoencoder's factor) or 'majority' (more than half covered: an unbiased area, but lines
narrower than half the factor vanish).
"""

from __future__ import annotations

import math

import einops
import jax
import jax.numpy as jnp
import numpy as np

BLEND_MODES = ('hard', 'soft', 'soft_vp', 'pyramid')
LATENT_MASKS = ('coverage', 'majority')

# Burt-Adelson's 5-tap generating kernel (a = 0.375), binomial; exact in binary floating point, so the
# Gaussian pyramid of an all-ones mask stays exactly one.
_BINOMIAL5 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def mask_to_latent(mask: jax.Array, factor: int, threshold: float | None = 0.5) -> jax.Array:
  """Pixel mask [B, H, W] or [B, H, W, 1] (bool or float in [0, 1]) -> float32 [B, H/f, W/f, 1].

  Area-average over f x f blocks (the fraction of each latent pixel covered by the region), then, by default,
  threshold at 0.5 (majority vote). Binary is the default because the paper's blending mask m is binary: a
  latent pixel then comes entirely from r(m) or entirely from the denoiser, so "the region is preserved
  exactly" has a meaning in latent space, and majority voting keeps the region's area unbiased (the edge moves
  by at most half a latent pixel). `threshold=None` returns the coverage fractions (a soft edge).
  """
  if mask.ndim == 3:
    mask = mask[..., None]
  if mask.ndim != 4 or mask.shape[-1] != 1:
    raise ValueError(f'mask must be [B, H, W] or [B, H, W, 1], got shape {mask.shape}')
  _, h, w, _ = mask.shape
  if h % factor or w % factor:
    raise ValueError(f'mask size {h}x{w} is not divisible by the latent downsampling factor {factor} '
                      '(the image size must be a multiple of the autoencoder downsample)')
  frac = einops.reduce(mask.astype(jnp.float32), 'b (h fh) (w fw) c -> b h w c', 'mean', fh=factor, fw=factor)
  if threshold is None:
    return frac
  return (frac >= threshold).astype(jnp.float32)


def latent_mask_threshold(rule: str, factor: int) -> float:
  """The `mask_to_latent` threshold of a LATENT_MASKS rule: 'majority' 0.5; 'coverage' half of one pixel's
  share of a latent pixel (any covered pixel passes, exactly, in float32)."""
  if rule == 'majority':
    return 0.5
  if rule == 'coverage':
    return 0.5 / (factor * factor)
  raise ValueError(f'latent_mask={rule!r} is not one of {list(LATENT_MASKS)}')


def _conv1d_edge(x: jax.Array, kernel: np.ndarray, axis: int) -> jax.Array:
  """Correlate x along `axis` with a symmetric 1-D kernel, edge-replicated borders, same output size."""
  r = (len(kernel) - 1) // 2
  pad = [(0, 0)] * x.ndim
  pad[axis] = (r, r)
  xp = jnp.pad(x, pad, mode='edge')
  n = x.shape[axis]
  out = jnp.zeros_like(x)
  for k, wk in enumerate(kernel):
    out = out + float(wk) * jax.lax.slice_in_dim(xp, k, k + n, axis=axis)
  return out


def _gaussian_kernel(sigma: float) -> np.ndarray:
  r = max(1, math.ceil(3.0 * sigma))
  k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  return k / k.sum()


def gaussian_blur(x: jax.Array, sigma: float) -> jax.Array:
  """Separable Gaussian blur of x [B, H, W, C] over H and W; radius ceil(3 sigma), edge-replicated borders
  (a constant image stays constant, so a mask touching the image border is not darkened there).
  sigma <= 0 returns x."""
  if sigma <= 0:
    return x
  k = _gaussian_kernel(float(sigma))
  return _conv1d_edge(_conv1d_edge(x, k, 1), k, 2)


def _effective_levels(h: int, w: int, levels: int) -> int:
  """Clip the number of levels so that every downsampling halves an even size (v2 = 2-adic valuation)."""
  v2 = lambda n: (n & -n).bit_length() - 1  # noqa: E731
  return max(1, min(int(levels), 1 + min(v2(h), v2(w))))


def _reduce(x: jax.Array) -> jax.Array:
  """Burt-Adelson REDUCE: 5-tap binomial low-pass, then keep every second row and column."""
  return _conv1d_edge(_conv1d_edge(x, _BINOMIAL5, 1), _BINOMIAL5, 2)[:, ::2, ::2, :]


def _expand(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """EXPAND: bilinear upsampling to `shape` (exactness of collapse does not depend on this choice)."""
  return jax.image.resize(x, shape, method='linear')


def gaussian_pyramid(x: jax.Array, levels: int) -> list[jax.Array]:
  """[x, REDUCE(x), ...]: `levels` arrays (clipped as in `laplacian_pyramid`), finest first."""
  levels = _effective_levels(x.shape[1], x.shape[2], levels)
  pyr = [x]
  for _ in range(levels - 1):
    pyr.append(_reduce(pyr[-1]))
  return pyr


def laplacian_pyramid(x: jax.Array, levels: int) -> list[jax.Array]:
  """Laplacian pyramid of x [B, H, W, C]: `levels` arrays, finest first, the last the coarsest Gaussian level.

  Each level halves H and W. When H or W is not divisible by 2^(levels-1), the number of levels is clipped to
  1 + (how many times both sizes can be halved exactly), so no level has a fractional size.
  """
  gauss = gaussian_pyramid(x, levels)
  lap = [g - _expand(g_next, g.shape) for g, g_next in zip(gauss[:-1], gauss[1:], strict=True)]
  return lap + [gauss[-1]]


def collapse_pyramid(pyr: list[jax.Array]) -> jax.Array:
  """Inverse of `laplacian_pyramid`: expand the coarsest level and add each finer level back."""
  x = pyr[-1]
  for lap in reversed(pyr[:-1]):
    x = lap + _expand(x, lap.shape)
  return x


def blend(x_dom: jax.Array, x_seg: jax.Array, mask: jax.Array, mode: str = 'hard', soft_sigma: float = 1.0,
          pyramid_levels: int = 3) -> jax.Array:
  """Combine x_dom (outside the region) and x_seg (inside): [B, h, w, C] each, mask [B, h, w, 1].

  See the module docstring for what each mode preserves exactly. mode, soft_sigma, pyramid_levels are static.
  """
  mask = mask.astype(x_dom.dtype)
  if mode == 'hard':
    return x_dom * (1.0 - mask) + x_seg * mask
  if mode == 'soft':
    m = soft_mask(mask, soft_sigma)
    return x_dom * (1.0 - m) + x_seg * m
  if mode == 'soft_vp':
    raise ValueError("blend_mode='soft_vp' mixes clean estimates and noises separately: use "
                     'variance_preserving_blend')
  if mode == 'pyramid':
    lap_dom = laplacian_pyramid(x_dom, pyramid_levels)
    lap_seg = laplacian_pyramid(x_seg, pyramid_levels)
    masks = gaussian_pyramid(mask, pyramid_levels)
    return collapse_pyramid([d * (1.0 - m) + s * m for d, s, m in zip(lap_dom, lap_seg, masks, strict=True)])
  raise ValueError(f'blend_mode={mode!r} is not one of {list(BLEND_MODES)}')


def soft_mask(mask: jax.Array, soft_sigma: float) -> jax.Array:
  """max(m, blur(m)): the feather grows outwards only, the region m = 1 stays 1."""
  return jnp.maximum(mask, gaussian_blur(mask, soft_sigma))


def variance_preserving_blend(x_dom: jax.Array, x0_dom: jax.Array, x_seg: jax.Array, x0_seg: jax.Array,
                              mask: jax.Array, a: jax.Array | float, soft_sigma: float) -> jax.Array:
  """Soft blend of two latents at one noise level, x = sqrt(a) x0 + sqrt(1 - a) n with n ~ N(0, I), that keeps
  the noise variance at 1 - a (mode 'soft_vp'): [B, h, w, C] each, mask [B, h, w, 1], `a` the alpha-bar both
  are at (a = 1: clean latents, the result is the soft blend of x0_dom and x0_seg).

  x0 = (1 - m) x0_dom + m x0_seg;  n = ((1 - m) n_dom + m n_seg) / sqrt((1 - m)^2 + m^2), with n_dom, n_seg the
  noises implied by (x, x0) and independent (x_seg's noise is drawn fresh each step); m = soft_mask(mask).
  """
  m = soft_mask(mask.astype(x_dom.dtype), soft_sigma)
  a = jnp.asarray(a, x_dom.dtype)
  noise_scale = jnp.sqrt(jnp.maximum(1.0 - a, 0.0))
  safe = jnp.where(noise_scale > 0, noise_scale, 1.0)  # a = 1: no noise, the noises' weights do not matter
  n_dom = (x_dom - jnp.sqrt(a) * x0_dom) / safe
  n_seg = (x_seg - jnp.sqrt(a) * x0_seg) / safe
  x0 = x0_dom * (1.0 - m) + x0_seg * m
  noise = (n_dom * (1.0 - m) + n_seg * m) * jax.lax.rsqrt(jnp.square(1.0 - m) + jnp.square(m))
  return jnp.sqrt(a) * x0 + noise_scale * noise
