"""PyTorch mirrors of the project's networks and losses, for the throughput comparison only.

Each module reproduces its linen counterpart exactly (same layers, same order, same epsilons and padding), in
PyTorch's usual NCHW layout, and `load_flax(params)` copies a linen parameter tree in, so both frameworks
compute the same function on the same weights; the benchmarks check that before timing anything.

Details that must match linen (and are easy to get wrong):
  - 'SAME' padding of a stride-2 3x3 conv pads (0, 1) on even sizes, not PyTorch's symmetric padding=1;
  - linen LayerNorm uses epsilon 1e-6 (PyTorch defaults to 1e-5), GroupNorm here uses 1e-5;
  - linen MultiHeadDotProductAttention has biases on q/k/v/out and scales q by 1/sqrt(head_dim);
  - kernels: conv [kh, kw, in, out] -> [out, in, kh, kw]; Dense [in, out] -> [out, in].
Only imported when torch is installed (the optional `bench` extra). Imports no JAX: a PyTorch timing process
builds its mirror from `architecture(linen_module)` (plain JSON values) and `load_flax(numpy tree)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Params = Mapping[str, Any]


def _tensor(a) -> torch.Tensor:
  return torch.from_numpy(np.array(a, dtype=np.float32))


class _Mirror(nn.Module):
  """Default `load_flax`: each child module takes the sub-tree of the same name."""

  def load_flax(self, params: Params) -> None:
    children = dict(self.named_children())
    extra = sorted(set(params) - set(children) - set(self._own_params()))
    if extra:
      raise KeyError(f'{type(self).__name__}: linen parameters without a torch counterpart: {extra}')
    for name, child in children.items():
      if isinstance(child, _Mirror):
        child.load_flax(params[name])
    for name in self._own_params():
      getattr(self, name).data.copy_(_tensor(params[name]))

  def _own_params(self) -> tuple[str, ...]:
    return ()


class Conv(_Mirror):
  """linen nn.Conv with padding='SAME' (asymmetric for stride 2, like XLA)."""

  def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=0)
    self.kernel, self.stride = kernel, stride

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    pads = []
    for size in (x.shape[3], x.shape[2]):  # F.pad order: (w_lo, w_hi, h_lo, h_hi)
      out = -(-size // self.stride)
      total = max((out - 1) * self.stride + self.kernel - size, 0)
      pads += [total // 2, total - total // 2]
    if any(pads):
      if pads[0] == pads[1] == pads[2] == pads[3]:
        return F.conv2d(x, self.conv.weight, self.conv.bias, self.stride, pads[0])
      x = F.pad(x, pads)
    return self.conv(x)

  def load_flax(self, params: Params) -> None:
    self.conv.weight.data.copy_(_tensor(params['kernel']).permute(3, 2, 0, 1))
    self.conv.bias.data.copy_(_tensor(params['bias']))


class Dense(_Mirror):
  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.linear = nn.Linear(cin, cout)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.linear(x)

  def load_flax(self, params: Params) -> None:
    self.linear.weight.data.copy_(_tensor(params['kernel']).T)
    self.linear.bias.data.copy_(_tensor(params['bias']))


class GroupNorm(_Mirror):
  def __init__(self, channels: int):
    super().__init__()
    groups = next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)  # layers.num_groups
    self.norm = nn.GroupNorm(groups, channels, eps=1e-5)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.norm(x)

  def load_flax(self, params: Params) -> None:
    self.norm.weight.data.copy_(_tensor(params['scale']))
    self.norm.bias.data.copy_(_tensor(params['bias']))


class LayerNorm(_Mirror):
  def __init__(self, dim: int):
    super().__init__()
    self.norm = nn.LayerNorm(dim, eps=1e-6)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.norm(x)

  def load_flax(self, params: Params) -> None:
    self.norm.weight.data.copy_(_tensor(params['scale']))
    self.norm.bias.data.copy_(_tensor(params['bias']))


class MultiHeadAttention(_Mirror):
  """linen nn.MultiHeadDotProductAttention(qkv_features=out_features=dim): [B, N, dim], [B, M, kv_dim]."""

  def __init__(self, dim: int, kv_dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)
    self.out = nn.Linear(dim, dim)

  def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    split = lambda t: t.reshape(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)
    q, k, v = split(self.query(x)), split(self.key(context)), split(self.value(context))
    o = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
    return self.out(o.transpose(1, 2).reshape(b, n, c))

  def load_flax(self, params: Params) -> None:
    for name in ('query', 'key', 'value'):
      kernel = _tensor(params[name]['kernel'])  # [in, heads, head_dim]
      getattr(self, name).weight.data.copy_(kernel.reshape(kernel.shape[0], -1).T)
      getattr(self, name).bias.data.copy_(_tensor(params[name]['bias']).reshape(-1))
    kernel = _tensor(params['out']['kernel'])  # [heads, head_dim, out]
    self.out.weight.data.copy_(kernel.reshape(-1, kernel.shape[-1]).T)
    self.out.bias.data.copy_(_tensor(params['out']['bias']))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
  """layers.timestep_embedding: [cos(t f_k), sin(t f_k)], f_k = max_period^(-k / (dim // 2))."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
  args = t.float()[:, None] * freqs[None, :]
  emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
  return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(_Mirror):
  """layers.ResBlock: GN-SiLU-Conv, GN, FiLM (h * (1 + scale) + shift), SiLU-Conv, (1x1 skip) residual."""

  def __init__(self, cin: int, cout: int, emb_dim: int | None = None):
    super().__init__()
    self.norm1, self.conv1 = GroupNorm(cin), Conv(cin, cout)
    self.norm2, self.conv2 = GroupNorm(cout), Conv(cout, cout)
    if emb_dim is not None:
      self.emb_proj = Dense(emb_dim, 2 * cout)
    if cin != cout:
      self.skip = Conv(cin, cout, kernel=1)

  def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.norm2(h)
    if emb is not None:
      scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
      h = h * (1 + scale) + shift
    h = self.conv2(F.silu(h))
    return (self.skip(x) if hasattr(self, 'skip') else x) + h


class Downsample(_Mirror):
  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.conv = Conv(cin, cout, stride=2)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.conv(x)


class Upsample(_Mirror):
  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.conv = Conv(cin, cout)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.conv(F.interpolate(x, scale_factor=2, mode='nearest'))


class AttentionBlock(_Mirror):
  """layers.AttentionBlock: GN -> self-attention (residual), then LN -> cross-attention (residual)."""

  def __init__(self, dim: int, heads: int, context_dim: int | None):
    super().__init__()
    self.norm = GroupNorm(dim)
    self.self_attn = MultiHeadAttention(dim, dim, heads)
    if context_dim is not None:
      self.cross_norm = LayerNorm(dim)
      self.cross_attn = MultiHeadAttention(dim, context_dim, heads)

  def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    b, c, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)  # [B, HW, C]
    q = self.norm(x).flatten(2).transpose(1, 2)
    tokens = tokens + self.self_attn(q, q)
    if context is not None:
      tokens = tokens + self.cross_attn(self.cross_norm(tokens), context)
    return tokens.transpose(1, 2).reshape(b, c, h, w)


class CondUNet(_Mirror):
  """models.cond_unet.CondUNet: forward(x_t [B,C,h,w], t [B], z_dom [B,D], drop_cond [B] bool) -> eps NCHW."""

  def __init__(self, in_channels: int, out_channels: int, base_channels: int, channel_mult: tuple[int, ...],
               num_res_blocks: int, attention_levels: tuple[int, ...], num_heads: int, cond_dim: int,
               cond_mode: str, num_cond_tokens: int):
    super().__init__()
    self.base, self.mult, self.nres = base_channels, tuple(channel_mult), num_res_blocks
    self.attn_levels, self.cond_mode, self.num_tokens = tuple(attention_levels), cond_mode, num_cond_tokens
    emb = 4 * base_channels
    self.null_cond = nn.Parameter(torch.zeros(cond_dim))
    self.time_dense_0, self.time_dense_1 = Dense(base_channels, emb), Dense(emb, emb)
    film = cond_mode in ('film', 'both')
    cross = cond_mode in ('cross_attention', 'both')
    if film:
      self.cond_film_0, self.cond_film_1 = Dense(cond_dim, emb), Dense(emb, emb)
    if cross:
      self.cond_tokens_0 = Dense(cond_dim, emb)
      self.cond_tokens_1 = Dense(emb, num_cond_tokens * emb)
      self.cond_tokens_norm = LayerNorm(emb)
    ctx_dim = emb if cross else None
    self.conv_in = Conv(in_channels, base_channels)
    blocks = nn.ModuleDict()
    ch, skip_ch = base_channels, [base_channels]
    last = len(channel_mult) - 1
    for level, m in enumerate(channel_mult):
      for i in range(num_res_blocks):
        blocks[f'down_{level}_res_{i}'] = ResBlock(ch, base_channels * m, emb)
        ch = base_channels * m
        if level in self.attn_levels:
          blocks[f'down_{level}_attn_{i}'] = AttentionBlock(ch, num_heads, ctx_dim)
        skip_ch.append(ch)
      if level != last:
        blocks[f'down_{level}_downsample'] = Downsample(ch, ch)
        skip_ch.append(ch)
    blocks['mid_res_0'] = ResBlock(ch, ch, emb)
    blocks['mid_attn'] = AttentionBlock(ch, num_heads, ctx_dim)
    blocks['mid_res_1'] = ResBlock(ch, ch, emb)
    for level in reversed(range(len(channel_mult))):
      out = base_channels * channel_mult[level]
      for i in range(num_res_blocks + 1):
        blocks[f'up_{level}_res_{i}'] = ResBlock(ch + skip_ch.pop(), out, emb)
        ch = out
        if level in self.attn_levels:
          blocks[f'up_{level}_attn_{i}'] = AttentionBlock(ch, num_heads, ctx_dim)
      if level != 0:
        blocks[f'up_{level}_upsample'] = Upsample(ch, ch)
    self.blocks = blocks
    self.norm_out, self.conv_out = GroupNorm(ch), Conv(ch, out_channels)

  def _own_params(self) -> tuple[str, ...]:
    return ('null_cond',)

  def load_flax(self, params: Params) -> None:
    for name, block in self.blocks.items():
      block.load_flax(params[name])
    super().load_flax({k: v for k, v in params.items() if k not in self.blocks})

  def forward(self, x: torch.Tensor, t: torch.Tensor, z_dom: torch.Tensor,
              drop_cond: torch.Tensor | None = None) -> torch.Tensor:
    emb = self.time_dense_1(F.silu(self.time_dense_0(timestep_embedding(t, self.base))))
    cond = z_dom.float()
    if drop_cond is not None:
      cond = torch.where(drop_cond[:, None], self.null_cond[None, :], cond)
    context = None
    if self.cond_mode in ('film', 'both'):
      emb = emb + self.cond_film_1(F.silu(self.cond_film_0(cond)))
    if self.cond_mode in ('cross_attention', 'both'):
      c = self.cond_tokens_1(F.silu(self.cond_tokens_0(cond)))
      context = self.cond_tokens_norm(c.reshape(c.shape[0], self.num_tokens, -1))
    blk = self.blocks
    h = self.conv_in(x)
    skips = [h]
    last = len(self.mult) - 1
    for level in range(len(self.mult)):
      for i in range(self.nres):
        h = blk[f'down_{level}_res_{i}'](h, emb)
        if level in self.attn_levels:
          h = blk[f'down_{level}_attn_{i}'](h, context)
        skips.append(h)
      if level != last:
        h = blk[f'down_{level}_downsample'](h)
        skips.append(h)
    h = blk['mid_res_1'](blk['mid_attn'](blk['mid_res_0'](h, emb), context), emb)
    for level in reversed(range(len(self.mult))):
      for i in range(self.nres + 1):
        h = blk[f'up_{level}_res_{i}'](torch.cat([h, skips.pop()], dim=1), emb)
        if level in self.attn_levels:
          h = blk[f'up_{level}_attn_{i}'](h, context)
      if level != 0:
        h = blk[f'up_{level}_upsample'](h)
    return self.conv_out(F.silu(self.norm_out(h)))


def cond_unet_from_linen(module, in_channels: int) -> CondUNet:
  """The mirror of a linen `CondUNet` instance (same fields)."""
  return from_architecture(architecture(module, in_channels))


def _level_channels(base: int, levels: int) -> tuple[int, ...]:
  return tuple(base * min(2**lv, 4) for lv in range(levels))  # layers.level_channels


class ConvEncoder(_Mirror):
  def __init__(self, cin: int, channels: tuple[int, ...]):
    super().__init__()
    self.levels = len(channels)
    self.conv_in = Conv(cin, channels[0])
    ch = channels[0]
    for level, c in enumerate(channels):
      self.add_module(f'res_{level}', ResBlock(ch, c))
      self.add_module(f'down_{level}', Downsample(c, c))
      ch = c
    self.res_mid, self.norm_out = ResBlock(ch, ch), GroupNorm(ch)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.conv_in(x)
    for level in range(self.levels):
      h = getattr(self, f'down_{level}')(getattr(self, f'res_{level}')(h))
    return F.silu(self.norm_out(self.res_mid(h)))


class ConvDecoder(_Mirror):
  def __init__(self, cin: int, channels: tuple[int, ...], cout: int, emb_dim: int | None):
    super().__init__()
    self.levels = len(channels)
    self.conv_in = Conv(cin, channels[-1])
    self.res_mid = ResBlock(channels[-1], channels[-1], emb_dim)
    ch = channels[-1]
    for level in reversed(range(len(channels))):
      self.add_module(f'up_{level}', Upsample(ch, channels[level]))
      self.add_module(f'res_{level}', ResBlock(channels[level], channels[level], emb_dim))
      ch = channels[level]
    self.norm_out, self.conv_out = GroupNorm(ch), Conv(ch, cout)

  def forward(self, z: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
    h = self.res_mid(self.conv_in(z), emb)
    for level in reversed(range(self.levels)):
      h = getattr(self, f'res_{level}')(getattr(self, f'up_{level}')(h), emb)
    return self.conv_out(F.silu(self.norm_out(h)))


def _split_moments(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  mean, logvar = m.chunk(2, dim=1)
  return mean, logvar.clamp(-30.0, 20.0)


class _SegEncoder(_Mirror):
  def __init__(self, cin, channels, z_seg):
    super().__init__()
    self.features, self.moments = ConvEncoder(cin, channels), Conv(channels[-1], 2 * z_seg)

  def forward(self, x):
    return _split_moments(self.moments(self.features(x)))


class _DomainEncoder(_Mirror):
  def __init__(self, cin, channels, z_dom):
    super().__init__()
    self.features, self.moments = ConvEncoder(cin, channels), Dense(channels[-1], 2 * z_dom)

  def forward(self, x):
    return _split_moments(self.moments(self.features(x).mean(dim=(2, 3))))


class _ImageDecoder(_Mirror):
  def __init__(self, z_seg, z_dom, channels, cout):
    super().__init__()
    width = 4 * channels[0]
    self.dom_mlp_0, self.dom_mlp_1 = Dense(z_dom, width), Dense(width, width)
    self.decoder = ConvDecoder(z_seg, channels, cout, width)

  def forward(self, z_seg, z_dom):
    return self.decoder(z_seg, self.dom_mlp_1(F.silu(self.dom_mlp_0(z_dom))))


class FFDVAE(_Mirror):
  """models.ffd_vae.FFDVAE: forward(x [B,C,H,W], sample) -> the same dict (NCHW maps)."""

  def __init__(self, num_classes: int, channels: int, base_channels: int, levels: int, z_seg_channels: int,
               z_dom_dim: int):
    super().__init__()
    ch = _level_channels(base_channels, levels)
    self.seg_encoder = _SegEncoder(channels, ch, z_seg_channels)
    self.dom_encoder = _DomainEncoder(channels, ch, z_dom_dim)
    self.seg_decoder = ConvDecoder(z_seg_channels, ch, num_classes, None)
    self.image_decoder = _ImageDecoder(z_seg_channels, z_dom_dim, ch, channels)

  def forward(self, x: torch.Tensor, sample: bool = True) -> dict[str, torch.Tensor]:
    seg_mean, seg_logvar = self.seg_encoder(x)
    dom_mean, dom_logvar = self.dom_encoder(x)
    if sample:
      z_seg = seg_mean + torch.exp(0.5 * seg_logvar) * torch.randn_like(seg_mean)
      z_dom = dom_mean + torch.exp(0.5 * dom_logvar) * torch.randn_like(dom_mean)
    else:
      z_seg, z_dom = seg_mean, dom_mean
    return {'seg_logits': self.seg_decoder(z_seg), 'recon': self.image_decoder(z_seg, z_dom),
            'seg_mean': seg_mean, 'seg_logvar': seg_logvar, 'z_seg': z_seg,
            'dom_mean': dom_mean, 'dom_logvar': dom_logvar, 'z_dom': z_dom}


def ffd_vae_from_linen(module) -> FFDVAE:
  return from_architecture(architecture(module, module.out_channels))


class SegUNet(_Mirror):
  """models.seg_unet.SegUNet: x [B,C,H,W] -> logits [B,K,H,W]."""

  def __init__(self, in_channels: int, num_classes: int, base_channels: int, levels: int):
    super().__init__()
    self.levels = levels
    ch = _level_channels(base_channels, levels + 1)
    self.conv_in = Conv(in_channels, ch[0])
    prev = ch[0]
    for level in range(levels):
      self.add_module(f'down_{level}_res', ResBlock(prev, ch[level]))
      self.add_module(f'down_{level}_downsample', Downsample(ch[level], ch[level + 1]))
      prev = ch[level + 1]
    self.mid_res_0, self.mid_res_1 = ResBlock(prev, ch[-1]), ResBlock(ch[-1], ch[-1])
    prev = ch[-1]
    for level in reversed(range(levels)):
      self.add_module(f'up_{level}_upsample', Upsample(prev, ch[level]))
      self.add_module(f'up_{level}_res', ResBlock(2 * ch[level], ch[level]))
      prev = ch[level]
    self.norm_out, self.conv_out = GroupNorm(ch[0]), Conv(ch[0], num_classes, kernel=1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.conv_in(x)
    skips = []
    for level in range(self.levels):
      h = getattr(self, f'down_{level}_res')(h)
      skips.append(h)
      h = getattr(self, f'down_{level}_downsample')(h)
    h = self.mid_res_1(self.mid_res_0(h))
    for level in reversed(range(self.levels)):
      h = getattr(self, f'up_{level}_upsample')(h)
      h = getattr(self, f'up_{level}_res')(torch.cat([h, skips.pop()], dim=1))
    return self.conv_out(F.silu(self.norm_out(h)))


def seg_unet_from_linen(module, in_channels: int) -> SegUNet:
  return from_architecture(architecture(module, in_channels))


# The linen fields each mirror is built from, in its constructor's order after in_channels.
_FIELDS = {
    'CondUNet': ('out_channels', 'base_channels', 'channel_mult', 'num_res_blocks', 'attention_levels',
                 'num_heads', 'cond_dim', 'cond_mode', 'num_cond_tokens'),
    'FFDVAE': ('num_classes', 'base_channels', 'levels', 'z_seg_channels', 'z_dom_dim'),
    'SegUNet': ('num_classes', 'base_channels', 'levels'),
}


def architecture(module, in_channels: int) -> dict[str, Any]:
  """What the mirror of a linen CondUNet / FFDVAE / SegUNet needs, as JSON values: the linen module stays in
  the JAX process, a PyTorch-only process gets this (and the weights as numpy arrays)."""
  kind = type(module).__name__
  if kind not in _FIELDS:
    raise TypeError(f'no torch mirror of {kind}')
  plain = lambda v: [int(x) for x in v] if isinstance(v, (tuple, list)) else v
  return {'kind': kind, 'in_channels': int(in_channels), **{f: plain(getattr(module, f)) for f in _FIELDS[kind]}}


def from_architecture(arch: Mapping[str, Any]) -> _Mirror:
  """The mirror module described by `architecture(...)` (random weights until `load_flax`)."""
  kind = arch['kind']
  args = [arch[f] for f in _FIELDS[kind]]
  if kind == 'CondUNet':
    return CondUNet(arch['in_channels'], *args)
  if kind == 'FFDVAE':  # the FFD-VAE reconstructs its input: out_channels == in_channels
    return FFDVAE(args[0], arch['in_channels'], *args[1:])
  return SegUNet(arch['in_channels'], *args)


def count_params(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())


# Losses (diffuseg_jax.losses), NCHW logits and int labels [B, H, W].

def soft_dice_loss(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
  inter = (p * q).sum(dim=(2, 3))
  denom = p.sum(dim=(2, 3)) + q.sum(dim=(2, 3))
  return 1.0 - ((2.0 * inter + eps) / (denom + eps)).mean()


def ce_dice(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """cross_entropy + soft_dice_loss(softmax(logits), one_hot(labels)), as in stages.segment.seg_step."""
  one_hot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).float()
  return F.cross_entropy(logits, labels) + soft_dice_loss(torch.softmax(logits, dim=1), one_hot)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
  kl = 0.5 * (torch.exp(logvar) + mean.square() - 1.0 - logvar)
  return kl.reshape(kl.shape[0], -1).sum(-1).mean()


def teacher_loss(out: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor, beta: float,
                 seg_weight: float) -> torch.Tensor:
  """losses.teacher_loss: seg_weight (CE + Dice) + MSE reconstruction + beta (KL(z_seg) + KL(z_dom))."""
  rec = F.mse_loss(out['recon'], images)
  kl = gaussian_kl(out['seg_mean'], out['seg_logvar']) + gaussian_kl(out['dom_mean'], out['dom_logvar'])
  return seg_weight * ce_dice(out['seg_logits'], labels) + rec + beta * kl
