"""Blended DDIM sampler throughput: our `lax.scan` sampler vs a Python loop over our jitted step vs PyTorch.

  python -m benchmarks.sampler                       # both configs, batch 1/16/64, 50 steps, 5 timed runs
  python -m benchmarks.sampler --quick               # tiny model, seconds (what the smoke test runs)
  python -m benchmarks.sampler --configs=mscmr --batches=16 --repeats=3 --json=/tmp/sampler.json
  python -m benchmarks.sampler --same-process        # the old method: everything in this one process

Configs (each config file's `diffusion` and `sampling` sections, with num_steps forced to --steps):
  (a) mnist_m  pixel-space diffusion on 32x32x3 images (configs/mnist_m.py);
  (b) mscmr    32x32x4 latents of 128x128 images, z_dom via cross-attention + FiLM (configs/mscmr.py).
The autoencoder is not part of the measurement (latents in, latents out), so (b) measures the denoiser loop.

Implementations:
  scan           sampler.blended_ddim_sample under one jax.jit (AOT-compiled; compile time reported apart);
  loop           sampler.LoopSampler: a Python loop over ONE jitted step (params an argument, compiled once),
                 i.e. the same steps and keys with a host round trip per step;
  torch_active,  the same network in PyTorch (benchmarks/torch_mirror.py, our weights copied in), stepped by
  torch_passive  diffusers' DDIMScheduler ('trailing' spacing, our alphas_cumprod) with the same hard
                 blending, with OMP_WAIT_POLICY=ACTIVE / PASSIVE; the faster is the torch of the ratios.
Method (default; benchmarks/worker.py): one fresh process per (case, implementation), run one after the
other: the JAX ones never import torch, the PyTorch ones never import jax (weights and inputs come through
an .npz) and run with PyTorch's default threads. First a check process (both frameworks) checks the torch
UNet's eps and the whole torch sampler (fed the JAX sampler's noise) equal to the JAX ones; a mismatch
raises before anything is timed. The loop's samples are checked equal to the scan's (outputs of their
processes). Each process measures its own framework's matmul ceiling and reports its own peak RSS.
With --same-process all implementations run interleaved in this process (torch as `torch`, PASSIVE).
GFLOP/s comes from XLA's cost analysis of one compiled step times the number of steps (the scan's own cost
analysis counts its loop body once, whatever the trip count: column scan_cost_gflop).
The last printed line is `sampler_vs_torch=... scan_vs_loop=... matmul_frac=... rss_vs_torch=...
torch_policy=... baseline=...` for config (b), batch 16.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, measure, worker
from diffuseg_jax.config_files import load_config
from diffuseg_jax.models.cond_unet import CondUNet, build_cond_unet
from diffuseg_jax.sampling import sampler, schedules

CONFIGS = ('mnist_m', 'mscmr')
LABELS = {'mnist_m': '(a) MNIST-M pixel 32x32x3', 'mscmr': '(b) cardiac latent 32x32x4 (128^2 images)'}
SUMMARY_CASE = ('mscmr', 16)  # the config and batch of the one-line summary
IMPLS = ('scan', 'loop', 'torch')  # torch: one implementation per OpenMP policy (--omp-policies)
JAX_IMPLS = ('scan', 'loop')
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
  # The paper's denoiser and loop (eq. 7: the latent alone, blending every step), which the torch mirrors
  # implement and the recorded results (RESULTS.md) timed; label channels would add K - 1 input channels.
  cfg.diffusion.mask_condition = 'none'
  cfg.sampling.blend_until = 1.0
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


def _init_fn(case: Case):
  h, w, c = case.latent
  return lambda k: case.model.init(k, jnp.zeros((1, h, w, c)), jnp.zeros((1,), jnp.int32),
                                   jnp.zeros((1, case.model.cond_dim)), jnp.zeros((1,), bool))['params']


def init_params(case: Case, seed: int = 0):
  """Random weights (common.host_params: every leaf non-zero, the zero-initialised output conv too)."""
  return common.host_params(_init_fn(case), seed)


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
  def draw(key):  # one program: drawn op by op, the steps' tiny compilations took seconds on a busy CPU
    key_init, key_steps = jax.random.split(key)
    seg_key = lambda i: jax.random.split(jax.random.fold_in(key_steps, i))[1]
    seg = jax.vmap(lambda i: jax.random.normal(seg_key(i), shape, jnp.float32))(jnp.arange(case.settings.num_steps))
    return jax.random.normal(key_init, shape, jnp.float32), seg

  x_t, seg = jax.jit(draw)(key)
  return np.asarray(x_t), np.asarray(seg)


# --- PyTorch reference (benchmarks/torch_side.py) -----------------------------------------------------------

def torch_meta(case: Case, params) -> dict[str, Any]:
  """What the torch reference of `case` needs besides the weights and the schedule, as JSON values."""
  from benchmarks import torch_mirror

  s = case.settings
  settings = {k: getattr(s, k) for k in ('num_steps', 'eta', 'guidance_scale', 'blend_mode', 'blend_until',
                                         'clip_x0', 'prediction_type') if hasattr(s, k)}
  return {'arch': torch_mirror.architecture(case.model, case.latent[-1]), 'num_params': common.param_count(params),
          'settings': settings}


def torch_reference(case: Case, params, device: str | None = None):
  """(torch CondUNet with our weights, diffusers DDIMScheduler matching our schedule and DDIM timesteps)."""
  from benchmarks import torch_side

  timesteps, _ = schedules.ddim_timesteps(len(case.alphas_cumprod), case.settings.num_steps)
  return torch_side.sampler_reference(torch_meta(case, params), jax.tree.map(np.asarray, params),
                                      case.alphas_cumprod, timesteps, device or common.torch_device())


def torch_sample(net, sched, settings: sampler.SamplerSettings, region, mask, z_dom, x_t=None,
                 seg_noise=None):
  """Blended DDIM in PyTorch (torch_side.sample with our settings)."""
  from benchmarks import torch_side

  return torch_side.sample(net, sched, dataclasses.asdict(settings), region, mask, z_dom, x_t, seg_noise)


def _nchw(a, device):
  from benchmarks import torch_side

  return torch_side.nchw(a, device)


def check_equivalence(case: Case, params, net, sched, scan_fn, batch: int,
                      tol: float | None = None) -> dict[str, float]:
  """Max |torch - jax| relative to max |jax|: the UNet's eps (batch 2, one row dropped to the null condition)
  and the whole sampler at `batch` (scan_fn compiled for it) fed identical noise. AssertionError above tol.
  Both checks run in float32 (the weights and the arithmetic); for a bfloat16 case the eps check uses the
  float32 twin of the model and the sampler check is skipped (bfloat16 rounding differs between stacks)."""
  import torch

  tol = common.equivalence_tolerance() if tol is None else tol
  dev = next(net.parameters()).device.type
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


# --- the JAX implementations of one case -------------------------------------------------------------------

def jax_runs(case: Case, params, host: dict[str, np.ndarray], batch: int, impls,
             step_flops: bool = True) -> dict[str, Any]:
  """The timed callables of the JAX implementations in `impls` (scan, loop) on `host` inputs, with their
  compile times, the FLOPs of one step (lowering the loop's step: skipped when neither the loop runs nor
  `step_flops`) and the scan's own cost analysis; 'compiled': the AOT scan (or None)."""
  scan_jit, loop = jax_samplers(case)
  inputs = {k: jnp.asarray(v) for k, v in host.items()}
  args = (params, jax.random.key(batch), inputs['region'], inputs['mask'], inputs['z_dom'])
  out = {'runs': {}, 'compile_s': {}, 'scan_flops': None, 'compiled': None}
  if 'scan' in impls:
    t0 = time.perf_counter()
    lowered = scan_jit.lower(*args)
    compiled = lowered.compile()
    out['compile_s']['scan'] = time.perf_counter() - t0
    out['scan_flops'], out['compiled'] = common.xla_flops(lowered), compiled
    out['runs']['scan'] = lambda: compiled(*args).block_until_ready()
  out['flops'] = None
  if 'loop' in impls or step_flops:
    t0 = time.perf_counter()
    step = lower_step(loop, params, inputs)  # its cost analysis gives the FLOPs of one step
    out['flops'] = common.xla_flops(step)
  if 'loop' in impls:
    step.compile()  # only to report the loop's compile time
    out['compile_s']['loop'] = time.perf_counter() - t0
    out['runs']['loop'] = lambda: loop(params, case.alphas_cumprod, *args[1:])[0].block_until_ready()
  return out


