"""Blended DDIM sampler throughput: our `lax.scan` sampler vs a Python loop over our jitted step vs PyTorch.

  python -m benchmarks.sampler                       # both configs, batch 1/16/64, 50 steps, 5 timed runs
  python -m benchmarks.sampler --quick               # tiny model, seconds (what the smoke test runs)
  python -m benchmarks.sampler --configs=mscmr --batches=16 --repeats=3 --json=/tmp/sampler.json

Configs (each config file's `diffusion` and `sampling` sections, with num_steps forced to --steps):
  (a) mnist_m  pixel-space diffusion on 32x32x3 images (configs/mnist_m.py);
  (b) mscmr    32x32x4 latents of 128x128 images, z_dom via cross-attention + FiLM (configs/mscmr.py).
The autoencoder is not part of the measurement (latents in, latents out), so (b) measures the denoiser loop.

Implementations, timed interleaved in the same process:
  scan   sampler.blended_ddim_sample under one jax.jit (AOT-compiled; compile time reported apart);
  loop   sampler.LoopSampler: a Python loop over ONE jitted step (params an argument, compiled once), i.e. the
         same steps and keys with a host round trip per step;
  torch  the same network in PyTorch (benchmarks/torch_mirror.py, our weights copied in), stepped by
         diffusers' DDIMScheduler ('trailing' spacing, our alphas_cumprod) with the same hard blending.
Before timing, the torch UNet's eps and the whole torch sampler (fed the JAX sampler's noise) are checked
equal to the JAX ones. GFLOP/s comes from XLA's cost analysis of one compiled step times the number of steps
(the scan's own cost analysis counts its loop body once, whatever the trip count: column scan_cost_gflop).
The last printed line is `sampler_vs_torch=... scan_vs_loop=... matmul_frac=...` for config (b), batch 16.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from diffuseg_jax.config_files import load_config
from diffuseg_jax.models.cond_unet import CondUNet, build_cond_unet
from diffuseg_jax.sampling import sampler, schedules

CONFIGS = ('mnist_m', 'mscmr')
LABELS = {'mnist_m': '(a) MNIST-M pixel 32x32x3', 'mscmr': '(b) cardiac latent 32x32x4 (128^2 images)'}
SUMMARY_CASE = ('mscmr', 16)  # the config and batch of the one-line summary
IMPLS = ('scan', 'loop', 'torch')
MNIST_M_CHANNELS = 3  # MNIST-M images are RGB; pixel-space diffusion (autoencoder.kind='identity')


@dataclasses.dataclass(frozen=True)
class Case:
  """One sampler configuration: the network, its latent shape [h, w, C] and the sampler settings."""

  name: str
  model: CondUNet
  latent: tuple[int, int, int]
  settings: sampler.SamplerSettings
  alphas_cumprod: np.ndarray  # float32 [T]


def case_config(name: str, quick: bool = False):
  """(configs/<name>.py, latent shape [h, w, C] of its denoiser); `quick` shrinks the network and latents to a
  seconds-long smoke size (the train-step benchmark builds its diffusion task from the same pair)."""
  cfg = load_config(name)
  if cfg.autoencoder.kind == 'identity':
    h = w = int(cfg.data.image_size)
    c = MNIST_M_CHANNELS
  else:
    f = int(cfg.autoencoder.downsample)
    h = w = int(cfg.data.image_size) // f
    c = int(cfg.autoencoder.latent_channels)
  if quick:
    cfg.diffusion.base_channels = 8
    cfg.diffusion.channel_mult = (1, 2)
    cfg.diffusion.attention_levels = (1,)
    cfg.diffusion.num_heads = 2
    h = w = 8
  return cfg, (h, w, c)


def make_case(name: str, steps: int, quick: bool = False, dtype: str = 'float32') -> Case:
  """The case of configs/<name>.py (see `case_config`); `dtype` is the UNet's compute dtype
  (train.compute_dtype; params stay float32)."""
  cfg, (h, w, c) = case_config(name, quick)
  cfg.sampling.num_steps = steps
  model = build_cond_unet(cfg.diffusion, channels=c, cond_dim=int(cfg.vae.z_dom_dim), dtype=common.DTYPES[dtype])
  d = cfg.diffusion
  alphas = schedules.make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end).alphas_cumprod
  return Case(name, model, (h, w, c), sampler.SamplerSettings.from_config(cfg), alphas)


def init_params(case: Case, seed: int = 0):
  """Random weights (common.host_params: every leaf non-zero, the zero-initialised output conv too)."""
  h, w, c = case.latent
  return common.host_params(lambda k: case.model.init(
      k, jnp.zeros((1, h, w, c)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, case.model.cond_dim)),
      jnp.zeros((1,), bool))['params'], seed)


def make_inputs(case: Case, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """region latent r(m) [B,h,w,C], binary mask [B,h,w,1] (a centred disc), z_dom [B,D]; float32 numpy."""
  h, w, c = case.latent
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  disc = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (min(h, w) / 4) ** 2).astype(np.float32)
  return {'region': rng.standard_normal((batch, h, w, c)).astype(np.float32),
          'mask': np.broadcast_to(disc[None, :, :, None], (batch, h, w, 1)).copy(),
          'z_dom': rng.standard_normal((batch, case.model.cond_dim)).astype(np.float32)}


def _eps_fn(model: CondUNet, params):
  return lambda x, t, z, drop: model.apply({'params': params}, x, t, z, drop)


def _apply_eps(model: CondUNet):
  return lambda params, x, t, z, drop: model.apply({'params': params}, x, t, z, drop)


def jax_samplers(case: Case):
  """(scan sampler jitted on (params, key, region, mask, z_dom), `sampler.LoopSampler` for this case)."""
  def scan(params, key, region, mask, z_dom):
    return sampler.blended_ddim_sample(_eps_fn(case.model, params), case.alphas_cumprod, key, region, mask,
                                       z_dom, case.settings)[0]

  return jax.jit(scan), sampler.LoopSampler(_apply_eps(case.model), case.settings)


def lower_step(loop: sampler.LoopSampler, params, inputs: dict[str, jax.Array]):
  """The loop sampler's step lowered for this batch (its cost analysis gives the FLOPs of one step)."""
  x = inputs['region']
  scalars = (jnp.int32(0), jnp.float32(0.5), jnp.float32(0.6), jnp.asarray(True))  # t, a_t, a_prev, do_blend
  return loop.step.lower(params, x, jax.random.key(0), x, inputs['mask'], inputs['z_dom'], *scalars)


