"""Every config file in configs/: its variants load, validate, build their networks and are documented; the
published mnist_m presets are frozen."""

import re

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections.config_flags import config_flags

from diffuseg_jax import config_validation, stable_diffusion
from diffuseg_jax.config_files import CONFIG_DIR, load_config, load_config_module
from diffuseg_jax.models.autoencoder import build_kl_autoencoder
from diffuseg_jax.models.cond_unet import build_cond_unet
from diffuseg_jax.models.ffd_vae import build_ffd_vae
from diffuseg_jax.models.seg_unet import build_seg_unet
from diffuseg_jax.stages import STAGES

DATASET_CONFIGS = ('default', 'mnist_m', 'mscmr', 'acdc', 'mmwhs', 'iostar', 'folder')
VARIANTS = {**{name: ('quick', 'gpu', 'sd') for name in DATASET_CONFIGS}, 'test': ('kl', 'sd')}
CASES = [(name, variant) for name, variants in VARIANTS.items() for variant in (None, *variants)]


def test_every_config_file_is_covered():
  assert sorted(p.stem for p in CONFIG_DIR.glob('*.py')) == sorted(VARIANTS)


@pytest.fixture(scope='module')
def sd_folder(tmp_path_factory):
  from sd_fixtures import write_tiny_sd

  return write_tiny_sd(tmp_path_factory.mktemp('sd'), 'epsilon')[0]


@pytest.mark.parametrize('name,variant', CASES)
def test_variant_loads_and_validates(name, variant, sd_folder):
  c = load_config(name, variant)
  if c.data.name != 'mnist_m':
    c.data.root = '/data'  # validation requires a root for every dataset but the embedded one
  if variant == 'sd':
    c.sd_path = str(sd_folder)
    stable_diffusion.resolve(c)  # what pipeline.run does first
    assert (c.autoencoder.path, c.diffusion.pretrained_unet_path) == (str(sd_folder),) * 2
    assert (c.diffusion.schedule, c.diffusion.num_timesteps) == ('scaled_linear', 100)
  config_validation.validate(c)
  # The GPU-only sd variants of the datasets compute in bfloat16, the gpu variants choose per network (auto).
  expected = {'sd': 'bfloat16', 'gpu': 'auto'}.get(variant, 'float32') if name != 'test' else 'float32'
  assert c.train.compute_dtype == expected


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_base_variant_spellings(name):
  base = load_config(name).to_json()
  assert load_config(name, 'full').to_json() == base
  assert load_config(name, '').to_json() == base
  assert load_config(str(CONFIG_DIR / f'{name}.py')).to_json() == base


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_unknown_variant_names_the_choices(name):
  choices = ', '.join(['full', *VARIANTS[name]])
  message = f"unknown variant 'fast' of configs/{name}.py (choose from {choices})"
  with pytest.raises(ValueError, match=re.escape(message)):
    load_config(name, 'fast')


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_docstring_gives_the_command_of_every_variant(name):
  doc = load_config_module(name).__doc__
  assert f'--config=configs/{name}.py ' in doc
  for variant in VARIANTS[name]:
    assert f'--config=configs/{name}.py:{variant} ' in doc


@pytest.mark.parametrize('name', DATASET_CONFIGS)
def test_quick_and_gpu_sizes(name):
  base, quick, gpu = (load_config(name, v) for v in (None, 'quick', 'gpu'))
  assert quick.diffusion.steps < base.diffusion.steps < gpu.diffusion.steps
  assert quick.segmentation.steps < base.segmentation.steps < gpu.segmentation.steps
  assert len(quick.segmentation.seeds) == 1 and quick.sampling.num_masks is not None
  assert quick.data.image_size <= base.data.image_size == gpu.data.image_size
  if name != 'mnist_m':  # mnist_m's quick is frozen (below); the embedded data has no subjects
    assert quick.data.max_cases is not None and quick.data.max_cases <= 8
    assert quick.diffusion.base_channels <= base.diffusion.base_channels
  assert gpu.diffusion.steps >= 20000 and gpu.segmentation.steps >= 4000
  # gpu batches: 64 to 128, or what the data allows (RELEASED_SPLITS, test_batches_fit_the_released_data)
  assert min(64, base.diffusion.batch_size) <= gpu.diffusion.batch_size <= 128
  assert min(64, base.segmentation.batch_size) <= gpu.segmentation.batch_size <= 128
  for c in (base, gpu):
    for batch in (c.vae.batch_size, c.autoencoder.batch_size, c.diffusion.batch_size,
                  c.sampling.batch_size, c.segmentation.batch_size, c.eval.batch_size):
      assert batch % 8 == 0  # global batches split over 8 GPUs
  assert gpu.data.max_cases is None and gpu.sampling.num_masks == base.sampling.num_masks  # no caps