def check_loop(config: str, dtype: str, loop_out, scan_out) -> float:
  """Max |loop - scan| / max |scan| of the samples (same keys, same steps); AssertionError above 1e-4 in
  float32, 5e-2 in bfloat16 (fusion-dependent rounding)."""
  loop_out, scan_out = np.asarray(loop_out, np.float32), np.asarray(scan_out, np.float32)
  err = float(np.max(np.abs(loop_out - scan_out)) / np.max(np.abs(scan_out)))
  if not err <= (1e-4 if dtype == 'float32' else 5e-2):
    raise AssertionError(f'{config}: loop sampler differs from the scan sampler: rel err {err:.2e}')
  return err


def _flop_columns(case: Case, batch: int, name: str, flops, scan_flops) -> dict[str, Any]:
  return {'step_gflop': flops / 1e9 if flops else None,
          'gflop_per_image': flops * case.settings.num_steps / batch / 1e9 if flops else None,
          'scan_cost_gflop': scan_flops / 1e9 if (scan_flops and name == 'scan') else None}


# --- the separate-process method (default) ------------------------------------------------------------------

def check_worker(spec: dict[str, Any]) -> dict[str, Any]:
  """The check process (JAX and PyTorch): per config, draws the weights and every batch's inputs into an .npz
  for the timing processes, then checks the torch reference built from that .npz against ours."""
  with_torch = spec['with_torch']
  device = common.torch_device() if with_torch else None
  out = {'backend': jax.default_backend(), 'torch_device': device, 'env': common.jax_environment(),
         'checks': {}, 'cases': {}}
  for name in spec['configs']:
    case = make_case(name, spec['steps'], spec['quick'], spec['dtype'])
    params = init_params(case)
    timesteps, _ = schedules.ddim_timesteps(len(case.alphas_cumprod), case.settings.num_steps)
    arrays = {**measure.flatten(params, 'params/'), 'alphas_cumprod': np.asarray(case.alphas_cumprod, np.float32),
              'timesteps': timesteps}
    for batch in spec['batches']:
      arrays.update({f'inputs/{batch}/{k}': v for k, v in make_inputs(case, batch).items()})
    path = os.path.join(spec['dir'], f'sampler_{name}.npz')
    np.savez(path, **arrays)
    out['cases'][name] = {'npz': path}
    if with_torch:
      from benchmarks import torch_side

      meta = out['cases'][name]['meta'] = torch_meta(case, params)
      loaded = measure.load_npz(path)  # what the torch timing processes load
      net, sched = torch_side.sampler_reference(meta, measure.unflatten(loaded, 'params/'), loaded['alphas_cumprod'],
                                                loaded['timesteps'], device)
      out['checks'][name] = check_equivalence(case, params, net, sched, jax_samplers(case)[0],
                                              spec['batches'][0])
  return out


