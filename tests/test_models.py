"""Networks: shapes/dtypes, factorisation properties, conditioning, stable parameter names, latent codec.

Models are tiny (8x8 images, 8 base channels). Each test compiles as few programs as it can: XLA CPU
compile time, not compute, is what these tests spend.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffuseg_jax.models import latent, layers
from diffuseg_jax.models.autoencoder import KLAutoencoder
from diffuseg_jax.models.cond_unet import CondUNet
from diffuseg_jax.models.ffd_vae import FFDVAE
from diffuseg_jax.models.seg_unet import SegUNet

B, H, C, K = 2, 8, 3, 3
KEY = jax.random.key(0)


def _x(seed=1, shape=(B, H, H, C)):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1.0, 1.0, shape), jnp.float32)


def _init(model, *args, seed=0, **kwargs):
  """Params with the real tree structure (init traced, not compiled) and host-drawn values.

  Compiling flax's per-parameter initialisers costs seconds per network on CPU; the tests only need a
  well-scaled random network: kernels N(0, 1 / fan_in), norm scales 1, small random biases.
  """
  shapes = jax.eval_shape(lambda: model.init({'params': KEY, 'latent': KEY}, *args, **kwargs))['params']
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'scale':
      return jnp.ones(leaf.shape, leaf.dtype)
    std = 0.05 if name == 'bias' else 1 / math.sqrt(max(1, math.prod(leaf.shape[:-1])))
    return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize('channels,groups', [(32, 32), (48, 24), (6, 6), (96, 32), (40, 20), (3, 3)])
def test_num_groups(channels, groups):
  assert layers.num_groups(channels) == groups


def test_timestep_embedding_matches_numpy():
  t = np.array([0, 1, 17, 999], np.float32)
  dim, half = 10, 5
  freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
  ref = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
  _close(layers.timestep_embedding(jnp.asarray(t), dim), ref, 1e-4)
  odd = layers.timestep_embedding(jnp.asarray(t), 11)
  assert odd.shape == (4, 11) and np.all(np.asarray(odd[:, -1]) == 0)


def _conv_ref(x, kernel, bias):
  """'SAME' 3x3 (or 1x1) convolution in numpy (cross-correlation, as XLA)."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  kh = kernel.shape[0]
  p = kh // 2
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
  for i in range(kh):
    for j in range(kh):
      out += np.einsum('bhwc,cd->bhwd', xp[:, i:i + x.shape[1], j:j + x.shape[2]], kernel[i, j])
  return out + np.asarray(bias)


def _gn_ref(x, groups, scale, bias, eps=1e-5):
  b, h, w, c = x.shape
  g = np.asarray(x, np.float64).reshape(b, h, w, groups, c // groups)
  g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + eps)
  return g.reshape(b, h, w, c) * np.asarray(scale) + np.asarray(bias)


def _silu(x):
  return x / (1 + np.exp(-x))


def test_resblock_matches_numpy_film_reference():
  """GN-SiLU-conv, GN * (1 + scale) + shift with [scale, shift] = Dense(SiLU(emb)), SiLU-conv, 1x1 skip."""
  block = layers.ResBlock(6)
  x, emb = _x(2, (B, 4, 4, 4)), _x(3, (B, 5))
  p = _init(block, x, emb)
  out = jax.jit(lambda p, x, e: block.apply({'params': p}, x, e))(p, x, emb)
  n = jax.tree.map(np.asarray, p)
  h = _conv_ref(_silu(_gn_ref(x, 4, n['norm1']['scale'], n['norm1']['bias'])), **n['conv1'])
  h = _gn_ref(h, 6, n['norm2']['scale'], n['norm2']['bias'])
  ss = _silu(np.asarray(emb, np.float64)) @ n['emb_proj']['kernel'] + n['emb_proj']['bias']
  h = h * (1 + ss[:, None, None, :6]) + ss[:, None, None, 6:]
  h = _conv_ref(_silu(h), **n['conv2'])
  skip = _conv_ref(x, **n['skip'])
  _close(out, skip + h, 1e-4)