def jax_noise(case: Case, key: jax.Array, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """(x_T, per-step x_seg noise [S, ...]) that the JAX sampler draws from `key` (see sampler.py's docstring:
  rng -> (x_T key, step key); step i uses fold_in(step key, i) split into (DDIM key, x_seg key)); used to
  feed the torch sampler the same noise for the equivalence check."""
  key_init, key_steps = jax.random.split(key)
  x_t = jax.random.normal(key_init, shape, jnp.float32)
  seg = [jax.random.normal(jax.random.split(jax.random.fold_in(key_steps, i))[1], shape, jnp.float32)
         for i in range(case.settings.num_steps)]
  return np.asarray(x_t), np.asarray(jnp.stack(seg))


# --- PyTorch reference -------------------------------------------------------------------------------------

def torch_reference(case: Case, params):
  """(torch CondUNet with our weights, diffusers DDIMScheduler matching our schedule and DDIM timesteps)."""
  import diffusers
  import torch

  from benchmarks import torch_mirror

  s = case.settings
  if s.blend_mode != 'hard' or s.guidance_scale != 1.0 or s.eta != 0.0:
    raise ValueError('the torch reference implements hard blending, guidance_scale=1, eta=0 (the configs)')
  net = torch_mirror.cond_unet_from_linen(case.model, case.latent[-1])
  net.load_flax(jax.tree.map(np.asarray, params))
  if torch_mirror.count_params(net) != common.param_count(params):
    raise AssertionError('torch mirror and linen CondUNet differ in parameter count')
  net = net.eval().to(common.torch_device())
  sched = diffusers.DDIMScheduler(num_train_timesteps=len(case.alphas_cumprod), beta_schedule='linear',
                                  clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                  timestep_spacing='trailing', prediction_type='epsilon')
  sched.alphas_cumprod = torch.from_numpy(np.asarray(case.alphas_cumprod, np.float32))  # exactly ours
  sched.set_timesteps(s.num_steps)
  ours, _ = schedules.ddim_timesteps(len(case.alphas_cumprod), s.num_steps)
  if not np.array_equal(sched.timesteps.numpy(), ours):
    raise AssertionError('diffusers trailing DDIM timesteps differ from schedules.ddim_timesteps')
  return net, sched


def torch_sample(net, sched, settings: sampler.SamplerSettings, region, mask, z_dom, x_t=None,
                 seg_noise=None):
  """Blended DDIM in PyTorch (NCHW): diffusers' DDIMScheduler.step, then hard blending with the noised region.

  region [B,C,h,w], mask [B,1,h,w], z_dom [B,D]; x_t / seg_noise [S,B,C,h,w] optional fixed noise.
  """
  import torch

  b = region.shape[0]
  drop = torch.zeros(b, dtype=torch.bool, device=region.device)
  x = torch.randn_like(region) if x_t is None else x_t
  t_stride = sched.config.num_train_timesteps // sched.num_inference_steps
  with torch.inference_mode():
    for i, t in enumerate(sched.timesteps):
      eps = net(x, t.to(region.device).expand(b), z_dom, drop)
      x_dom = sched.step(eps, t, x, eta=settings.eta).prev_sample
      if i < settings.blend_until * settings.num_steps:
        t_prev = int(t) - t_stride
        a_prev = sched.alphas_cumprod[t_prev] if t_prev >= 0 else sched.final_alpha_cumprod
        a_prev = a_prev.to(region.device)
        noise = torch.randn_like(x) if seg_noise is None else seg_noise[i]
        x_seg = a_prev.sqrt() * region + (1.0 - a_prev).sqrt() * noise
        x = x_dom * (1.0 - mask) + x_seg * mask
      else:
        x = x_dom
  return common.torch_sync(x)


def _nchw(a, device):
  import torch

  a = np.asarray(a, np.float32)
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, -3) if a.ndim >= 4 else a)).to(device)


