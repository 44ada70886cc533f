"""Conditional eps-prediction UNet D(x_t, t, z_dom) of paper eq. 7 (section III-C).

The paper conditions Stable Diffusion on the domain factor z_dom instead of a text prompt. Here z_dom enters
by cross-attention tokens (the Stable Diffusion route), by FiLM through the time embedding, or both
(`cond_mode`). A learned null condition replaces z_dom on rows with drop_cond=True; training with random
drops gives the unconditional model that classifier-free guidance needs.

Choice: the output conv is zero-initialised (DDPM/ADM convention), so an untrained model predicts eps = 0
and training starts at loss ~1 instead of a large random-output loss. `zero_init_output=False` turns it off.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from einops import rearrange

from diffuseg_jax.models import layers

Array = jnp.ndarray

COND_MODES = ('cross_attention', 'film', 'both')


def select_condition(z_dom: Array, null_cond: Array, drop_cond: Array | None) -> Array:
  """Rows with drop_cond=True get the null condition: [B, D], [D], [B] bool | None -> [B, D] float32."""
  z_dom = z_dom.astype(jnp.float32)
  if drop_cond is None:
    return z_dom
  return jnp.where(jnp.asarray(drop_cond, bool)[:, None], null_cond[None, :].astype(jnp.float32), z_dom)


class CondUNet(nn.Module):
  """ADM-style UNet. `__call__(x_t [B, h, w, C], t [B] (int/float) or scalar, z_dom [B, cond_dim],
  drop_cond [B] bool | None) -> eps [B, h, w, out_channels]` float32. h, w divisible by
  2^(len(channel_mult) - 1). Params float32; compute in `dtype`.
  """

  out_channels: int
  base_channels: int = 32
  channel_mult: tuple[int, ...] = (1, 2, 2)
  num_res_blocks: int = 1
  attention_levels: tuple[int, ...] = (2,)  # indices into channel_mult; the middle block always attends
  num_heads: int = 4
  cond_dim: int = 16
  cond_mode: str = 'both'
  num_cond_tokens: int = 4
  zero_init_output: bool = True
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.cond_mode not in COND_MODES:
      raise ValueError(f'cond_mode must be one of {", ".join(COND_MODES)}, got {self.cond_mode!r}')
    bad = [lv for lv in self.attention_levels if not 0 <= lv < len(self.channel_mult)]
    if bad:
      raise ValueError(f'attention_levels {tuple(self.attention_levels)} must index channel_mult '
                        f'(0..{len(self.channel_mult) - 1})')
    for lv in set(self.attention_levels) | {len(self.channel_mult) - 1}:
      width = self.base_channels * self.channel_mult[lv]
      if width % self.num_heads:
        raise ValueError(f'num_heads={self.num_heads} must divide the width {width} of level {lv}')
    if self.num_res_blocks < 1 or self.num_cond_tokens < 1:
      raise ValueError('num_res_blocks and num_cond_tokens must be >= 1')
    super().__post_init__()

  @nn.compact
  def __call__(self, x_t: Array, t: Array, z_dom: Array, drop_cond: Array | None = None) -> Array:
    b, h, w, _ = x_t.shape
    factor = 2 ** (len(self.channel_mult) - 1)
    if h % factor or w % factor:
      raise ValueError(f'latent size {h}x{w} is not divisible by 2^(len(channel_mult) - 1) = {factor}')
    if z_dom.shape != (b, self.cond_dim):
      raise ValueError(f'z_dom has shape {z_dom.shape}, expected ({b}, {self.cond_dim}) (the z_dom width)')
    dt = self.dtype
    emb_dim = 4 * self.base_channels

    # Timestep embedding [B, E].
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    emb = layers.timestep_embedding(t, self.base_channels)
    emb = nn.Dense(emb_dim, dtype=dt, name='time_dense_0')(emb)
    emb = nn.Dense(emb_dim, dtype=dt, name='time_dense_1')(nn.silu(emb))

    # Condition: z_dom or the learned null, then FiLM (added to the time embedding) and/or context tokens.
    null_cond = self.param('null_cond', nn.initializers.normal(1.0), (self.cond_dim,), jnp.float32)
    cond = select_condition(z_dom, null_cond, drop_cond).astype(dt)
    context = None
    if self.cond_mode in ('film', 'both'):
      c = nn.Dense(emb_dim, dtype=dt, name='cond_film_0')(cond)
      emb = emb + nn.Dense(emb_dim, dtype=dt, name='cond_film_1')(nn.silu(c))
    if self.cond_mode in ('cross_attention', 'both'):
      c = nn.Dense(emb_dim, dtype=dt, name='cond_tokens_0')(cond)
      c = nn.Dense(self.num_cond_tokens * emb_dim, dtype=dt, name='cond_tokens_1')(nn.silu(c))
      context = nn.LayerNorm(dtype=dt, name='cond_tokens_norm')(
          rearrange(c, 'b (n d) -> b n d', n=self.num_cond_tokens))

    def res(ch, name):
      return layers.ResBlock(ch, dtype=dt, name=name)

    def attn(name):
      return layers.AttentionBlock(self.num_heads, dtype=dt, name=name)

    # Down path.
    h = layers.conv3x3(self.base_channels, dt, 'conv_in')(x_t.astype(dt))
    skips = [h]
    last = len(self.channel_mult) - 1
    for level, mult in enumerate(self.channel_mult):
      ch = self.base_channels * mult
      for i in range(self.num_res_blocks):
        h = res(ch, f'down_{level}_res_{i}')(h, emb)
        if level in self.attention_levels:
          h = attn(f'down_{level}_attn_{i}')(h, context)
        skips.append(h)
      if level != last:
        h = layers.Downsample(ch, dtype=dt, name=f'down_{level}_downsample')(h)
        skips.append(h)

    # Middle.
    ch = self.base_channels * self.channel_mult[-1]
    h = res(ch, 'mid_res_0')(h, emb)
    h = attn('mid_attn')(h, context)
    h = res(ch, 'mid_res_1')(h, emb)

    # Up path: num_res_blocks + 1 blocks per level, each eating one skip.
    for level in reversed(range(len(self.channel_mult))):
      ch = self.base_channels * self.channel_mult[level]
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(ch, f'up_{level}_res_{i}')(h, emb)
        if level in self.attention_levels:
          h = attn(f'up_{level}_attn_{i}')(h, context)
      if level != 0:
        h = layers.Upsample(ch, dtype=dt, name=f'up_{level}_upsample')(h)

    h = nn.silu(layers.group_norm(h.shape[-1], dt, 'norm_out')(h))
    h = layers.conv3x3(self.out_channels, dt, 'conv_out', zero_init=self.zero_init_output)(h)
    return h.astype(jnp.float32)


def build_cond_unet(diffusion_config, channels: int, cond_dim: int, dtype: Any = jnp.float32) -> CondUNet:
  """CondUNet from the `diffusion` config section; `channels` = latent channels, `cond_dim` = vae.z_dom_dim."""
  return CondUNet(
      out_channels=channels,
      base_channels=diffusion_config.base_channels,
      channel_mult=tuple(diffusion_config.channel_mult),
      num_res_blocks=diffusion_config.num_res_blocks,
      attention_levels=tuple(diffusion_config.attention_levels),
      num_heads=diffusion_config.num_heads,
      cond_dim=cond_dim,
      cond_mode=diffusion_config.cond_mode,
      num_cond_tokens=diffusion_config.num_cond_tokens,
      dtype=dtype,
  )