def _mha_ref(p, q_in, kv_in):
  q = np.einsum('btc,chd->bthd', q_in, p['query']['kernel']) + p['query']['bias']
  k = np.einsum('btc,chd->bthd', kv_in, p['key']['kernel']) + p['key']['bias']
  v = np.einsum('btc,chd->bthd', kv_in, p['value']['kernel']) + p['value']['bias']
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd,hdc->bqc', w, v, p['out']['kernel']) + p['out']['bias']


def test_attention_block_matches_numpy_reference():
  block = layers.AttentionBlock(num_heads=2)
  x, ctx = _x(4, (B, 2, 2, 4)), _x(5, (B, 3, 6))
  p = _init(block, x, ctx)
  apply = jax.jit(lambda p, x, c: block.apply({'params': p}, x, c))
  n = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  tok = np.asarray(x, np.float64).reshape(B, 4, 4)
  gn = _gn_ref(x, 4, n['norm']['scale'], n['norm']['bias']).reshape(B, 4, 4)
  tok = tok + _mha_ref(n['self_attn'], gn, gn)
  ln = (tok - tok.mean(-1, keepdims=True)) / np.sqrt(tok.var(-1, keepdims=True) + 1e-6)
  ln = ln * n['cross_norm']['scale'] + n['cross_norm']['bias']
  tok = tok + _mha_ref(n['cross_attn'], ln, np.asarray(ctx, np.float64))
  _close(apply(p, x, ctx), tok.reshape(B, 2, 2, 4), 1e-4)
  _close(apply(p, x, ctx[:, ::-1]), apply(p, x, ctx), 1e-5)  # cross-attention: a set operation over tokens


def test_zero_init_conv_and_real_initialisers():
  """The zero-init option really zeroes the kernel; the real init of the CondUNet output conv is zero."""
  v = layers.conv3x3(4, jnp.float32, 'c', zero_init=True).init(KEY, jnp.zeros((1, 4, 4, 2)))
  assert np.all(np.asarray(v['params']['kernel']) == 0)
  model = _cond_unet('both', zero_init_output=True)
  args = (_x(), T, _x(9, (B, 4)))
  # Only conv_out's initialiser survives dead-code elimination, so this compiles in a fraction of a second.
  out = jax.jit(lambda k: model.init(k, *args)['params']['conv_out'])(KEY)
  assert np.all(np.asarray(out['kernel']) == 0) and np.all(np.asarray(out['bias']) == 0)
  conv_in = jax.jit(lambda k: model.init(k, *args)['params']['conv_in']['kernel'])(KEY)
  assert np.asarray(conv_in).std() > 0


# ---------------------------------------------------------------------------------------------- FFD-VAE


@pytest.fixture(scope='module')
def vae():
  model = FFDVAE(num_classes=K, out_channels=C, base_channels=8, levels=1, z_seg_channels=4, z_dom_dim=4)
  return model, _init(model, _x())


def test_ffd_vae_outputs_and_methods(vae):
  model, params = vae

  def run(p, x, rng):
    v = {'params': p}
    drawn = model.apply(v, x, rngs={'latent': rng})
    mean = model.apply(v, x, sample=False)
    seg_mean, _ = model.apply(v, x, method='encode_seg')
    dom_mean, _ = model.apply(v, x, method='encode_dom')
    parts = (model.apply(v, seg_mean, method='decode_seg'), model.apply(v, seg_mean, dom_mean,
                                                                         method='decode_image'))
    return drawn, mean, parts

  drawn, mean, (seg_logits, recon) = jax.jit(run)(params, _x(), jax.random.key(1))
  shapes = {'seg_logits': (B, H, H, K), 'recon': (B, H, H, C), 'seg_mean': (B, 4, 4, 4),
            'seg_logvar': (B, 4, 4, 4), 'z_seg': (B, 4, 4, 4), 'dom_mean': (B, 4), 'dom_logvar': (B, 4),
            'z_dom': (B, 4)}
  assert {k: v.shape for k, v in drawn.items()} == shapes
  assert all(v.dtype == jnp.float32 for v in drawn.values())
  assert not np.allclose(drawn['z_seg'], drawn['seg_mean']) and not np.allclose(drawn['z_dom'], drawn['dom_mean'])
  eps = (drawn['z_dom'] - drawn['dom_mean']) / jnp.exp(0.5 * drawn['dom_logvar'])  # reparameterisation noise
  assert 0.1 < float(jnp.std(eps)) < 10
  _close(mean['z_seg'], mean['seg_mean'], 0)
  _close(mean['z_dom'], mean['dom_mean'], 0)
  _close(seg_logits, mean['seg_logits'])
  _close(recon, mean['recon'])
  assert set(params) == {'seg_encoder', 'dom_encoder', 'seg_decoder', 'image_decoder'}


