"""The blended DDIM sampler with a Stable-Diffusion-1.x-sized UNet on one accelerator: images/s, fraction of the
bf16 matmul ceiling, compile time of the whole scan against one step, and the synthesize stage against its bare
program.

  python -m benchmarks.sd_sampler                        # SD-1.x UNet, 64x64x4 latents, bf16, batch 16/64/256
  python -m benchmarks.sd_sampler --batches=64,256,16 --json=OUT/sd_bf16.json   # what benchmarks/gpu.sh runs
  python -m benchmarks.sd_sampler --quick                # tiny UNet and VAE, 8x8x4 latents: seconds on a CPU

The network is the project's conditioned diffusers UNet (`diffusers_adapter.PretrainedCondUNet`: z_dom projected
to 4 cross-attention tokens) around a FlaxUNet2DConditionModel of SD-1.x size (320/640/1280/1280 channels,
2 layers per block, 8 heads, cross-attention width 768; 862M parameters with the projection) with random
weights, drawn on the device in one compiled program (no host copy). Params stay float32 and the UNet computes in
--dtype, as the pipeline does with train.compute_dtype (the `:sd` variant: bfloat16). Sampler settings (50 steps,
eta 0, guidance 1, hard blending to the last step) are the `configs/default.py:sd` variant's; the schedule is
SD-1.x's (scaled_linear 0.00085-0.012, T = 1000, epsilon prediction).

Parts, each guarded (an error, e.g. out of device memory, is recorded in its row and the run goes on) and the
JSON rewritten after each, so a run killed by its time limit keeps what it had measured:
  ceiling  best-of-10 [n, n] @ [n, n] GFLOP/s in bfloat16 and float32 (n = 8192 on GPU), bf16 again at the end;
  step     AOT lower + compile of ONE jitted sampler step (`LoopSampler.step`) at the first batch, before any
           other UNet program, so its autotuning is cold;
  batch B  AOT lower + compile of the whole `lax.scan` sampler (latents in, latents out); one warm-up call, then
           up to --repeats timed calls that fit in --budget-s seconds (none when the warm-up alone exceeds it:
           then the warm-up is the timing, `timed_runs=0`); images/s = their median. GFLOP per image = XLA's cost
           analysis of the lowered step (with the einsum attention: see below) x steps / B; TFLOP/s and its
           fraction of the bf16 ceiling; XLA's temp memory of the program; the process-wide device peak.
           XLA reuses autotuning results across programs of the same shapes, so the scan at the first batch
           compiles warm (`autotune_warm`); the summary's scan_compile_s is the first cold one.
  stage    at --stage-batch (default 64), right after that batch's row: the real `synthesis.synthesize` (the
           region image encoded by an SD-sized VAE of random weights, the scan, 64x64x4 decoded to 512x512x3)
           jitted as the stage does, then --stage-batches batches through the stage's own loop
           (`synthesize.dispatch_in_order`): batch i+1 rendered on a thread (`render_regions`, per-class
           appearance; `prefetch`) and dispatched before batch i is copied back, one shard per batch written
           (PNG + npz, `synthetic_io.write_shard`) by the BackgroundWriter into a temporary folder. stage
           images/s = images after the first batch / time from the first batch's end to the last copy back
           (`sampling_images_per_second`); `stage_img_s_with_last_write` also waits for the last shard's files
           (the stage's `stage_images_per_second`), which a run of many shards pays once. stage_vs_sampler =
           stage images/s / `bare_sampler_rate` (one more call of the compiled synthesize program alone);
           stage_vs_scan = stage images/s / the batch row's scan-only images/s (encode, decode and host work).
  attention_check  `layers.fused_attention` at each of the UNet's attention shapes: the kernel the backend took
           (cudnn or xla) and the largest difference from XLA's einsums in float32.
Attention (--attention): `fused` (what the pipeline runs: `PretrainedCondUNet(attention='fused')`, cuDNN's flash
attention on a GPU in bfloat16), `default` (diffusers' einsums, which materialise the [B * heads, tokens, tokens]
scores and probabilities: 2 x 64 GiB in bf16 at batch 256 and 64x64 latents, more than the ~126 GiB JAX gets of an
H200 at a memory fraction of 0.9) or `memory_efficient` (diffusers' loop over 64 query chunks per layer). `auto`
(default) = fused, unless fused would be XLA's einsums (no GPU) and their tensors would take over half the
device's memory: then memory_efficient. FLOPs are always counted on the einsum step: XLA counts a loop body once
and does not count a cuDNN custom call. Where XLA gives no count (jax 0.11.2 on an H200 gave none), --step-gflop
supplies it; `--count-flops` prints it on any CPU (SD-1.x UNet, 64x64x4:
781.7 GFLOP per image per step, 39.1 TFLOP per 50-step image; benchmarks/gpu.sh passes it).

Measured on one H200 (benchmarks/RESULTS.md, 2026-12-04), bf16 ceiling 659-715 TFLOP/s: fused attention 10.6
img/s at batch 256 (58 % of the ceiling) and 10.3 at 64; diffusers' einsums 6.4 at 64, its memory-efficient loop
4.7 at 256; scan compile 14-27 s, one step's 22-24 s (cold autotuning); the stage at batch 64 0.996 of its program.
A run of gpu.sh's part (--batches=64,256,16, stage 4 batches) took 386 s with the process start.
The last printed line is `sd_sampler: img_s_b256=... frac_bf16_b256=... stage_vs_sampler=... scan_compile_s=...
step_compile_s=...` (the batch of the first two is --summary-batch: 256, or with --quick the largest batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import tempfile
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks import sampler as sampler_bench
from diffuseg_jax import atomic
from diffuseg_jax.config_files import load_config
from diffuseg_jax.models import diffusers_adapter as da
from diffuseg_jax.models import latent
from diffuseg_jax.sampling import prediction, sampler, schedules, synthesis

# Stable Diffusion 1.x sizes (the unet/ and vae/ configs of its checkpoints; their scheduler: scaled_linear).
SD_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
               layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
               down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
               up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3)
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 4,
              up_block_types=('UpDecoderBlock2D',) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD_LATENT = (64, 64, 4)
# --quick: the tests' tiny SD layout (tests/sd_fixtures.py; diffusers fixes the UNet's GroupNorms at 32 groups).
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
                 attention_head_dim=8, cross_attention_dim=8, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                 up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'))
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 2,
                up_block_types=('UpDecoderBlock2D',) * 2, block_out_channels=(8, 16), layers_per_block=1,
                latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.25)
TINY_LATENT = (8, 8, 4)
SD_SCHEDULE = dict(name='scaled_linear', num_timesteps=1000, beta_start=0.00085, beta_end=0.012)
NUM_CLASSES = 4  # label maps of the stage part: background + 3 classes
ATTENTION = ('auto', 'fused', 'default', 'memory_efficient')


@dataclasses.dataclass
class Setup:
  """The UNet (and its variant with memory-efficient attention), its params on the device, sampler settings."""

  unet: Any  # FlaxUNet2DConditionModel
  cond_dim: int
  num_cond_tokens: int
  dtype: Any
  params: Any
  latent: tuple[int, int, int]
  settings: sampler.SamplerSettings
  alphas: np.ndarray  # float32 [T]
  quick: bool
  step_gflop: float | None = None  # --step-gflop: the count to use where XLA's cost analysis gives none

  def model(self, attention: str) -> da.PretrainedCondUNet:
    """attention: fused (the pipeline's: `layers.fused_attention`), default (diffusers' einsums) or
    memory_efficient (diffusers' query-chunked loop)."""
    unet = self.unet.clone(use_memory_efficient_attention=attention == 'memory_efficient')
    return da.PretrainedCondUNet(unet, cond_dim=self.cond_dim, num_cond_tokens=self.num_cond_tokens,
                                 dtype=self.dtype, attention='fused' if attention == 'fused' else 'diffusers')


def device_params(init_weights, seed: int = 0):
  """Random float32 params with the tree of `init_weights(key)`, drawn on the default device in one program:
  kernels N(0, 1/fan_in), norm scales 1, biases and the rest N(0, 0.05^2).

  One normal draw for all leaves, sliced: a small program (one generator, ~700 slices) instead of a generator
  per leaf as the modules' own init has, and the SD UNet's 3.4 GB never exist on the host.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(jax.eval_shape(init_weights, jax.random.key(0)))

  def draw(key):
    flat = jax.random.normal(key, (sum(leaf.size for _, leaf in leaves),), jnp.float32)
    out, offset = [], 0
    for path, leaf in leaves:
      name = str(getattr(path[-1], 'key', path[-1]))
      if name == 'scale':
        out.append(jnp.ones(leaf.shape, jnp.float32))
      else:
        std = 1 / math.sqrt(max(1, math.prod(leaf.shape[:-1]))) if name == 'kernel' else 0.05
        out.append((flat[offset:offset + leaf.size] * std).reshape(leaf.shape))
      offset += leaf.size
    return jax.tree_util.tree_unflatten(treedef, out)

  return jax.block_until_ready(jax.jit(draw)(jax.random.key(seed)))


def sampler_settings(steps: int) -> sampler.SamplerSettings:
  """The `:sd` variant's sampling section with SD-1.x's epsilon prediction and T; `steps` DDIM steps."""
  cfg = load_config('default', 'sd')
  cfg.sampling.num_steps = steps
  cfg.diffusion.update(prediction_type='epsilon', num_timesteps=SD_SCHEDULE['num_timesteps'])
  return sampler.SamplerSettings.from_config(cfg)


def build(quick: bool, steps: int, dtype: str) -> tuple[Setup, float]:
  """(the setup, seconds taken to draw the params on the device)."""
  cfg = load_config('default', 'sd')
  unet = da.FlaxUNet2DConditionModel(**(TINY_UNET if quick else SD_UNET), dtype=common.DTYPES[dtype])
  t0 = time.perf_counter()
  unet_params = device_params(unet.init_weights)
  s = SD_SCHEDULE
  setup = Setup(unet, int(cfg.vae.z_dom_dim), int(cfg.diffusion.num_cond_tokens), common.DTYPES[dtype], None,
                TINY_LATENT if quick else SD_LATENT, sampler_settings(steps),
                np.asarray(schedules.make_schedule(s['name'], s['num_timesteps'], s['beta_start'],
                                                   s['beta_end']).alphas_cumprod, np.float32), quick)
  setup.params = jax.block_until_ready(
      da.init_pretrained_cond_unet(setup.model('default'), unet_params, jax.random.key(1))['params'])
  return setup, time.perf_counter() - t0


def attention_bytes(unet, batch: int, latent_hw: tuple[int, int]) -> int:
  """Bytes of the scores + probabilities of diffusers' default attention at the UNet's highest-resolution
  attention layer: what decides whether a batch fits."""
  heads = unet.num_attention_heads or unet.attention_head_dim
  worst = 0
  for level, kind in enumerate(unet.down_block_types):
    if 'CrossAttn' in kind:
      h = heads[level] if isinstance(heads, (tuple, list)) else heads
      tokens = (latent_hw[0] >> level) * (latent_hw[1] >> level)
      worst = max(worst, batch * h * tokens * tokens)
  return 2 * worst * jnp.dtype(unet.dtype).itemsize  # the UNet's compute dtype


def memory_limit_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != 'cpu' else None
  return int(stats['bytes_limit']) if stats and 'bytes_limit' in stats else None


def attention_for(choice: str, setup: Setup, batch: int) -> str:
  """auto -> fused, what the pipeline runs, unless it would be XLA's einsums (no GPU, or not 16-bit) and their
  score tensors would take over half the device's memory: then diffusers' memory-efficient loop."""
  if choice != 'auto':
    return choice
  limit = memory_limit_bytes()
  flash = jax.default_backend() == 'gpu' and jnp.dtype(setup.dtype).itemsize == 2
  too_big = limit is not None and attention_bytes(setup.unet, batch, setup.latent[:2]) > limit / 2
  return 'memory_efficient' if too_big and not flash else 'fused'


def attention_check(setup: Setup, batch: int = 2) -> list[dict[str, Any]]:
  """`layers.fused_attention` at the UNet's attention shapes (self-attention and the cross-attention over the
  z_dom tokens, per level) in the compute dtype: which kernel the backend took (cuDNN's flash attention shows
  as a custom call in the lowered program) and its largest difference from XLA's einsums in float32."""
  from diffuseg_jax.models.layers import fused_attention

  unet, (h, w) = setup.unet, setup.latent[:2]
  heads = unet.num_attention_heads or unet.attention_head_dim
  fused = jax.jit(fused_attention)
  reference = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation='xla'))
  rows = []
  for level, (kind, width) in enumerate(zip(unet.down_block_types, unet.block_out_channels, strict=True)):
    if 'CrossAttn' not in kind:
      continue
    n = heads[level] if isinstance(heads, (tuple, list)) else heads
    tokens, head_dim = (h >> level) * (w >> level), width // n
    for kv_tokens in (tokens, setup.num_cond_tokens):
      keys = jax.random.split(jax.random.key(level), 3)
      q, k, v = (jax.random.normal(key, (batch, t, n, head_dim), jnp.float32)
                 for key, t in zip(keys, (tokens, kv_tokens, kv_tokens), strict=True))
      low = [a.astype(setup.dtype) for a in (q, k, v)]
      text = fused.lower(*low).as_text().lower()
      diff = jnp.abs(fused(*low).astype(jnp.float32) - reference(q, k, v)).max()
      rows.append({'tokens': tokens, 'kv_tokens': kv_tokens, 'head_dim': head_dim,
                   'kernel': 'cudnn' if 'cudnn' in text else 'xla', 'max_abs_diff': float(diff)})
  return rows