def check_equivalence(case: Case, params, net, sched, scan_fn, batch: int,
                      tol: float | None = None) -> dict[str, float]:
  """Max |torch - jax| relative to max |jax|: the UNet's eps (batch 2, one row dropped to the null condition)
  and the whole sampler at `batch` (scan_fn compiled for it) fed identical noise. AssertionError above tol.
  Both checks run in float32 (the weights and the arithmetic); for a bfloat16 case the eps check uses the
  float32 twin of the model and the sampler check is skipped (bfloat16 rounding differs between stacks)."""
  import torch

  tol = common.equivalence_tolerance() if tol is None else tol
  dev = common.torch_device()
  h, w, c = case.latent
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, h, w, c)).astype(np.float32)
  t = np.array([999, 17], np.int32)
  z = rng.standard_normal((2, case.model.cond_dim)).astype(np.float32)
  drop = np.array([False, True])
  model32 = case.model.clone(dtype=jnp.float32)
  eps_jax = np.asarray(jax.jit(model32.apply)({'params': params}, x, t, z, drop))
  with torch.inference_mode():
    eps_torch = net(_nchw(x, dev), torch.from_numpy(t).to(dev), torch.from_numpy(z).to(dev),
                    torch.from_numpy(drop).to(dev)).cpu().numpy()
  errs = {'eps_rel_err': float(np.abs(np.moveaxis(eps_torch, 1, -1) - eps_jax).max() / np.abs(eps_jax).max())}
  if case.model.dtype != jnp.float32:
    return _assert_within(case, errs, tol)

  inputs = make_inputs(case, batch, seed=2)
  key = jax.random.key(3)
  x0_jax = np.asarray(scan_fn(params, key, *(jnp.asarray(inputs[k]) for k in ('region', 'mask', 'z_dom'))))
  x_t, seg = jax_noise(case, key, x0_jax.shape)
  x0_torch = torch_sample(net, sched, case.settings, _nchw(inputs['region'], dev), _nchw(inputs['mask'], dev),
                          torch.from_numpy(inputs['z_dom']).to(dev), _nchw(x_t, dev), _nchw(seg, dev))
  x0_torch = np.moveaxis(x0_torch.cpu().numpy(), 1, -1)
  errs['sample_rel_err'] = float(np.abs(x0_torch - x0_jax).max() / np.abs(x0_jax).max())
  return _assert_within(case, errs, tol)