def test_ffd_vae_z_dom_drives_recon_not_segmentation(vae):
  model, params = vae

  def run(p, x, z_seg, z_a, z_b):
    recon = lambda z: model.apply({'params': p}, z_seg, z, method='decode_image')
    seg_grads = jax.grad(lambda q: model.apply({'params': q}, x, sample=False)['seg_logits'].sum())(p)
    return recon(z_a), recon(z_b), seg_grads

  recon_a, recon_b, grads = jax.jit(run)(params, _x(), _x(6, (B, 4, 4, 4)), _x(7, (B, 4)), _x(8, (B, 4)))
  assert np.abs(np.asarray(recon_a - recon_b)).mean() > 1e-3
  # Segmentation: no gradient reaches the domain encoder or the image decoder, by construction.
  for branch in ('dom_encoder', 'image_decoder'):
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads[branch]))
  assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads['seg_encoder']))


def test_ffd_vae_bad_sizes():
  with pytest.raises(ValueError, match='levels'):
    FFDVAE(num_classes=2, out_channels=1, levels=0)
  model = FFDVAE(num_classes=2, out_channels=1, base_channels=8, levels=2)
  with pytest.raises(ValueError, match='divisible'):
    jax.eval_shape(lambda: model.init({'params': KEY, 'latent': KEY}, jnp.zeros((1, 6, 6, 1))))


def test_ffd_vae_bf16_forward(vae):
  model, params = vae
  bf = model.clone(dtype=jnp.bfloat16)
  out, ref = jax.jit(lambda p, x: (bf.apply({'params': p}, x, sample=False),
                                   model.apply({'params': p}, x, sample=False)))(params, _x())
  assert out['recon'].dtype == jnp.float32 and out['seg_logits'].dtype == jnp.float32  # documented: f32 out
  scale = np.abs(np.asarray(ref['recon'])).mean()
  assert np.abs(np.asarray(out['recon'] - ref['recon'])).mean() < 0.05 * scale


# ---------------------------------------------------------------------------------------------- SegUNet


def test_seg_unet_shapes_and_names():
  model = SegUNet(num_classes=K, base_channels=8, levels=2)
  params = _init(model, _x())
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, _x())
  assert logits.shape == (B, H, H, K) and logits.dtype == jnp.float32
  assert set(params) == {'conv_in', 'down_0_res', 'down_0_downsample', 'down_1_res', 'down_1_downsample',
                         'mid_res_0', 'mid_res_1', 'up_1_upsample', 'up_1_res', 'up_0_upsample', 'up_0_res',
                         'norm_out', 'conv_out'}
  with pytest.raises(ValueError, match='levels'):
    jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 6, 6, C))))


# ---------------------------------------------------------------------------------------------- CondUNet

T = jnp.array([3, 250])


def _cond_unet(mode, zero_init_output=False, dtype=jnp.float32):
  return CondUNet(out_channels=C, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                  num_heads=2, cond_dim=4, cond_mode=mode, num_cond_tokens=2, zero_init_output=zero_init_output,
                  dtype=dtype)


@pytest.fixture(scope='module')
def unets():
  """mode -> (model, params, jitted apply); the jitted apply is shared so equal shapes compile once."""
  out = {}
  for mode in ('cross_attention', 'film', 'both'):
    model = _cond_unet(mode)
    apply = jax.jit(lambda p, x, t, z, d, m=model: m.apply({'params': p}, x, t, z, d))
    out[mode] = (model, _init(model, _x(), T, _x(9, (B, 4))), apply)
  return out


