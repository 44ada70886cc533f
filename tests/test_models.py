"""Networks: shapes/dtypes, factorisation properties, conditioning, stable parameter names, latent codec.

All models are tiny (8x8 images, 8 base channels) and each is initialised once per module (CPU compile of
parameter initialisers dominates the runtime).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from diffuseg_jax.errors import ConfigError
from diffuseg_jax.models import latent, layers
from diffuseg_jax.models.autoencoder import KLAutoencoder
from diffuseg_jax.models.cond_unet import CondUNet
from diffuseg_jax.models.ffd_vae import FFDVAE
from diffuseg_jax.models.seg_unet import SegUNet

B, H, C, K = 2, 8, 3, 3
KEY = jax.random.key(0)


def _x(seed=1, shape=(B, H, H, C)):
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


def _init(model, *args, **kwargs):
  return jax.jit(lambda *a: model.init({'params': KEY, 'latent': KEY}, *a, **kwargs))(*args)


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


def test_resblock_film_is_one_plus_scale_and_shift():
  """With emb_proj = 0 the FiLM block equals the plain block; with bias (s, b): GN * (1 + s) + b."""
  block = layers.ResBlock(8)
  x, emb = _x(2, (B, 4, 4, 4)), _x(3, (B, 5))
  params = block.init(KEY, x, emb)['params']
  zero = jax.tree.map(jnp.zeros_like, params['emb_proj'])
  plain = {k: v for k, v in params.items() if k != 'emb_proj'}
  _close(block.apply({'params': {**params, 'emb_proj': zero}}, x, emb), block.apply({'params': plain}, x))
  # Scale -1 kills the normalised branch: h = 0 + shift, so the output is x_skip + conv2(silu(shift)).
  bias = jnp.concatenate([-jnp.ones(8), jnp.full(8, 0.5)])
  killed = block.apply({'params': {**params, 'emb_proj': {**zero, 'bias': bias}}}, x, emb)
  h = jax.nn.silu(jnp.full((B, 4, 4, 8), 0.5))
  conv2 = jax.lax.conv_general_dilated(h, params['conv2']['kernel'], (1, 1), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + params['conv2']['bias']
  skip = x @ params['skip']['kernel'][0, 0] + params['skip']['bias']
  _close(killed, skip + conv2, 1e-4)


def _mha_ref(p, q_in, kv_in, heads):
  q = np.einsum('btc,chd->bthd', q_in, p['query']['kernel']) + p['query']['bias']
  k = np.einsum('btc,chd->bthd', kv_in, p['key']['kernel']) + p['key']['bias']
  v = np.einsum('btc,chd->bthd', kv_in, p['value']['kernel']) + p['value']['bias']
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum('bhqk,bkhd->bqhd', w, v)
  return np.einsum('bqhd,hdc->bqc', o, p['out']['kernel']) + p['out']['bias']


def test_attention_block_matches_numpy_reference():
  block = layers.AttentionBlock(num_heads=2)
  x, ctx = _x(4, (B, 2, 2, 4)), _x(5, (B, 3, 6))
  params = jax.tree.map(np.asarray, block.init(KEY, x, ctx)['params'])
  xn = np.asarray(x, np.float64)
  mu = xn.reshape(B, 4, 4).mean(axis=(1, 2))  # 4 groups of 1 channel: per-channel over space
  gn = (xn - xn.mean(axis=(1, 2), keepdims=True)) / np.sqrt(xn.var(axis=(1, 2), keepdims=True) + 1e-5)
  del mu
  gn = gn * params['norm']['scale'] + params['norm']['bias']
  tok = xn.reshape(B, 4, 4)
  tok = tok + _mha_ref(params['self_attn'], gn.reshape(B, 4, 4), gn.reshape(B, 4, 4), 2)
  ln = (tok - tok.mean(-1, keepdims=True)) / np.sqrt(tok.var(-1, keepdims=True) + 1e-6)
  ln = ln * params['cross_norm']['scale'] + params['cross_norm']['bias']
  tok = tok + _mha_ref(params['cross_attn'], ln, np.asarray(ctx, np.float64), 2)
  _close(block.apply({'params': params}, x, ctx), tok.reshape(B, 2, 2, 4), 1e-4)
  # Cross-attention is a set operation over context tokens.
  _close(block.apply({'params': params}, x, ctx[:, ::-1]), block.apply({'params': params}, x, ctx), 1e-5)


# ---------------------------------------------------------------------------------------------- FFD-VAE


@pytest.fixture(scope='module')
def vae():
  model = FFDVAE(num_classes=K, out_channels=C, base_channels=8, levels=1, z_seg_channels=4, z_dom_dim=4)
  return model, _init(model, _x())['params']


def test_ffd_vae_shapes_and_sampling(vae):
  model, params = vae
  apply = jax.jit(lambda p, x, rng: model.apply({'params': p}, x, rngs={'latent': rng}))
  out = apply(params, _x(), jax.random.key(1))
  shapes = {'seg_logits': (B, H, H, K), 'recon': (B, H, H, C), 'seg_mean': (B, 4, 4, 4),
            'seg_logvar': (B, 4, 4, 4), 'z_seg': (B, 4, 4, 4), 'dom_mean': (B, 4), 'dom_logvar': (B, 4),
            'z_dom': (B, 4)}
  assert {k: v.shape for k, v in out.items()} == shapes
  assert all(v.dtype == jnp.float32 for v in out.values())
  assert not np.allclose(out['z_seg'], out['seg_mean'])  # a draw, not the mean
  again = apply(params, _x(), jax.random.key(1))
  _close(again['z_dom'], out['z_dom'], 0)
  mean = model.apply({'params': params}, _x(), sample=False)
  _close(mean['z_seg'], mean['seg_mean'], 0)
  _close(mean['z_dom'], mean['dom_mean'], 0)
  assert set(params) == {'seg_encoder', 'dom_encoder', 'seg_decoder', 'image_decoder'}


def test_ffd_vae_methods_compose_to_call(vae):
  model, params = vae
  v = {'params': params}
  out = model.apply(v, _x(), sample=False)
  seg_mean, _ = model.apply(v, _x(), method='encode_seg')
  dom_mean, _ = model.apply(v, _x(), method='encode_dom')
  _close(model.apply(v, seg_mean, method='decode_seg'), out['seg_logits'])
  _close(model.apply(v, seg_mean, dom_mean, method='decode_image'), out['recon'])


def test_ffd_vae_z_dom_drives_recon_not_segmentation(vae):
  model, params = vae
  v = {'params': params}
  z_seg = _x(6, (B, 4, 4, 4))
  recon_a = model.apply(v, z_seg, _x(7, (B, 4)), method='decode_image')
  recon_b = model.apply(v, z_seg, _x(8, (B, 4)), method='decode_image')
  assert np.abs(np.asarray(recon_a - recon_b)).mean() > 1e-3
  # Segmentation: no gradient reaches the domain encoder or the image decoder, by construction.
  grads = jax.grad(lambda p: model.apply({'params': p}, _x(), sample=False)['seg_logits'].sum())(params)
  for branch in ('dom_encoder', 'image_decoder'):
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads[branch]))
  assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads['seg_encoder']))


def test_ffd_vae_bad_sizes():
  with pytest.raises(ConfigError, match='vae.levels'):
    FFDVAE(num_classes=2, out_channels=1, levels=0)
  model = FFDVAE(num_classes=2, out_channels=1, base_channels=8, levels=2)
  with pytest.raises(ConfigError, match='divisible'):
    jax.eval_shape(lambda: model.init({'params': KEY, 'latent': KEY}, jnp.zeros((1, 6, 6, 1))))


def test_ffd_vae_bf16_forward(vae):
  model, params = vae
  bf = FFDVAE(num_classes=K, out_channels=C, base_channels=8, levels=1, z_seg_channels=4, z_dom_dim=4,
              dtype=jnp.bfloat16)
  out = jax.jit(lambda p, x: bf.apply({'params': p}, x, sample=False))(params, _x())
  ref = model.apply({'params': params}, _x(), sample=False)
  assert out['recon'].dtype == jnp.float32 and out['seg_logits'].dtype == jnp.float32
  scale = np.abs(np.asarray(ref['recon'])).mean()
  assert np.abs(np.asarray(out['recon'] - ref['recon'])).mean() < 0.05 * scale + 1e-3


# ---------------------------------------------------------------------------------------------- SegUNet


def test_seg_unet_shapes_and_names():
  model = SegUNet(num_classes=K, base_channels=8, levels=2)
  params = _init(model, _x())['params']
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, _x())
  assert logits.shape == (B, H, H, K) and logits.dtype == jnp.float32
  assert set(params) == {'conv_in', 'down_0_res', 'down_0_downsample', 'down_1_res', 'down_1_downsample',
                         'mid_res_0', 'mid_res_1', 'up_1_upsample', 'up_1_res', 'up_0_upsample', 'up_0_res',
                         'norm_out', 'conv_out'}
  with pytest.raises(ConfigError, match='segmentation.levels'):
    jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 6, 6, C))))


# ---------------------------------------------------------------------------------------------- CondUNet


def _cond_unet(mode, zero_init_output=False):
  return CondUNet(out_channels=C, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                  num_heads=2, cond_dim=4, cond_mode=mode, num_cond_tokens=2, zero_init_output=zero_init_output)


T = jnp.array([3, 250])


@pytest.fixture(scope='module')
def unets():
  out = {}
  for mode in ('cross_attention', 'film', 'both'):
    model = _cond_unet(mode)
    params = _init(model, _x(), T, _x(9, (B, 4)))['params']
    out[mode] = (model, params, jax.jit(lambda p, *a, m=model: m.apply({'params': p}, *a)))
  return out


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
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(unets['both'][1]))


@pytest.mark.parametrize('mode', ['cross_attention', 'film', 'both'])
def test_cond_unet_conditioning(unets, mode):
  model, params, apply = unets[mode]
  x, z_a, z_b = _x(), _x(10, (B, 4)), _x(11, (B, 4))
  eps_a = apply(params, x, T, z_a, None)
  assert eps_a.shape == (B, H, H, C) and eps_a.dtype == jnp.float32
  eps_b = apply(params, x, T, z_b, None)
  assert np.abs(np.asarray(eps_a - eps_b)).max() > 1e-4  # z_dom matters in every mode
  # Dropped rows: the output with the null condition, whatever z_dom was.
  drop = jnp.array([True, False])
  d_a, d_b = apply(params, x, T, z_a, drop), apply(params, x, T, z_b, drop)
  null = apply(params, x, T, jnp.broadcast_to(params['null_cond'], (B, 4)), None)
  _close(d_a[0], d_b[0], 1e-6)
  _close(d_a[0], null[0], 1e-5)
  _close(d_a[1], eps_a[1], 1e-5)
  # jit == eager; scalar t broadcasts.
  _close(model.apply({'params': params}, x, T, z_a), eps_a, 1e-4)
  _close(apply(params, x, jnp.float32(7.0), z_a, None), apply(params, x, jnp.array([7, 7]), z_a, None), 1e-5)


def test_cond_unet_zero_init_output_and_bf16():
  model = _cond_unet('both', zero_init_output=True)
  params = _init(model, _x(), T, _x(9, (B, 4)))['params']
  eps = jax.jit(lambda p: model.apply({'params': p}, _x(), T, _x(9, (B, 4))))(params)
  assert np.all(np.asarray(eps) == 0)  # untrained model predicts eps = 0 (documented choice)
  bf = CondUNet(**{**{f: getattr(model, f) for f in ('out_channels', 'base_channels', 'channel_mult',
                                                     'num_res_blocks', 'attention_levels', 'num_heads',
                                                     'cond_dim', 'cond_mode', 'num_cond_tokens')},
                   'zero_init_output': False, 'dtype': jnp.bfloat16})
  out = jax.jit(lambda p: bf.apply({'params': p}, _x(), T, _x(9, (B, 4))))(params)
  assert out.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize('kwargs,match', [
    ({'cond_mode': 'concat'}, 'diffusion.cond_mode'),
    ({'attention_levels': (3,)}, 'diffusion.attention_levels'),
    ({'num_heads': 3}, 'diffusion.num_heads'),
])
def test_cond_unet_config_errors(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    CondUNet(out_channels=4, base_channels=8, channel_mult=(1, 2), attention_levels=(1,), num_heads=2,
             **kwargs)


def test_cond_unet_rejects_wrong_z_dom_width(unets):
  model, params, _ = unets['film']
  with pytest.raises(ConfigError, match='vae.z_dom_dim'):
    model.apply({'params': params}, _x(), T, jnp.zeros((B, 5)))


# ---------------------------------------------------------------------------------------------- KL AE + codec


@pytest.fixture(scope='module')
def kl_ae():
  model = KLAutoencoder(in_channels=C, latent_channels=2, base_channels=8, downsample=2)
  return model, _init(model, _x())['params']


def test_kl_autoencoder_shapes(kl_ae):
  model, params = kl_ae
  out = jax.jit(lambda p, x, r: model.apply({'params': p}, x, rngs={'latent': r}))(params, _x(), KEY)
  assert {k: v.shape for k, v in out.items()} == {'recon': (B, H, H, C), 'mean': (B, 4, 4, 2),
                                                   'logvar': (B, 4, 4, 2), 'z': (B, 4, 4, 2)}
  assert not np.allclose(out['z'], out['mean'])
  four = KLAutoencoder(in_channels=1, latent_channels=3, base_channels=8, downsample=4)
  shapes = jax.eval_shape(lambda: four.init({'params': KEY, 'latent': KEY}, jnp.zeros((1, 16, 16, 1))))
  mean = jax.eval_shape(lambda v: four.apply(v, jnp.zeros((1, 16, 16, 1)), method='encode'), shapes)[0]
  assert mean.shape == (1, 4, 4, 3)


@pytest.mark.parametrize('f', [1, 3, 6, 0])
def test_kl_autoencoder_bad_downsample(f):
  with pytest.raises(ConfigError, match='autoencoder.downsample'):
    KLAutoencoder(in_channels=1, downsample=f)


def test_identity_codec_and_scaling_factor():
  codec = latent.identity_codec(C, 2.0)
  x = _x()
  _close(codec.encode(x), 2.0 * x, 0)
  _close(codec.decode(codec.encode(x)), x, 1e-6)
  assert codec.latent_shape(32) == (32, 32, C)
  assert math.isclose(latent.estimate_scaling_factor(codec, x), 1.0 / np.std(np.asarray(x)), rel_tol=1e-5)
  with pytest.raises(ConfigError, match='data.channels'):
    codec.encode(jnp.zeros((1, 8, 8, 1)))


def test_kl_codec_is_a_jittable_pytree(kl_ae):
  model, params = kl_ae
  codec = latent.kl_codec(model, params, 0.5)
  assert (codec.downsample, codec.latent_channels, codec.image_channels) == (2, 2, C)
  x = _x()
  mean, logvar = model.apply({'params': params}, x, method='encode')
  enc = jax.jit(lambda c, x: c.encode(x))
  _close(enc(codec, x), 0.5 * mean, 1e-5)
  _close(jax.jit(lambda c, z: c.decode(z))(codec, 0.5 * mean), model.apply({'params': params}, mean,
                                                                          method='decode'), 1e-4)
  draw = jax.jit(lambda c, x, r: c.encode(x, r))(codec, x, KEY)
  ref = 0.5 * (mean + jnp.exp(0.5 * logvar) * jax.random.normal(KEY, mean.shape))
  _close(draw, ref, 1e-5)
  # Params are leaves (traced, not baked in): doubled params change the output without a new codec type.
  leaves, treedef = jax.tree.flatten(codec)
  assert len(leaves) == len(jax.tree.leaves(params))
  assert latent.with_scaling_factor(codec, 2.0).scaling_factor == 2.0


def test_build_codec_errors():
  import ml_collections

  cfg = ml_collections.ConfigDict({'kind': 'vq', 'scaling_factor': None})
  with pytest.raises(ConfigError, match='autoencoder.kind'):
    latent.build_codec(cfg, 3)
  cfg.kind = 'kl'
  with pytest.raises(ConfigError, match="autoencoder.kind='kl'"):
    latent.build_codec(cfg, 3)
  cfg.kind = 'identity'
  assert latent.build_codec(cfg, 3).scaling_factor == 1.0