def jax_worker(spec: dict[str, Any]) -> dict[str, Any]:
  """A JAX timing process: one implementation (scan or loop) of one (config, batch), weights and inputs from
  the check process's .npz; saves its warm-up samples to spec['output'] (the parent compares loop and scan)."""
  case = make_case(spec['config'], spec['steps'], spec['quick'], spec['dtype'])
  arrays = measure.load_npz(spec['npz'])
  params = jax.tree.map(jnp.asarray, measure.unflatten(arrays, 'params/'))
  batch, impl = spec['batch'], spec['impl']
  host = {k: arrays[f'inputs/{batch}/{k}'] for k in ('region', 'mask', 'z_dom')}
  jx = jax_runs(case, params, host, batch, (impl,), spec.get('step_flops', True))
  (m,) = measure.measure(jx['runs'], batch, spec['repeats'], device_peak=lambda _: common.device_peak_bytes()).values()
  np.save(spec['output'], np.asarray(m.output))
  row = {**m.row(), 'compile_s': jx['compile_s'].get(impl),
         **_flop_columns(case, batch, impl, jx['flops'], jx['scan_flops'])}
  return {'row': row, 'env': common.jax_environment()}


def run_separate(configs: tuple[str, ...], batches: tuple[int, ...], steps: int, repeats: int, quick: bool,
                 with_torch: bool, matmul_n: int | None, dtype: str = 'float32', impls: tuple[str, ...] = IMPLS,
                 policies: tuple[str, ...] = common.OMP_POLICIES, work_dir: str | None = None) -> dict[str, Any]:
  """The benchmark with one process per (case, implementation) (benchmarks/worker.py); returns {'method',
  'env', 'ceiling', 'rows', 'checks', 'processes', 'summary'}. This process starts no JAX backend."""
  with_torch = with_torch and 'torch' in impls and common.importable('torch', 'diffusers')
  base = {'harness': 'sampler', 'steps': steps, 'quick': quick, 'dtype': dtype, 'repeats': repeats}
  rows, torch_env = [], None
  with worker.Session(work_dir) as session:
    check = session.spawn('check', {**base, 'role': 'check', 'configs': list(configs), 'batches': list(batches),
                                    'with_torch': with_torch, 'dir': session.dir})
    checks = check['checks']
    n = common.resolve_matmul_n(matmul_n, quick, check['backend'])
    session.spawn('numpy', {'role': 'numpy', 'matmul_n': n})
    for name in configs:
      info = check['cases'][name]
      case_spec = {**base, 'config': name, 'npz': info['npz'], 'matmul_n': n}
      for batch in batches:
        case_rows, outputs = [], {}
        for impl in (i for i in JAX_IMPLS if i in impls):
          outputs[impl] = session.path(f'{name}_b{batch}_{impl}.npy')
          out = session.spawn(f'{name}_b{batch}_{impl}', {**case_spec, 'role': 'jax', 'impl': impl, 'batch': batch,
                                                           'output': outputs[impl],
                                                           'step_flops': 'loop' not in impls})
          case_rows.append({'config': name, 'dtype': dtype, 'batch': batch, 'impl': impl, **common.worker_row(out)})
        for policy in policies if with_torch else ():
          impl = f'torch_{policy}'
          out = session.spawn(f'{name}_b{batch}_{impl}', {**case_spec, 'role': 'torch', 'impl': impl, 'batch': batch,
                                                           'meta': info['meta'], 'torch_device': check['torch_device']},
                              worker.torch_env(policy))
          torch_env = torch_env or common.shared_torch_env(out)
          case_rows.append({'config': name, 'dtype': dtype, 'batch': batch, 'impl': impl, **common.worker_row(out)})
        if 'loop' in outputs:
          err = check_loop(name, dtype, np.load(outputs['loop']), np.load(outputs['scan']))
          c = checks.setdefault(name, {})
          c['loop_rel_err'] = max(err, c.get('loop_rel_err', 0.0))
        common.progress_line(f'{name} batch {batch}', case_rows)
        rows += case_rows
    result = {'method': common.BASELINES[False],
              'env': {**measure.host_environment(), **check['env'], 'torch': torch_env},
              'ceiling': common.ceilings(session.processes, n, dtype), 'rows': rows, 'checks': checks,
              'processes': session.processes}
  common.finish_rows(rows, ('config', 'batch'), result['ceiling']['best_gflop_s'])
  result['summary'] = summary(rows)
  return result