def _condition_cases(params):
  """Five stacked cases of B rows: z_a, z_b, z_a with row 0 dropped, z_b with row 0 dropped, null_cond."""
  z_a, z_b = _x(10, (B, 4)), _x(11, (B, 4))
  null = jnp.broadcast_to(params['null_cond'], (B, 4))
  no, drop = jnp.array([False, False]), jnp.array([True, False])
  cases = [(z_a, no), (z_b, no), (z_a, drop), (z_b, drop), (null, no)]
  return (jnp.tile(_x(), (5, 1, 1, 1)), jnp.tile(T, 5), jnp.concatenate([c[0] for c in cases]),
          jnp.concatenate([c[1] for c in cases]))


def test_cond_unet_param_names(unets):
  common = {'conv_in', 'conv_out', 'norm_out', 'null_cond', 'time_dense_0', 'time_dense_1', 'down_0_res_0',
            'down_0_downsample', 'down_1_res_0', 'down_1_attn_0', 'mid_res_0', 'mid_attn', 'mid_res_1',
            'up_1_res_0', 'up_1_attn_0', 'up_1_res_1', 'up_1_attn_1', 'up_1_upsample', 'up_0_res_0',
            'up_0_res_1'}
  film = {'cond_film_0', 'cond_film_1'}
  tokens = {'cond_tokens_0', 'cond_tokens_1', 'cond_tokens_norm'}
  assert set(unets['film'][1]) == common | film
  assert set(unets['cross_attention'][1]) == common | tokens
  assert set(unets['both'][1]) == common | film | tokens
  assert 'cross_attn' not in unets['film'][1]['mid_attn']  # film: no context tokens to attend
  assert 'cross_attn' in unets['both'][1]['mid_attn']
  assert unets['both'][1]['null_cond'].shape == (4,)
  assert set(unets['both'][1]['down_0_res_0']) == {'norm1', 'conv1', 'norm2', 'emb_proj', 'conv2'}


@pytest.mark.parametrize('mode', ['cross_attention', 'film', 'both'])
def test_cond_unet_conditioning(unets, mode):
  """One batched, jitted call (rows are independent) covers every conditioning case."""
  model, params, apply = unets[mode]
  eps = apply(params, *_condition_cases(params))
  assert eps.shape == (5 * B, H, H, C) and eps.dtype == jnp.float32
  eps_a, eps_b, d_a, d_b, eps_null = np.split(np.asarray(eps), 5)
  assert np.abs(eps_a - eps_b).max() > 1e-3  # z_dom matters in every mode
  _close(d_a[0], d_b[0], 1e-6)  # a dropped row ignores z_dom ...
  _close(d_a[0], eps_null[0], 1e-5)  # ... and is the null-condition output
  _close(d_a[1], eps_a[1], 1e-5)  # kept rows are untouched


def test_cond_unet_bf16_and_scalar_t(unets):
  model, params, apply = unets['both']
  x, t, z, d = _condition_cases(params)
  ref = apply(params, x, t, z, d)  # same shapes as test_cond_unet_conditioning: compiled already
  bf = _cond_unet('both', dtype=jnp.bfloat16)
  out = jax.jit(lambda p: bf.apply({'params': p}, x, t, z, d))(params)
  assert out.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(out)))  # documented: f32 out
  assert np.abs(np.asarray(out - ref)).mean() < 0.05 * np.abs(np.asarray(ref)).mean()
  scalar_t = apply(params, x, jnp.float32(3.0), z, d)  # a scalar t broadcasts over the batch
  _close(scalar_t[0::2], ref[0::2], 1e-5)  # even rows have t = 3
  assert not np.allclose(scalar_t[1::2], ref[1::2], atol=1e-3)


@pytest.mark.parametrize('kwargs,match', [
    ({'cond_mode': 'concat'}, 'cond_mode'),
    ({'attention_levels': (3,)}, 'attention_levels'),
    ({'num_heads': 3}, 'num_heads'),
])
def test_cond_unet_config_errors(kwargs, match):
  base = {'out_channels': 4, 'base_channels': 8, 'channel_mult': (1, 2), 'attention_levels': (1,), 'num_heads': 2}
  with pytest.raises(ValueError, match=match):
    CondUNet(**{**base, **kwargs})