def _assert_within(case: Case, errs: dict[str, float], tol: float) -> dict[str, float]:
  for name, err in errs.items():
    if not err <= tol:
      raise AssertionError(f'{case.name}: torch reference differs from ours: {name}={err:.2e} > {tol}')
  return errs


# --- the benchmark -----------------------------------------------------------------------------------------

def bench_case(case: Case, batches: tuple[int, ...], repeats: int, impls: tuple[str, ...],
               ceiling_gflops: float) -> tuple[list[dict[str, Any]], dict[str, float]]:
  """Rows (one per batch and implementation in `impls`) and the equivalence errors of one config."""
  params = init_params(case)
  reference = torch_reference(case, params) if 'torch' in impls else None
  rows, checks = [], {}
  for batch in batches:
    batch_rows, batch_checks = _bench_batch(case, params, reference, batch, repeats, ceiling_gflops,
                                            check=not checks, impls=impls)
    common.progress_line(f'{case.name} batch {batch}', batch_rows)
    rows += batch_rows
    checks = checks or batch_checks
  return rows, checks


def _bench_batch(case: Case, params, reference, batch: int, repeats: int, ceiling_gflops: float,
                 check: bool, impls: tuple[str, ...] = IMPLS) -> tuple[list[dict[str, Any]], dict[str, float]]:
  scan_jit, loop = jax_samplers(case)
  host = make_inputs(case, batch)
  inputs = {k: jnp.asarray(v) for k, v in host.items()}
  args = (params, jax.random.key(batch), inputs['region'], inputs['mask'], inputs['z_dom'])
  t0 = time.perf_counter()
  lowered = scan_jit.lower(*args)
  compiled = lowered.compile()
  compile_s = {'scan': time.perf_counter() - t0}
  t0 = time.perf_counter()
  step = lower_step(loop, params, inputs)  # its cost analysis gives the FLOPs of one step
  if 'loop' in impls:
    step.compile()  # only to report the loop's compile time
    compile_s['loop'] = time.perf_counter() - t0
  flops, scan_flops = common.xla_flops(step), common.xla_flops(lowered)
  runs = {'scan': lambda: compiled(*args).block_until_ready()}
  if 'loop' in impls:
    runs['loop'] = lambda: loop(params, case.alphas_cumprod, *args[1:])[0].block_until_ready()
  checks = {}
  if reference is not None:
    net, sched = reference
    if check:
      checks = check_equivalence(case, params, net, sched, compiled, batch)
    import torch
    dev = common.torch_device()
    targs = (_nchw(host['region'], dev), _nchw(host['mask'], dev), torch.from_numpy(host['z_dom']).to(dev))
    dtype = jnp.dtype(case.model.dtype).name

    def run_torch():
      with common.torch_autocast(dtype):
        return torch_sample(net, sched, case.settings, *targs)

    runs['torch'] = run_torch
  results = common.measure(runs, batch, repeats)
  scan_out = results['scan'].output
  tol = 1e-4 if case.model.dtype == jnp.float32 else 5e-2  # bfloat16: fusion-dependent rounding
  for name in ('loop',) if 'loop' in results else ():  # same keys, same steps: the same samples
    err = float(jnp.max(jnp.abs(results[name].output - scan_out)) / jnp.max(jnp.abs(scan_out)))
    if not err <= tol:
      raise AssertionError(f'{case.name}: {name} sampler differs from the scan sampler: rel err {err:.2e}')
  rows = []
  for name, m in results.items():
    med = m.timing.images_per_second()[0]
    gflops = flops * case.settings.num_steps / batch * med / 1e9 if flops else None
    rows.append({'config': case.name, 'dtype': jnp.dtype(case.model.dtype).name, 'batch': batch, 'impl': name,
                 **m.row(),
                 'compile_s': compile_s.get(name),
                 'gflop_s': gflops, 'frac_of_matmul': common.ratio(gflops, ceiling_gflops),
                 'step_gflop': flops / 1e9 if flops else None,
                 'scan_cost_gflop': scan_flops / 1e9 if (scan_flops and name == 'scan') else None})
  return rows, checks