def sampler_inputs(setup: Setup, batch: int, seed: int = 0) -> dict[str, jax.Array]:
  """region latent r(m) [B,h,w,C] ~ N(0, 1), a centred disc mask [B,h,w,1], z_dom [B,D] ~ N(0, 1)."""
  h, w, c = setup.latent
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  disc = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (min(h, w) / 4) ** 2).astype(np.float32)
  return {'region': jnp.asarray(rng.standard_normal((batch, h, w, c), np.float32)),
          'mask': jnp.asarray(np.broadcast_to(disc[None, :, :, None], (batch, h, w, 1))),
          'z_dom': jnp.asarray(rng.standard_normal((batch, setup.cond_dim), np.float32))}


def _apply_eps(model, alphas, prediction_type: str):
  """apply(params, x_t, t, z_dom, drop) -> eps, as the synthesis kernel builds it."""
  def apply(params, x, t, z, drop):
    return prediction.eps_fn(lambda *a: model.apply({'params': params}, *a), alphas, prediction_type)(x, t, z, drop)
  return apply


def scan_sampler(setup: Setup, model):
  """The whole sampler as one jitted program on (params, key, region, mask, z_dom) -> x_0."""
  apply = _apply_eps(model, setup.alphas, setup.settings.prediction_type)

  def scan(params, key, region, mask, z_dom):
    return sampler.blended_ddim_sample(functools.partial(apply, params), setup.alphas, key, region, mask, z_dom,
                                       setup.settings)[0]

  return jax.jit(scan)


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def aot(jitted, *args) -> tuple[Any, Any, float, float]:
  """(lowered, compiled, lower seconds, compile seconds)."""
  lowered, lower_s = _timed(lambda: jitted.lower(*args))
  compiled, compile_s = _timed(lowered.compile)
  return lowered, compiled, lower_s, compile_s