def test_cond_unet_rejects_bad_inputs(unets):
  model, params, _ = unets['film']
  with pytest.raises(ValueError, match='z_dom'):
    jax.eval_shape(lambda: model.apply({'params': params}, _x(), T, jnp.zeros((B, 5))))
  with pytest.raises(ValueError, match='channel_mult'):
    jax.eval_shape(lambda: model.apply({'params': params}, _x(shape=(B, 5, 5, C)), T, jnp.zeros((B, 4))))


# ---------------------------------------------------------------------------------------------- KL AE + codec


@pytest.fixture(scope='module')
def kl_ae():
  model = KLAutoencoder(in_channels=C, latent_channels=2, base_channels=8, downsample=2)
  return model, _init(model, _x())


def test_kl_autoencoder_shapes(kl_ae):
  model, params = kl_ae
  out = jax.eval_shape(lambda: model.apply({'params': params}, _x(), rngs={'latent': KEY}))
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
      'recon': ((B, H, H, C), jnp.float32), 'mean': ((B, 4, 4, 2), jnp.float32),
      'logvar': ((B, 4, 4, 2), jnp.float32), 'z': ((B, 4, 4, 2), jnp.float32)}
  four = KLAutoencoder(in_channels=1, latent_channels=3, base_channels=8, downsample=8)
  v = jax.eval_shape(lambda: four.init({'params': KEY, 'latent': KEY}, jnp.zeros((1, 16, 16, 1))))
  mean = jax.eval_shape(lambda v: four.apply(v, jnp.zeros((1, 16, 16, 1)), method='encode'), v)[0]
  assert mean.shape == (1, 2, 2, 3) and set(v['params']) == {'encoder', 'moments', 'decoder'}
  with pytest.raises(ValueError, match='downsample'):
    jax.eval_shape(lambda v: four.apply(v, jnp.zeros((1, 12, 12, 1)), method='encode'), v)


@pytest.mark.parametrize('f', [1, 3, 6, 0])
def test_kl_autoencoder_bad_downsample(f):
  with pytest.raises(ValueError, match='downsample'):
    KLAutoencoder(in_channels=1, downsample=f)


def test_identity_codec_and_scaling_factor():
  codec = latent.identity_codec(C, 2.0)
  x = _x()
  _close(codec.encode(x), 2.0 * x, 0)
  _close(codec.decode(codec.encode(x)), x, 1e-6)
  assert codec.latent_shape(32) == (32, 32, C)
  z = np.asarray(latent.with_scaling_factor(codec, 1.0).encode(x))
  assert math.isclose(latent.scaling_factor_for(z), 1.0 / np.std(np.asarray(x, np.float64)), rel_tol=1e-5)
  with pytest.raises(ValueError, match='channel'):
    codec.encode(jnp.zeros((1, 8, 8, 1)))


def test_kl_codec_is_a_jittable_pytree(kl_ae):
  model, params = kl_ae
  codec = latent.kl_codec(model, params, 0.5)
  assert (codec.downsample, codec.latent_channels, codec.image_channels) == (2, 2, C)
  assert len(jax.tree.leaves(codec)) == len(jax.tree.leaves(params))  # params are the only leaves
  x = _x()

  def run(codec, x, rng):
    mean, logvar = model.apply({'params': codec.params}, x, method='encode')
    decoded = model.apply({'params': codec.params}, mean, method='decode')
    return codec.encode(x), codec.encode(x, rng), codec.decode(0.5 * mean), mean, logvar, decoded

  z, draw, dec, mean, logvar, decoded = jax.jit(run)(codec, x, KEY)
  _close(z, 0.5 * mean, 1e-6)
  _close(draw, 0.5 * (mean + jnp.exp(0.5 * logvar) * jax.random.normal(KEY, mean.shape)), 1e-5)
  _close(dec, decoded, 1e-5)
  assert latent.with_scaling_factor(codec, 2.0).scaling_factor == 2.0


