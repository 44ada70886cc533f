"""Local diffusers Flax checkpoints behind NHWC wrappers: round trip through save_pretrained / the adapter.

Tiny models are built from small configs (their UNet GroupNorms are fixed at 32 groups, hence 32 channels),
saved to a temp dir and loaded back; outputs must equal the directly applied diffusers model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sd_fixtures import host_params

from diffuseg_jax.errors import UserError
from diffuseg_jax.models import diffusers_adapter as da
from diffuseg_jax.models import latent, layers

B, H = 2, 16  # latent 8x8x4: NCHW and NHWC latents are distinguishable by diffusers


def _x(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), jnp.float32)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  root = tmp_path_factory.mktemp('sd')
  vae = da.FlaxAutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 2,
                          up_block_types=('UpDecoderBlock2D',) * 2, block_out_channels=(8, 16), layers_per_block=1,
                          latent_channels=4, norm_num_groups=4, sample_size=H, scaling_factor=0.25)
  unet = da.FlaxUNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4,
                                  down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                                  up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), block_out_channels=(32, 32),
                                  layers_per_block=1, attention_head_dim=8, cross_attention_dim=8)
  vae_params, unet_params = host_params(vae), host_params(unet, 1)
  vae.save_pretrained(root / 'vae', params=vae_params)  # SD pipeline layout: <root>/vae, <root>/unet
  unet.save_pretrained(root / 'unet', params=unet_params)
  return root, vae, vae_params, unet, unet_params


def test_autoencoder_round_trip_nhwc(saved, capfd):
  root, vae, vae_params, _, _ = saved
  module, params = da.load_pretrained_autoencoder(root)  # resolves <root>/vae
  x = _x(0, (B, H, H, 3))

  def run(params, x):
    mean, logvar = da.pretrained_ae_encode(module, params, x)
    direct = vae.apply({'params': vae_params}, jnp.transpose(x, (0, 3, 1, 2)), method='encode').latent_dist
    dec = da.pretrained_ae_decode(module, params, mean)
    direct_dec = vae.apply({'params': vae_params}, jnp.transpose(direct.mean, (0, 3, 1, 2)), method='decode')
    return mean, logvar, direct.mean, direct.logvar, dec, direct_dec.sample

  mean, logvar, d_mean, d_logvar, dec, d_dec = jax.jit(run)(params, x)
  assert mean.shape == (B, H // 2, H // 2, 4) and dec.shape == (B, H, H, 3)
  np.testing.assert_allclose(mean, d_mean, atol=1e-6)
  np.testing.assert_allclose(logvar, d_logvar, atol=1e-6)
  np.testing.assert_allclose(dec, np.transpose(d_dec, (0, 2, 3, 1)), atol=1e-6)
  # The codec on top: scaling factor from the saved config, downsample from the block count.
  codec = latent.pretrained_codec(root / 'vae')
  assert (codec.scaling_factor, codec.downsample, codec.latent_channels, codec.image_channels) == (0.25, 2, 4, 3)
  z = jax.jit(lambda c, x: c.encode(x))(codec, x)
  np.testing.assert_allclose(z, 0.25 * mean, atol=1e-6)
  with pytest.raises(ValueError, match='3-channel'):
    codec.encode(jnp.zeros((1, H, H, 1)))
  out = capfd.readouterr()
  assert 'deprecated' not in out.out + out.err  # the per-setup deprecation notice is silenced


def test_pretrained_cond_unet_matches_direct_call(saved, capfd):
  root, _, _, unet, unet_params = saved
  module, params = da.load_pretrained_unet(root)
  wrapper = da.PretrainedCondUNet(module, cond_dim=3, num_cond_tokens=2)
  variables = da.init_pretrained_cond_unet(wrapper, params, jax.random.key(0))
  assert set(variables['params']) == {'null_cond', 'cond_tokens_0', 'cond_tokens_1', 'cond_tokens_norm', 'unet'}
  # Rows 0-1: z_a, rows 2-3: z_b (same x and t); rows 0 and 2 dropped.
  x, t = jnp.tile(_x(1, (B, 4, 4, 4)), (2, 1, 1, 1)), jnp.array([5, 900, 5, 900])
  z = jnp.concatenate([_x(2, (B, 3)), _x(3, (B, 3))])
  drop = jnp.array([True, False, True, False])

  def run(v, x, t):
    tokens = wrapper.apply(v, z, drop, method='embed_condition')
    direct = unet.apply({'params': unet_params}, jnp.transpose(x, (0, 3, 1, 2)), t, tokens).sample
    return wrapper.apply(v, x, t, z, drop), tokens, jnp.transpose(direct, (0, 2, 3, 1))

  eps, tokens, direct = jax.jit(run)(variables, x, t)
  assert eps.shape == (2 * B, 4, 4, 4) and eps.dtype == jnp.float32 and tokens.shape == (2 * B, 2, 8)
  np.testing.assert_allclose(eps, direct, atol=1e-5)
  np.testing.assert_allclose(eps[0], eps[2], atol=1e-6)  # dropped rows: null condition, z_dom ignored
  assert np.abs(np.asarray(eps[1] - eps[3])).max() > 1e-4  # kept rows: z_dom matters
  with pytest.raises(ValueError, match='latent channels'):
    jax.eval_shape(lambda: wrapper.apply(variables, jnp.zeros((1, 4, 4, 3)), t[:1], z[:1]))
  out = capfd.readouterr()
  assert 'deprecated' not in out.out + out.err


def test_fused_attention_matches_diffusers_attention(saved, monkeypatch):
  """attention='fused' (the default) sends every attention layer through layers.fused_attention and gives
  diffusers' own result (its einsums, or its query-chunked loop) with the same weights."""
  root, _, _, _, _ = saved
  module, params = da.load_pretrained_unet(root)
  calls = []
  counted = lambda *a, **k: calls.append(a[0].shape) or layers.fused_attention(*a, **k)  # noqa: E731
  monkeypatch.setattr(da, 'fused_attention', counted)
  x, t, z = _x(1, (B, 4, 4, 4)), jnp.array([5, 900]), _x(2, (B, 3))
  out = {}
  for name, unet, attention in (('fused', module, 'fused'), ('einsum', module, 'diffusers'),
                                ('chunked', module.clone(use_memory_efficient_attention=True), 'diffusers')):
    wrapper = da.PretrainedCondUNet(unet, cond_dim=3, num_cond_tokens=2, attention=attention)
    variables = da.init_pretrained_cond_unet(wrapper, params, jax.random.key(0))
    out[name] = np.asarray(jax.jit(lambda v, w=wrapper: w.apply(v, x, t, z))(variables))
  assert calls and all(len(shape) == 4 for shape in calls)  # [B, T, heads, head width]
  np.testing.assert_allclose(out['fused'], out['einsum'], atol=2e-5)
  np.testing.assert_allclose(out['fused'], out['chunked'], atol=2e-5)
  with pytest.raises(ValueError, match='attention='):
    bad = da.PretrainedCondUNet(module, cond_dim=3, num_cond_tokens=2, attention='flash')
    jax.eval_shape(lambda: bad.init(jax.random.key(0), x, t, z))


def test_bad_paths_raise_user_error(tmp_path, saved):
  with pytest.raises(UserError, match='autoencoder.path.*not found'):
    da.load_pretrained_autoencoder(tmp_path / 'missing')
  with pytest.raises(UserError, match='no config.json'):
    da.load_pretrained_unet(tmp_path)
  with pytest.raises(UserError, match='autoencoder.path is not set'):
    da.load_pretrained_autoencoder(None)
  (tmp_path / 'config.json').write_text('{"_class_name": "FlaxAutoencoderKL"}')
  with pytest.raises(UserError, match='diffusion_flax_model.msgpack'):
    da.load_pretrained_autoencoder(tmp_path)
  (tmp_path / 'diffusion_flax_model.msgpack').write_bytes(b'not msgpack')
  with pytest.raises(UserError, match=str(tmp_path)):
    da.load_pretrained_autoencoder(tmp_path)
  # The UNet weights do not fit an autoencoder.
  root = saved[0]
  with pytest.raises(UserError, match='autoencoder.path'):
    da.load_pretrained_autoencoder(root / 'unet')