def summary(rows: list[dict[str, Any]]) -> dict[str, float | None]:
  """sampler_vs_torch, scan_vs_loop, matmul_frac for SUMMARY_CASE (None where not measured)."""
  name, batch = SUMMARY_CASE
  sel = {r['impl']: r for r in rows if r['config'] == name and r['batch'] == batch}
  if not sel and rows:  # quick / partial runs: fall back to the last measured config and batch
    last = rows[-1]
    sel = {r['impl']: r for r in rows if r['config'] == last['config'] and r['batch'] == last['batch']}
  get = lambda impl, key: sel.get(impl, {}).get(key)
  return {'sampler_vs_torch': common.ratio(get('scan', 'img_s'), get('torch', 'img_s')),
          'scan_vs_loop': common.ratio(get('scan', 'img_s'), get('loop', 'img_s')),
          'matmul_frac': get('scan', 'frac_of_matmul')}


COLUMNS = ('config', 'dtype', 'batch', 'impl', 'img_s', 'img_s_range', 'compile_s', 'first_call_s', 'peak_rss_MiB',
           'rss_delta_MiB', 'device_peak_MiB', 'gflop_s', 'frac_of_matmul')


def run(configs: tuple[str, ...], batches: tuple[int, ...], steps: int, repeats: int, quick: bool,
        with_torch: bool, matmul_n: int, dtype: str = 'float32', impls: tuple[str, ...] = IMPLS) -> dict[str, Any]:
  """Run the sampler benchmark; returns {'env', 'ceiling', 'rows', 'checks', 'summary'}. The matmul ceiling
  is measured in `dtype` (the UNet's compute dtype)."""
  torch = common.torch_or_none() if with_torch else None
  impls = tuple(i for i in impls if i != 'torch' or torch is not None)
  result = common.new_result(matmul_n, dtype, torch)
  ceiling = result['ceiling']['jax_gflop_s']
  for name in configs:
    case = make_case(name, steps, quick, dtype)
    rows, checks = bench_case(case, batches, repeats, impls, ceiling)
    result['rows'] += rows
    result['checks'][name] = checks
  return common.finish_result(result, summary)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--configs', default=','.join(CONFIGS), help='comma-separated subset of mnist_m,mscmr')
  p.add_argument('--batches', default='1,16,64')
  p.add_argument('--steps', type=int, default=50, help='DDIM steps')
  p.add_argument('--impls', default=','.join(IMPLS), help='comma-separated subset of scan,loop,torch')
  common.add_harness_args(p)
  return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
  common.prepare_process()
  args = parse_args(argv)
  configs, impls = common.names(args.configs, CONFIGS, 'configs'), common.names(args.impls, IMPLS, 'impls')
  if 'scan' not in impls:
    raise SystemExit('error: --impls must include scan (the sampler every other one is compared with)')
  batches, steps, repeats = tuple(int(b) for b in args.batches.split(',')), args.steps, args.repeats
  if args.quick:  # tiny network, 8x8 latents, 2 steps
    batches, steps, repeats = (2,), 2, 2
  result = run(configs, batches, steps, repeats, args.quick, not args.no_torch, common.matmul_n(args), args.dtype,
               impls)
  common.report(result, COLUMNS, 'torch reference', args.json)
  return result


if __name__ == '__main__':
  main()