# --- the in-process method (--same-process) ----------------------------------------------------------------

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
  host = make_inputs(case, batch)
  jx = jax_runs(case, params, host, batch, ('scan',) + tuple(i for i in impls if i == 'loop'))
  runs, compile_s = jx['runs'], jx['compile_s']
  checks = {}
  if reference is not None:
    net, sched = reference
    if check:
      checks = check_equivalence(case, params, net, sched, jx['compiled'], batch)
    import torch
    dev = common.torch_device()
    targs = (_nchw(host['region'], dev), _nchw(host['mask'], dev), torch.from_numpy(host['z_dom']).to(dev))
    dtype = jnp.dtype(case.model.dtype).name

    def run_torch():
      with common.torch_autocast(dtype):
        return torch_sample(net, sched, case.settings, *targs)

    runs['torch'] = run_torch
  results = common.measure(runs, batch, repeats)
  dtype = jnp.dtype(case.model.dtype).name
  if 'loop' in results:  # same keys, same steps: the same samples
    check_loop(case.name, dtype, results['loop'].output, results['scan'].output)
  rows = []
  for name, m in results.items():
    flop_cols = _flop_columns(case, batch, name, jx['flops'], jx['scan_flops'])
    per_image = flop_cols.pop('gflop_per_image')
    gflops = per_image * m.timing.images_per_second()[0] if per_image else None
    rows.append({'config': case.name, 'dtype': jnp.dtype(case.model.dtype).name, 'batch': batch, 'impl': name,
                 **m.row(), 'compile_s': compile_s.get(name),
                 'gflop_s': gflops, 'frac_of_matmul': common.ratio(gflops, ceiling_gflops), **flop_cols})
  return rows, checks