def test_build_codec():
  cfg = ml_collections.ConfigDict({'kind': 'vq', 'scaling_factor': None, 'latent_channels': 2, 'base_channels': 8,
                                   'downsample': 2})
  with pytest.raises(ValueError, match='kind must be'):
    latent.build_codec(cfg, 3)
  cfg.kind = 'kl'
  with pytest.raises(ValueError, match="kind='kl'"):
    latent.build_codec(cfg, 3)
  codec = latent.build_codec(cfg, 3, params={'w': jnp.zeros(1)})
  assert (codec.kind, codec.downsample, codec.latent_channels, codec.scaling_factor) == ('kl', 2, 2, 1.0)
  cfg.kind, cfg.scaling_factor = 'identity', 0.5
  assert latent.build_codec(cfg, 3).scaling_factor == 0.5


@pytest.mark.parametrize('shape,groups', [((2, 8, 8, 16), 8), ((3, 5, 12), 4), ((2, 4, 4, 6), 6)])
def test_group_norm_matches_flax_and_numpy(shape, groups):
  """layers.GroupNorm (matmul statistics) == flax.linen.GroupNorm == a numpy reference; same params."""
  rng = np.random.default_rng(0)
  x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)  # non-zero mean: tests E[x^2] - E[x]^2
  c = shape[-1]
  params = {'params': {'scale': (1 + 0.1 * rng.standard_normal(c)).astype(np.float32),
                       'bias': (0.1 * rng.standard_normal(c)).astype(np.float32)}}
  ours = layers.GroupNorm(num_groups=groups)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, params)
  got = np.asarray(ours.apply(params, x))
  flax_out = np.asarray(nn.GroupNorm(num_groups=groups, epsilon=1e-5).apply(params, x))
  xg = x.reshape(shape[0], -1, groups, c // groups).astype(np.float64)
  mean = xg.mean(axis=(1, 3), keepdims=True)
  var = xg.var(axis=(1, 3), keepdims=True)
  ref = ((xg - mean) / np.sqrt(var + 1e-5)).reshape(shape) * params['params']['scale'] + params['params']['bias']
  np.testing.assert_allclose(got, ref, atol=2e-5)
  np.testing.assert_allclose(got, flax_out, atol=2e-5)
  g_ours = jax.grad(lambda x: jnp.sum(jnp.sin(ours.apply(params, x))))(x)
  g_flax = jax.grad(lambda x: jnp.sum(jnp.sin(nn.GroupNorm(num_groups=groups, epsilon=1e-5).apply(params, x))))(x)
  np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_flax), atol=1e-4)
  bf16 = layers.GroupNorm(num_groups=groups, dtype=jnp.bfloat16).apply(params, x)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), ref, atol=3e-2)
  with pytest.raises(ValueError):
    layers.GroupNorm(num_groups=5).init(jax.random.key(0), x)


def test_fused_attention_falls_back_to_xla_where_cudnn_refuses(monkeypatch, caplog):
  """On a GPU in bf16 cuDNN is asked for by name; where it refuses at trace time (here: no cuDNN at all, a CPU
  posing as a GPU) the result comes from XLA's einsums, equal to numpy's, and a warning says so."""
  rng = np.random.default_rng(1)
  q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((2, 6, 2, 8), (2, 5, 2, 8), (2, 5, 2, 8)))
  logits = np.einsum('btnh,bsnh->bnts', q.astype(np.float64), k) * 0.3
  p = np.exp(logits - logits.max(-1, keepdims=True))
  want = np.einsum('bnts,bsnh->btnh', p / p.sum(-1, keepdims=True), v)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  with caplog.at_level('WARNING', logger='diffuseg_jax'):
    got = layers.fused_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), scale=0.3)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-2, rtol=2e-2)
  assert "cuDNN's flash attention refused it" in caplog.text


@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_fused_attention_matches_numpy(dtype, tol):
  """layers.fused_attention against softmax(q k^T / sqrt(d)) v in float64 numpy."""
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((2, 6, 2, 8), (2, 5, 2, 8), (2, 5, 2, 8)))
  logits = np.einsum('btnh,bsnh->bnts', q.astype(np.float64), k) / np.sqrt(8)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum('bnts,bsnh->btnh', p, v)
  got = layers.fused_attention(*(jnp.asarray(a, dtype) for a in (q, k, v)))
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol, rtol=tol)
