"""The synthesis kernel: region image -> latent, blended DDIM in latent space, decode; one pure function.

  synthesize(unet, settings, alphas_cumprod, params, codec, key, region_image, mask, z_dom, label_channels=None)
      -> (images, err)

region_image [B, H, W, C] in [-1, 1] (the region content r(m) in image space); mask [B, H, W] float (1 where
the given label is pasted); z_dom [B, D]; images [B, H, W, C] decoded and clipped to [-1, 1]; err [B] the
largest |x_0 - r(m)| inside the blended latent region (0 up to rounding for hard blending to the last step).
label_channels [B, h, w, K-1] (latent size): the label map that a mask-conditioned denoiser sees beside x_t
(sampling/mask_condition.py); None for the paper's D(x_t, t, z_dom).
`unet` and `settings` are static: the synthesize stage binds them with functools.partial and jits the rest once
with its shardings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffuseg_jax.sampling import blend as blend_lib
from diffuseg_jax.sampling import mask_condition, prediction
from diffuseg_jax.sampling.sampler import SamplerSettings, blended_ddim_sample


def synthesize(unet, settings: SamplerSettings, alphas_cumprod: jax.Array, params, codec, key: jax.Array,
               region_image: jax.Array, mask: jax.Array, z_dom: jax.Array,
               label_channels: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  region = codec.encode(region_image)
  m = blend_lib.mask_to_latent(mask, codec.downsample,
                               blend_lib.latent_mask_threshold(settings.latent_mask, codec.downsample))

  def apply(x, t, z, drop):
    return unet.apply({'params': params}, x, t, z, drop)

  if label_channels is not None:
    apply = mask_condition.conditioned(apply, label_channels)
  eps_fn = prediction.eps_fn(apply, alphas_cumprod, settings.prediction_type)
  x0, _ = blended_ddim_sample(eps_fn, alphas_cumprod, key, region, m, z_dom, settings)
  err = jnp.max(jnp.abs(x0 - region) * m, axis=(1, 2, 3))
  return jnp.clip(codec.decode(x0), -1.0, 1.0), err