def temp_mib(compiled) -> float | None:
  """XLA's temporary buffer size of a compiled program (activations), MiB."""
  try:
    return common.mib(int(compiled.memory_analysis().temp_size_in_bytes))
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None


def time_calls(fn, images: int, repeats: int, budget_s: float) -> dict[str, Any]:
  """One warm-up call, then up to `repeats` timed calls while they fit in `budget_s` (the warm-up's duration
  predicts theirs); with none, the warm-up is the timing. fn must block on its result."""
  _, first = _timed(fn)
  n = min(repeats, int(budget_s // max(first, 1e-9)))
  timing = common.Timing(images, [_timed(fn)[1] for _ in range(n)] or [first])
  return {**common.rate_cell(timing), 'timed_runs': n, 'first_call_s': first}


def _loop(setup: Setup, attention: str) -> sampler.LoopSampler:
  model = setup.model(attention)
  return sampler.LoopSampler(_apply_eps(model, setup.alphas, setup.settings.prediction_type), setup.settings)


def step_gflop_per_image(setup: Setup, batch: int) -> tuple[float | None, str | None]:
  """(GFLOP of one sampler step per image, where the count came from): XLA's cost analysis of the lowered step
  (no compile), always with diffusers' einsum attention (the memory-efficient one loops over query chunks and
  XLA counts a loop body once; the fused one is a cuDNN custom call on a GPU, which XLA does not count). Where
  the backend gives no analysis (jax 0.11.2 on an H200 gave none, also for the step lowered for its CPU),
  `setup.step_gflop` (--step-gflop, counted on a CPU by --count-flops)."""
  flops = common.xla_flops(sampler_bench.lower_step(_loop(setup, 'default'), setup.params,
                                                    sampler_inputs(setup, batch)))
  if flops:
    return flops / batch / 1e9, 'xla cost analysis'
  return (setup.step_gflop, '--step-gflop') if setup.step_gflop else (None, None)


def step_compile(setup: Setup, batch: int, attention: str) -> dict[str, Any]:
  """Lower + compile one jitted sampler step (the loop sampler's), cold: before any other UNet program."""
  attention = attention_for(attention, setup, batch)
  loop = _loop(setup, attention)
  lowered, lower_s = _timed(lambda: sampler_bench.lower_step(loop, setup.params, sampler_inputs(setup, batch)))
  compiled, compile_s = _timed(lowered.compile)
  gflop, source = step_gflop_per_image(setup, batch)
  return {'batch': batch, 'attention': attention,
          'lower_s': lower_s, 'compile_s': compile_s, 'lower_compile_s': lower_s + compile_s,
          'step_gflop_per_image': gflop, 'gflop_source': source, 'temp_MiB': temp_mib(compiled)}


def bench_batch(setup: Setup, batch: int, attention: str, repeats: int, budget_s: float, ceilings: dict,
                autotune_warm: bool) -> dict[str, Any]:
  """The row of one batch size: compile, images/s, FLOPs and their fraction of the ceilings, memory."""
  attention = attention_for(attention, setup, batch)
  gflop, source = step_gflop_per_image(setup, batch)
  row = {'batch': batch, 'dtype': jnp.dtype(setup.dtype).name, 'steps': setup.settings.num_steps,
         'attention': attention, 'autotune_warm': autotune_warm, 'step_gflop_per_image': gflop,
         'gflop_source': source}
  inputs = sampler_inputs(setup, batch)
  args = (setup.params, jax.random.key(batch), inputs['region'], inputs['mask'], inputs['z_dom'])
  lowered, compiled, lower_s, compile_s = aot(scan_sampler(setup, setup.model(attention)), *args)
  scan_flops = common.xla_flops(lowered)
  row.update(scan_lower_s=lower_s, scan_compile_s=lower_s + compile_s, temp_MiB=temp_mib(compiled),
             scan_cost_gflop=scan_flops / 1e9 if scan_flops else None)
  print(f'batch {batch}: scan compiled in {lower_s + compile_s:.1f} s ({row["attention"]} attention, '
        f'temp {row["temp_MiB"] or 0:.0f} MiB)', flush=True)
  row.update(time_calls(lambda: compiled(*args).block_until_ready(), batch, repeats, budget_s))
  if row['step_gflop_per_image']:
    gflop = row['step_gflop_per_image'] * setup.settings.num_steps
    row.update(gflop_per_image=gflop, tflop_s=gflop * row['img_s'] / 1e3)
    row['frac_bf16'] = common.ratio(row['tflop_s'] * 1e3, ceilings.get('bfloat16'))
    row['frac_f32'] = common.ratio(row['tflop_s'] * 1e3, ceilings.get('float32'))
  row['device_peak_MiB'] = common.mib(common.device_peak_bytes())
  return row


# --- the synthesize stage's pattern ----------------------------------------------------------------------------

def codec_for(setup: Setup, dtype) -> latent.LatentCodec:
  """A 'pretrained' latent codec over an SD-sized FlaxAutoencoderKL with random weights (tiny with --quick)."""
  cfg = TINY_VAE if setup.quick else SD_VAE
  vae = da.FlaxAutoencoderKL(**cfg, dtype=dtype)
  return latent.LatentCodec('pretrained', vae, device_params(vae.init_weights, seed=2), cfg['scaling_factor'],
                            2 ** (len(cfg['block_out_channels']) - 1), cfg['latent_channels'], cfg['in_channels'])


def stage_data(num: int, size: int, cond_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Host inputs of the stage: `num` label maps [num, size, size] (ellipses of classes 1..K-1), their reference
  images' per-class appearance ('image_mean'/'image_std' [num, K, 3] as `class_appearance` gives) and z_dom."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size] / size
  masks = np.zeros((num, size, size), np.int32)
  for i in range(num):
    for cls in range(1, NUM_CLASSES):
      (cy, cx), (ry, rx) = rng.uniform(0.25, 0.75, 2), rng.uniform(0.08, 0.25, 2)
      masks[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = cls
  return {'masks': masks,
          'appearance': {'image_mean': rng.uniform(-0.8, 0.8, (num, NUM_CLASSES, 3)).astype(np.float32),
                         'image_std': rng.uniform(0.05, 0.3, (num, NUM_CLASSES, 3)).astype(np.float32)},
          'z_dom': rng.standard_normal((num, cond_dim)).astype(np.float32)}


def bench_stage(setup: Setup, batch: int, num_batches: int, attention: str, writer_depth: int,
                scan_img_s: float | None) -> dict[str, Any]:
  """`synthesis.synthesize` compiled as the stage jits it, then `num_batches` batches through the stage's loop
  (see the module docstring); one shard per batch."""
  # Imported here: the stage's modules pull in the file writers and figure libraries (nibabel, matplotlib), which
  # a GPU image may lack; then only this part fails, not the sampler rows.
  from diffuseg_jax import synthetic_io
  from diffuseg_jax.background_writer import BackgroundWriter
  from diffuseg_jax.prefetch import prefetch
  from diffuseg_jax.stages import synthesize as stage

  attention = attention_for(attention, setup, batch)
  model = setup.model(attention)
  codec = codec_for(setup, setup.dtype)
  size = setup.latent[0] * codec.downsample
  out = {'batch': batch, 'batches': num_batches, 'image_size': size, 'decode_included': True,
         'attention': attention, 'writer_depth': writer_depth}
  data = stage_data(max(8, batch), size, setup.cond_dim)
  masks, n = data['masks'], len(data['masks'])
  jitted = jax.jit(functools.partial(synthesis.synthesize, model, setup.settings, jnp.asarray(setup.alphas)))
  key = jax.random.key(7)

  def host_batch(b: int):
    rng = np.random.default_rng([0, b])
    rows = np.arange(b * batch, (b + 1) * batch) % n
    m = masks[rows]
    region = stage.render_regions(m, 'rendered', data['appearance'], NUM_CLASSES, 3, rng, rows)
    return (b, rows), (setup.params, codec, jax.random.fold_in(key, b), jax.device_put(region),
                       jax.device_put((m > 0).astype(np.float32)), jax.device_put(data['z_dom'][rows]))

  _, compiled, lower_s, compile_s = aot(jitted, *host_batch(0)[1])
  out.update(synthesize_compile_s=lower_s + compile_s, temp_MiB=temp_mib(compiled))
  print(f'stage batch {batch}: synthesize compiled in {lower_s + compile_s:.1f} s', flush=True)
  timing = stage.StageTiming()
  last_inputs = None
  items = prefetch(map(host_batch, range(num_batches)), depth=1)  # as the stage: rendered on a thread
  with tempfile.TemporaryDirectory(prefix='sd_stage_') as root, BackgroundWriter(depth=writer_depth) as writer:
    for (b0, rows0), inputs, images, err in stage.dispatch_in_order(compiled, items, timing):
      timing.batch_done(len(rows0))
      last_inputs = inputs
      timing.max_err = max(timing.max_err, float(err.max()))
      idx = np.arange(b0 * batch, (b0 + 1) * batch)
      writer.submit(synthetic_io.write_shard, root, b0, images, masks[rows0], idx, rows0, rows0,
                    np.ones((batch, 2), np.float32), 'png')
    writer.close()
    timing.finish(writer)
    out['files_written'] = len(os.listdir(os.path.join(root, 'images')))
  timed = timing.summary(stage.bare_sampler_rate(compiled, last_inputs, batch))
  steady = timed['sampling_images_per_second']
  out.update(stage_img_s=steady, stage_img_s_with_last_write=timed['stage_images_per_second'],
             synthesize_img_s=timed['sampler_images_per_second'], scan_img_s=scan_img_s,
             stage_vs_sampler=timed['sampling_vs_sampler'],
             stage_vs_sampler_with_last_write=timed['stage_vs_sampler'],
             stage_vs_scan=common.ratio(steady, scan_img_s),
             synthesize_vs_scan=common.ratio(timed['sampler_images_per_second'], scan_img_s),
             writer_busy_s=timed['writer_busy_seconds'], writer_wait_s=timed['writer_wait_seconds'],
             region_max_abs_error_latent=timing.max_err, device_peak_MiB=common.mib(common.device_peak_bytes()))
  return out


# --- the run ---------------------------------------------------------------------------------------------------

COLUMNS = ('batch', 'attention', 'img_s', 'img_s_range', 'timed_runs', 'first_call_s', 'scan_compile_s',
           'autotune_warm', 'gflop_per_image', 'tflop_s', 'frac_bf16', 'temp_MiB', 'device_peak_MiB', 'error')
STAGE_COLUMNS = ('batch', 'batches', 'image_size', 'stage_img_s', 'stage_img_s_with_last_write', 'synthesize_img_s',
                 'scan_img_s', 'stage_vs_sampler', 'stage_vs_scan', 'synthesize_compile_s', 'writer_busy_s',
                 'error')


def _error(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0][:300] if text else ""}'


def _guarded(what: str, fn, default):
  """fn(), or `default` updated with {'error': ...} when it raises (printed with its traceback)."""
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 - e.g. out of device memory at the largest batch: keep the rest
    traceback.print_exc()
    print(f'{what}: failed: {_error(e)}', flush=True)
    return {**default, 'error': _error(e)}


def save(path: str | None, result: dict[str, Any]) -> None:
  """The JSON, rewritten atomically after every part: a killed run leaves the last complete one."""
  if path:
    atomic.write_text(path, json.dumps(result, indent=1, default=str) + '\n')


def summary(result: dict[str, Any], summary_batch: int) -> dict[str, float | None]:
  """The summary line's values. scan_compile_s: the first scan compiled cold (no step of its shapes before it),
  preferring one with the default attention (the step's); failed rows are skipped."""
  ok = [r for r in result['rows'] if not r.get('error')]
  rows = {r['batch']: r for r in ok}
  cold = [r for r in ok if not r.get('autotune_warm')]
  scan_row = next(iter([r for r in cold if r.get('attention') == 'default'] + cold + ok), {})
  stage_part = result.get('stage') or {}
  return {f'img_s_b{summary_batch}': rows.get(summary_batch, {}).get('img_s'),
          f'frac_bf16_b{summary_batch}': rows.get(summary_batch, {}).get('frac_bf16'),
          'stage_vs_sampler': stage_part.get('stage_vs_sampler'),
          'scan_compile_s': scan_row.get('scan_compile_s'),
          'step_compile_s': (result.get('step') or {}).get('lower_compile_s')}


def count_flops(args: argparse.Namespace) -> dict[str, Any]:
  """--count-flops: GFLOP of one sampler step per image at each batch, from XLA's cost analysis on this machine
  (a CPU will do: the count depends on the program, not on where it runs); nothing is timed."""
  setup, _ = build(args.quick, args.steps, args.dtype)
  counts = {}
  for batch in (int(b) for b in args.batches.split(',') if b):
    counts[batch], source = step_gflop_per_image(setup, batch)
    print(f'batch {batch}: {counts[batch]} GFLOP per image per step ({source})', flush=True)
  result = {'env': common.environment(), 'args': vars(args), 'step_gflop_per_image': counts}
  save(args.json, result)
  return result


def run(args: argparse.Namespace) -> dict[str, Any]:
  if args.count_flops:
    return count_flops(args)
  batches = tuple(int(b) for b in args.batches.split(',') if b)
  stage_batch = args.stage_batch if args.stage_batch is not None else (64 if 64 in batches else max(batches))
  summary_batch = args.summary_batch or (max(batches) if args.quick else 256)
  result: dict[str, Any] = {
      'env': {**common.environment(), 'compilation_cache': jax.config.jax_compilation_cache_dir or None,
              'XLA_PYTHON_CLIENT_MEM_FRACTION': os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION'),
              'memory_limit_MiB': common.mib(memory_limit_bytes())},
      'args': vars(args), 'ceiling': {}, 'rows': [], 'step': None, 'stage': None}
  n = common.matmul_n(args)
  for name in ('bfloat16', 'float32'):
    result['ceiling'][name] = common.matmul_ceiling_gflops(n, repeats=10, dtype=common.DTYPES[name])
  result['ceiling']['matmul_n'] = n
  print(f"matmul ceiling ({n}^2): bf16 {result['ceiling']['bfloat16']:.1f} GFLOP/s, "
        f"f32 {result['ceiling']['float32']:.1f} GFLOP/s", flush=True)
  save(args.json, result)
  setup, init_s = build(args.quick, args.steps, args.dtype)
  setup.step_gflop = args.step_gflop
  result['setup'] = {'params': common.param_count(setup.params), 'latent': setup.latent, 'init_s': init_s,
                     'settings': dataclasses.asdict(setup.settings), 'param_dtype': 'float32',
                     'compute_dtype': jnp.dtype(setup.dtype).name}
  print(f"UNet: {result['setup']['params'] / 1e6:.1f}M params drawn on the device in {init_s:.1f} s", flush=True)
  save(args.json, result)
  result['attention_check'] = _guarded('attention check', lambda: attention_check(setup), [])
  for r in result['attention_check']:
    print(f"attention {r['tokens']}x{r['kv_tokens']} tokens, head width {r['head_dim']}: {r['kernel']}, "
          f"max |fused - float32 einsum| {r['max_abs_diff']:.3g}", flush=True)
  save(args.json, result)
  result['step'] = _guarded('step compile', lambda: step_compile(setup, batches[0], args.attention),
                            {'batch': batches[0]})
  print(f"one step compiled in {result['step'].get('lower_compile_s') or float('nan'):.1f} s", flush=True)
  save(args.json, result)
  for i, batch in enumerate(batches):
    row = _guarded(f'batch {batch}', functools.partial(
        bench_batch, setup, batch, args.attention, args.repeats, args.budget_s, result['ceiling'], i == 0),
        {'batch': batch})
    result['rows'].append(row)
    print(f"batch {batch}: {row.get('img_s') or 0:.4g} img/s, {row.get('tflop_s') or 0:.4g} TFLOP/s, "
          f"{100 * (row.get('frac_bf16') or 0):.1f} % of the bf16 ceiling", flush=True)
    save(args.json, result)
    if batch == stage_batch and args.stage_batches > 0:
      result['stage'] = _guarded(f'stage batch {batch}', functools.partial(
          bench_stage, setup, batch, args.stage_batches, args.attention, args.writer_depth, row.get('img_s')),
          {'batch': batch})
      s = result['stage']
      print(f"stage batch {batch}: {s.get('stage_img_s') or 0:.4g} img/s vs the synthesize program "
            f"{s.get('synthesize_img_s') or 0:.4g} img/s ({100 * (s.get('stage_vs_sampler') or 0):.1f} %)", flush=True)
      save(args.json, result)
  try:
    result['ceiling']['bfloat16_after'] = common.matmul_ceiling_gflops(n, repeats=10, dtype=jnp.bfloat16)
  except Exception as e:  # noqa: BLE001 - the measurements are already saved
    result['ceiling']['bfloat16_after'] = None
    print(f'ceiling after: failed: {_error(e)}', flush=True)
  result['summary'] = summary(result, summary_batch)
  save(args.json, result)
  return result


def _num(v) -> float:
  return float('nan') if v is None else v


def report(result: dict[str, Any]) -> None:
  """The ceilings, the step compile, the batch table, the stage table, and last the summary line."""
  c, s = result['ceiling'], result['step'] or {}
  print(f"matmul ceiling ({c['matmul_n']}^2): bf16 {c['bfloat16']:.1f} GFLOP/s (after: "
        f"{_num(c.get('bfloat16_after')):.1f}), f32 {c['float32']:.1f} GFLOP/s")
  print(f"one step at batch {s.get('batch')}: lower + compile {_num(s.get('lower_compile_s')):.1f} s, "
        f"{_num(s.get('step_gflop_per_image')):.4g} GFLOP per image {s.get('error', '')}")
  print(common.format_table(result['rows'], COLUMNS))
  if result['stage']:
    print(common.format_table([result['stage']], STAGE_COLUMNS))
  print('sd_sampler: ' + common.summary_line(result['summary']), flush=True)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description='The SD-sized blended DDIM sampler on one accelerator (see the module '
                              'docstring).')
  p.add_argument('--quick', action='store_true', help='tiny UNet and VAE, 8x8x4 latents (seconds on a CPU)')
  p.add_argument('--batches', default='16,64,256', help='batch sizes, run in this order')
  p.add_argument('--steps', type=int, default=50, help='DDIM steps')
  p.add_argument('--dtype', default='bfloat16', choices=tuple(common.DTYPES), help='compute dtype (params float32)')
  p.add_argument('--repeats', type=int, default=3, help='timed calls per batch at most (after a warm-up)')
  p.add_argument('--budget-s', type=float, default=40.0, help='seconds of timed calls per batch at most')
  p.add_argument('--attention', default='auto', choices=ATTENTION, help='diffusers attention (see the docstring)')
  p.add_argument('--stage-batch', type=int, default=None,
                 help='batch of the stage part (default 64 if in --batches, else the largest); 0: skip it')
  p.add_argument('--stage-batches', type=int, default=4, help='batches through the stage loop (0: skip the part)')
  p.add_argument('--writer-depth', type=int, default=None, help="the writer's queue (default: the :sd config's)")
  p.add_argument('--summary-batch', type=int, default=None, help='batch of the summary line (default 256)')
  p.add_argument('--matmul-n', type=int, default=None, help='matmul ceiling n (default 8192 GPU, 2048 CPU, 256 quick)')
  p.add_argument('--json', default=None, help='write the results here (after every part)')
  p.add_argument('--step-gflop', type=float, default=None,
                 help='GFLOP per image per step, used where XLA gives no count (see --count-flops)')
  p.add_argument('--count-flops', action='store_true',
                 help='only print GFLOP per image per step at --batches (run it on a CPU; no timing)')
  args = p.parse_args(argv)
  if args.writer_depth is None:
    args.writer_depth = int(load_config('default', 'sd').sampling.writer_queue)
  return args


def main(argv=None) -> dict[str, Any]:
  common.prepare_process()
  args = parse_args(argv)
  result = run(args)
  if not args.count_flops:
    report(result)
  return result


if __name__ == '__main__':
  main()
