"""Process settings chosen in code: XLA CPU flags are added, but a flag the user set is never overridden."""

from diffuseg_jax import runtime


def test_cpu_flags_added_to_empty_environment():
  env = {}
  runtime.set_xla_flags(env)
  assert env['XLA_FLAGS'].split() == list(runtime.CPU_XLA_FLAGS)


def test_user_flags_kept_and_user_value_wins():
  name = runtime.CPU_XLA_FLAGS[0].split('=')[0]
  env = {'XLA_FLAGS': f'--xla_force_host_platform_device_count=8 {name}=individual_convolution'}
  runtime.set_xla_flags(env)
  assert env['XLA_FLAGS'] == f'--xla_force_host_platform_device_count=8 {name}=individual_convolution'


def test_idempotent():
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  runtime.set_xla_flags(env)
  once = env['XLA_FLAGS']
  runtime.set_xla_flags(env)
  assert env['XLA_FLAGS'] == once and once.startswith('--xla_force_host_platform_device_count=2 ')


def test_opt_out_leaves_xla_flags_alone():
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'DIFFUSEG_CPU_XLA_FLAGS': '0'}
  runtime.set_xla_flags(env)
  assert env['XLA_FLAGS'] == '--xla_force_host_platform_device_count=8'


def test_compute_dtype_from_config():
  import jax.numpy as jnp
  import ml_collections
  import pytest

  from diffuseg_jax import config_validation
  from diffuseg_jax.errors import ConfigError
  from tests.fixtures import default_config

  cfg = ml_collections.ConfigDict({'train': {'compute_dtype': 'bfloat16'}})
  assert runtime.compute_dtype(cfg) == jnp.bfloat16
  full = default_config()
  assert runtime.compute_dtype(full) == jnp.float32  # the default
  full.train.compute_dtype = 'float16'
  with pytest.raises(ConfigError, match='compute_dtype'):
    config_validation.validate(full)


def test_stages_build_networks_in_the_configured_dtype():
  """train.compute_dtype reaches the networks the stages train (params stay float32)."""
  import jax
  import jax.numpy as jnp

  from diffuseg_jax.data import DataSpec
  from diffuseg_jax.stages import autoencoder, diffusion, segment, student, teacher
  from tests.fixtures import default_config

  for name, dtype in (('float32', jnp.float32), ('bfloat16', jnp.bfloat16)):
    cfg = default_config()
    cfg.train.compute_dtype = name
    cfg.autoencoder.kind = 'kl'
    spec = DataSpec(image_size=(16, 16), channels=3, num_classes=2)
    seg = segment.task(cfg, spec, 'transfer', 0)
    tasks = (teacher.task(cfg, spec), student.task(cfg, spec), autoencoder.task(cfg, spec), seg,
             diffusion.task(cfg, (16, 16, 3)))
    assert {t.model.dtype for t in tasks} == {dtype}
    params = jax.eval_shape(seg.init_params, jax.random.key(0))  # the dtypes init gives, without running it
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_per_network_compute_dtype_and_auto(monkeypatch):
  """A section's own compute_dtype wins over train.compute_dtype; 'auto' gives bfloat16 on a GPU only to the
  networks measured to gain (the FFD-VAE, a pretrained UNet) and float32 on a CPU; the run records it."""
  import jax.numpy as jnp
  import pytest

  from diffuseg_jax import config_validation
  from diffuseg_jax.errors import ConfigError
  from tests.fixtures import default_config

  cfg = default_config()
  cfg.segmentation.compute_dtype = 'bfloat16'
  assert runtime.compute_dtype(cfg, 'segmentation') == jnp.bfloat16
  assert runtime.compute_dtype(cfg, 'vae') == jnp.float32  # inherits train.compute_dtype
  cfg.train.compute_dtype = 'auto'
  assert {s: runtime.auto_dtype(cfg, s, 'gpu') for s in runtime.DTYPE_SECTIONS} == {
      'vae': 'bfloat16', 'autoencoder': 'float32', 'diffusion': 'float32', 'segmentation': 'float32'}
  assert {runtime.auto_dtype(cfg, s, 'cpu') for s in runtime.DTYPE_SECTIONS} == {'float32'}
  cfg.diffusion.pretrained_unet_path = '/sd/unet'
  assert runtime.auto_dtype(cfg, 'diffusion', 'gpu') == 'bfloat16'
  cfg.diffusion.pretrained_unet_path = None
  monkeypatch.setattr(runtime.jax, 'default_backend', lambda: 'gpu')
  runtime.resolve_compute_dtypes(cfg)
  assert (cfg.vae.compute_dtype, cfg.diffusion.compute_dtype, cfg.segmentation.compute_dtype) == (
      'bfloat16', 'float32', 'bfloat16')  # the segmentation's own value is kept
  config_validation.validate(cfg)
  cfg.vae.compute_dtype = 'float16'
  with pytest.raises(ConfigError, match='vae.compute_dtype'):
    config_validation.validate(cfg)