# The training split(s) each section's batches are drawn from (stages teacher + student, autoencoder, ...;
# segment: transfer on the source, self on the target).
BATCH_SPLITS = {'vae': ('source', 'target'), 'autoencoder': ('target',), 'diffusion': ('target',),
                'segmentation': ('source', 'target')}


@pytest.mark.parametrize('name,variant', [(n, v) for n in ('mscmr', 'acdc', 'mmwhs', 'iostar') for v in (None, 'gpu')])
def test_batches_fit_the_released_data(name, variant):
  """At the split sizes of the dataset as released (the config's RELEASED_SPLITS, as its docstring states
  them), no training batch is larger than a split it is drawn from: a batch never holds a row twice."""
  module, c = load_config_module(name), load_config(name, variant)
  sizes = module.RELEASED_SPLITS
  assert set(sizes) == {'source', 'target', 'val', 'test'}
  for section, splits in BATCH_SPLITS.items():
    assert c[section].batch_size <= min(sizes[s] for s in splits), (section, c[section].batch_size, sizes)
  for count in sizes.values():
    assert f'{count}' in module.__doc__  # the docstring states the sizes


@pytest.mark.parametrize('name,variant', [(n, v) for n in DATASET_CONFIGS for v in ('quick', 'gpu')])
def test_variant_networks_build(name, variant):
  """Every network of the variant initialises at its image/latent size (shapes only: jax.eval_shape)."""
  c = load_config(name, variant)
  size, channels, classes = c.data.image_size, c.data.channels or 3, 8
  key = jax.random.key(0)
  image = jnp.zeros((1, size, size, channels))
  vae = build_ffd_vae(c.vae, num_classes=classes, channels=channels)
  jax.eval_shape(lambda: vae.init(key, image, sample=False))
  jax.eval_shape(lambda: build_seg_unet(c.segmentation, classes).init(key, image))
  if c.autoencoder.kind == 'kl':
    ae = build_kl_autoencoder(c.autoencoder, channels)
    jax.eval_shape(lambda: ae.init(key, image, sample=False))
    f, latent_channels = c.autoencoder.downsample, c.autoencoder.latent_channels
  else:
    f, latent_channels = 1, channels
  unet = build_cond_unet(c.diffusion, channels=latent_channels, cond_dim=c.vae.z_dom_dim)
  latent = jnp.zeros((1, size // f, size // f, latent_channels))
  jax.eval_shape(lambda: unet.init(key, latent, jnp.zeros((1,), jnp.int32), jnp.zeros((1, unet.cond_dim)),
                                   jnp.zeros((1,), bool)))


def test_mnist_m_presets_are_frozen():
  """The README's published numbers come from these presets: change them only with new numbers."""
  full, quick = load_config('mnist_m'), load_config('mnist_m', 'quick')
  assert (full.diffusion.steps, full.diffusion.batch_size, full.segmentation.steps) == (1200, 32, 200)
  assert (full.vae.teacher_steps, full.sampling.num_steps, full.sampling.blend_until) == (500, 25, 0.5)
  # The denoiser sees the label map and the region is redrawn from the middle step on (benchmarks/QUALITY.md).
  assert full.diffusion.mask_condition == quick.diffusion.mask_condition == 'pseudo_labels'
  assert quick.sampling.blend_until == 0.5
  assert full.segmentation.seeds == (0, 1, 2) and full.segmentation.strategies == 'transfer,self,diffuseg,diffuseg_st'
  assert (quick.diffusion.steps, quick.diffusion.batch_size, quick.segmentation.steps) == (300, 16, 120)
  assert (quick.sampling.num_masks, quick.sampling.num_steps, quick.vae.teacher_steps) == (256, 20, 120)
  assert quick.segmentation.seeds == (0,) and quick.data.num_source == 1000
  assert full.vae.augment_source_intensity and quick.vae.augment_source_intensity  # the teacher on intensity curves
  assert full.vae.select == quick.vae.select == 'val'  # teacher and student chosen on validation where it exists
  assert full.vae.source_intensity_curves == quick.vae.source_intensity_curves == 'per_class'  # no class order kept


def test_default_stages_are_the_pipeline_stages():
  assert load_config('default').stages == ','.join(STAGES)


def test_name_variant_string_and_errors():
  assert load_config('mscmr:quick').to_json() == load_config('mscmr', 'quick').to_json()
  assert load_config(f'{CONFIG_DIR}/mscmr.py:gpu').to_json() == load_config('mscmr', 'gpu').to_json()
  with pytest.raises(ValueError, match='variant given twice'):
    load_config('mscmr:quick', 'gpu')


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')  # inside ml_collections
@pytest.mark.parametrize('variant', ['quick', 'gpu'])
def test_command_line_variant_is_load_config(variant):
  """`--config=configs/acdc.py:VARIANT` (ml_collections config_flags) gives what load_config gives."""
  argv = ['main', f'--config={CONFIG_DIR / "acdc.py"}:{variant}']
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  assert flag_values.config.to_json() == load_config('acdc', variant).to_json()