def run(configs: tuple[str, ...], batches: tuple[int, ...], steps: int, repeats: int, quick: bool,
        with_torch: bool, matmul_n: int, dtype: str = 'float32', impls: tuple[str, ...] = IMPLS) -> dict[str, Any]:
  """The in-process benchmark (--same-process); returns {'method', 'env', 'ceiling', 'rows', 'checks',
  'summary'}. The matmul ceiling is measured in `dtype` (the UNet's compute dtype)."""
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


# --- summary and command line ------------------------------------------------------------------------------

def summary(rows: list[dict[str, Any]], baseline: str = common.BASELINES[False]) -> dict[str, Any]:
  """At SUMMARY_CASE (else the last measured case): sampler_vs_torch (scan / the best torch policy),
  scan_vs_loop, matmul_frac (scan's fraction of JAX's matmul ceiling), and with separate processes
  rss_vs_torch (scan process peak RSS / that torch process's) and torch_policy; None where not measured."""
  name, batch = SUMMARY_CASE
  sel = {r['impl']: r for r in rows if r['config'] == name and r['batch'] == batch}
  if not sel and rows:  # quick / partial runs: fall back to the last measured config and batch
    last = rows[-1]
    sel = {r['impl']: r for r in rows if r['config'] == last['config'] and r['batch'] == last['batch']}
  get = lambda impl, key: sel.get(impl, {}).get(key)
  best = common.best_torch(list(sel.values())) or {}
  values = {'sampler_vs_torch': common.ratio(get('scan', 'img_s'), best.get('img_s')),
            'scan_vs_loop': common.ratio(get('scan', 'img_s'), get('loop', 'img_s')),
            'matmul_frac': get('scan', 'frac_of_matmul')}
  if baseline == common.BASELINES[False]:
    values['rss_vs_torch'] = common.ratio(get('scan', 'peak_rss_MiB'), best.get('peak_rss_MiB'))
    values['torch_policy'] = best['impl'].removeprefix('torch_') if best else None
  values['baseline'] = baseline
  return values


COLUMNS = ('config', 'dtype', 'batch', 'impl', 'img_s', 'img_s_range', 'vs_torch', 'compile_s', 'first_call_s',
           'peak_rss_MiB', 'rss_delta_MiB', 'device_peak_MiB', 'gflop_s', 'matmul_gflop_s', 'frac_of_matmul',
           'frac_of_best_matmul')
SAME_PROCESS_COLUMNS = ('config', 'dtype', 'batch', 'impl', 'img_s', 'img_s_range', 'compile_s', 'first_call_s',
                        'peak_rss_MiB', 'rss_delta_MiB', 'device_peak_MiB', 'gflop_s', 'frac_of_matmul')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--configs', default=','.join(CONFIGS), help='comma-separated subset of mnist_m,mscmr')
  p.add_argument('--batches', default=None, help='comma-separated batch sizes (default 1,16,64; --quick: 2)')
  p.add_argument('--steps', type=int, default=None, help='DDIM steps (default 50; --quick: 2)')
  p.add_argument('--impls', default=','.join(IMPLS), help='comma-separated subset of scan,loop,torch')
  common.add_harness_args(p)
  return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  configs, impls = common.names(args.configs, CONFIGS, 'configs'), common.names(args.impls, IMPLS, 'impls')
  if 'scan' not in impls:
    raise SystemExit('error: --impls must include scan (the sampler every other one is compared with)')
  policies = common.omp_policies(args)
  # --quick: tiny network, 8x8 latents, batch 2, 2 steps, 2 runs (each unless given)
  batches = tuple(int(b) for b in (args.batches or ('2' if args.quick else '1,16,64')).split(','))
  steps = args.steps or (2 if args.quick else 50)
  repeats = args.repeats or (2 if args.quick else 5)
  if args.same_process:
    common.prepare_process()  # before torch is imported
    result = run(configs, batches, steps, repeats, args.quick, not args.no_torch, common.matmul_n(args), args.dtype,
                 impls)
    common.report(result, SAME_PROCESS_COLUMNS, 'torch reference', args.json)
  else:
    result = run_separate(configs, batches, steps, repeats, args.quick, not args.no_torch, args.matmul_n, args.dtype,
                          impls, policies, args.work_dir)
    common.report(result, COLUMNS, 'torch reference', args.json)
  return result


if __name__ == '__main__':
  main()
