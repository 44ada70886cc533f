"""The PyTorch references of both harnesses, importable without JAX.

The same code builds the reference in the equivalence check (a process with both frameworks) and in the
PyTorch timing processes (benchmarks/worker.py; no JAX there): a mirror from `torch_mirror.architecture`
(plain values) with the weights from an .npz file the check process wrote, so what is timed is what was
checked.

  sampler  the CondUNet mirror stepped by diffusers' DDIMScheduler ('trailing' spacing, our alphas_cumprod)
           with the same hard blending as ours;
  trainer  forward, loss, backward, clip_grad_norm_, AdamW, EMA of one training step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from benchmarks import measure, torch_mirror


def sync(device: str, out=None):
  """Block until torch work is done (CUDA is asynchronous; CPU eager is not)."""
  if device == 'cuda':
    torch.cuda.synchronize()
  return out


def autocast(device: str, dtype: str):
  """The torch counterpart of our compute dtype: autocast to bfloat16 (params stay float32), else nothing."""
  if dtype == 'float32':
    return contextlib.nullcontext()
  return torch.autocast(device_type=device, dtype=getattr(torch, dtype))


def matmul_gflops(n: int, device: str, dtype: str = 'float32', repeats: int = 5) -> float:
  """Best-of-`repeats` GFLOP/s of torch.mm on [n, n] in `dtype`: PyTorch's dense-compute ceiling here."""
  a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
  b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
  return measure.matmul_gflops(n, measure.best_seconds(lambda: sync(device, torch.mm(a, b)), repeats))


def environment(device: str) -> dict[str, Any]:
  try:
    import diffusers
    diffusers_version = diffusers.__version__
  except ImportError:
    diffusers_version = None
  return {'torch': torch.__version__, 'torch_threads': torch.get_num_threads(), 'torch_device': device,
          'OMP_WAIT_POLICY': os.environ.get('OMP_WAIT_POLICY'), 'mkldnn': torch.backends.mkldnn.is_available(),
          'diffusers': diffusers_version}


def nchw(a, device: str) -> torch.Tensor:
  """A float32 NHWC numpy array as an NCHW tensor (arrays of fewer than 4 dims as they are)."""
  a = np.asarray(a, np.float32)
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, -3) if a.ndim >= 4 else a)).to(device)


def mirror(arch: Mapping[str, Any], params: Mapping[str, Any], num_params: int) -> torch_mirror._Mirror:
  """The torch mirror of `arch` with the linen weights `params` (numpy tree) copied in."""
  net = torch_mirror.from_architecture(arch)
  net.load_flax(params)
  if torch_mirror.count_params(net) != num_params:
    raise AssertionError(f"torch mirror and linen {arch['kind']} differ in parameter count")
  return net


# --- sampler -----------------------------------------------------------------------------------------------

def sampler_reference(meta: Mapping[str, Any], params: Mapping[str, Any], alphas_cumprod: np.ndarray,
                      timesteps: np.ndarray, device: str):
  """(torch CondUNet with our weights, diffusers DDIMScheduler matching our schedule and DDIM timesteps).

  meta: {'arch', 'num_params', 'settings'} (see benchmarks/sampler.py:torch_meta); timesteps: ours."""
  import diffusers

  s = meta['settings']
  if (s['blend_mode'] != 'hard' or s['guidance_scale'] != 1.0 or s['eta'] != 0.0
      or s.get('prediction_type', 'epsilon') != 'epsilon' or s.get('clip_x0') is not None):
    raise ValueError('the torch reference implements hard blending, guidance_scale=1, eta=0, eps prediction and '
                     'no x0 clipping (the configs)')
  net = mirror(meta['arch'], params, meta['num_params']).eval().to(device)
  sched = diffusers.DDIMScheduler(num_train_timesteps=len(alphas_cumprod), beta_schedule='linear',
                                  clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                  timestep_spacing='trailing', prediction_type='epsilon')
  sched.alphas_cumprod = torch.from_numpy(np.asarray(alphas_cumprod, np.float32))  # exactly ours
  sched.set_timesteps(s['num_steps'])
  if not np.array_equal(sched.timesteps.numpy(), np.asarray(timesteps)):
    raise AssertionError('diffusers trailing DDIM timesteps differ from schedules.ddim_timesteps')
  return net, sched


def sample(net, sched, settings: Mapping[str, Any], region, mask, z_dom, x_t=None, seg_noise=None):
  """Blended DDIM in PyTorch (NCHW): diffusers' DDIMScheduler.step, then hard blending with the noised region.

  region [B,C,h,w], mask [B,1,h,w], z_dom [B,D]; x_t / seg_noise [S,B,C,h,w] optional fixed noise.
  """
  b = region.shape[0]
  device = region.device
  drop = torch.zeros(b, dtype=torch.bool, device=device)
  x = torch.randn_like(region) if x_t is None else x_t
  t_stride = sched.config.num_train_timesteps // sched.num_inference_steps
  with torch.inference_mode():
    for i, t in enumerate(sched.timesteps):
      eps = net(x, t.to(device).expand(b), z_dom, drop)
      x_dom = sched.step(eps, t, x, eta=settings['eta']).prev_sample
      if i < settings['blend_until'] * settings['num_steps']:
        t_prev = int(t) - t_stride
        a_prev = sched.alphas_cumprod[t_prev] if t_prev >= 0 else sched.final_alpha_cumprod
        a_prev = a_prev.to(device)
        noise = torch.randn_like(x) if seg_noise is None else seg_noise[i]
        x_seg = a_prev.sqrt() * region + (1.0 - a_prev).sqrt() * noise
        x = x_dom * (1.0 - mask) + x_seg * mask
      else:
        x = x_dom
  return sync(device.type, x)


# --- training step -----------------------------------------------------------------------------------------

class TorchTrainer:
  """The PyTorch counterpart of one step: forward, loss, backward, clip, AdamW, EMA.

  meta: {'network', 'arch', 'num_params', 'learning_rate', 'ema_decay', 'grad_clip', 'weight_decay', and the
  loss's 'beta', 'seg_weight' (teacher) or 'cond_dropout' (diffusion)} (see train_step.torch_meta);
  alphas_cumprod: the diffusion schedule (diffusion only)."""

  def __init__(self, meta: Mapping[str, Any], params: Mapping[str, Any], device: str, dtype: str = 'float32',
               alphas_cumprod: np.ndarray | None = None):
    self.torch, self.meta, self.device = torch, dict(meta), device
    self.name = meta['network']
    if self.name == 'diffusion':
      self.alphas = torch.from_numpy(np.asarray(alphas_cumprod, np.float32)).to(device)
    self.module = mirror(meta['arch'], params, meta['num_params']).to(device).train()
    self.params = list(self.module.parameters())
    self.ema = [p.detach().clone() for p in self.params]
    self.ema_decay = float(meta['ema_decay'])
    self.grad_clip = float(meta['grad_clip'] or 0.0)
    self.opt = torch.optim.AdamW(self.params, lr=meta['learning_rate'], betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=float(meta['weight_decay']))
    self.num_steps = 0
    self.dtype = dtype  # forward and loss under torch.autocast to it (our compute dtype)

  def to_torch(self, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
      v = np.asarray(v)
      if v.ndim == 4:
        v = np.ascontiguousarray(np.moveaxis(v, -1, 1))
      out[k] = torch.from_numpy(v.astype(np.int64) if v.dtype == np.int32 else v).to(self.device)
    return out

  def loss(self, batch: dict[str, Any], fixed: dict[str, Any] | None = None):
    """The step's loss; `fixed` (t, noise, drop) and posterior means make it deterministic for the check."""
    m = torch_mirror
    if self.name == 'teacher':
      out = self.module(batch['image'], sample=fixed is None)
      return m.teacher_loss(out, batch['image'], batch['label'], self.meta['beta'], self.meta['seg_weight'])
    if self.name == 'diffusion':
      x0 = batch['latent']
      b = x0.shape[0]
      if fixed is None:
        fixed = {'t': torch.randint(0, len(self.alphas), (b,), device=self.device), 'noise': torch.randn_like(x0),
                 'drop': torch.rand(b, device=self.device) < self.meta['cond_dropout']}
      a = self.alphas[fixed['t']][:, None, None, None]
      x_t = a.sqrt() * x0 + (1 - a).sqrt() * fixed['noise']
      eps = self.module(x_t, fixed['t'], batch['z_dom'], fixed['drop'])
      return (fixed['noise'] - eps).square().mean()
    return m.ce_dice(self.module(batch['image']), batch['label'])

  def step(self, batch: dict[str, Any]):
    self.opt.zero_grad(set_to_none=True)
    with autocast(self.device, self.dtype):
      loss = self.loss(batch)
    loss.backward()
    if self.grad_clip:
      torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
    self.opt.step()
    with torch.no_grad():
      decay = min(self.ema_decay, (1.0 + self.num_steps) / (10.0 + self.num_steps))
      torch._foreach_lerp_(self.ema, self.params, 1.0 - decay)
    self.num_steps += 1
    return sync(self.device, loss)


# --- the timing process ------------------------------------------------------------------------------------

def time_runs(runs, images: int, repeats: int, device: str) -> measure.Measurement:
  """`measure.measure` of the one implementation in `runs`, with torch's CUDA peak memory on GPU."""
  cuda = device == 'cuda'
  before = (lambda _: torch.cuda.reset_peak_memory_stats()) if cuda else None
  peak = (lambda _: torch.cuda.max_memory_allocated()) if cuda else None
  (m,) = measure.measure(runs, images, repeats, before, peak).values()
  return m


def sampler_worker(spec: Mapping[str, Any]) -> dict[str, Any]:
  """Times the torch sampler of one (config, batch) case: spec from benchmarks/sampler.py:run_separate."""
  device, dtype = spec['torch_device'], spec['dtype']
  meta = spec['meta']
  arrays = measure.load_npz(spec['npz'])
  net, sched = sampler_reference(meta, measure.unflatten(arrays, 'params/'), arrays['alphas_cumprod'],
                                 arrays['timesteps'], device)
  batch = spec['batch']
  targs = tuple(nchw(arrays[f'inputs/{batch}/{k}'], device) for k in ('region', 'mask'))
  targs += (torch.from_numpy(arrays[f'inputs/{batch}/z_dom']).to(device),)

  def run():
    with autocast(device, dtype):
      return sample(net, sched, meta['settings'], *targs)

  m = time_runs({'torch': run}, batch, spec['repeats'], device)
  return {'row': m.row(), 'env': environment(device)}


def train_worker(spec: Mapping[str, Any]) -> dict[str, Any]:
  """Times the torch training step of one (config, network, batch) case: spec from train_step.run_separate."""
  device, dtype = spec['torch_device'], spec['dtype']
  arrays = measure.load_npz(spec['npz'])
  trainer = TorchTrainer(spec['meta'], measure.unflatten(arrays, 'params/'), device, dtype,
                         arrays.get('alphas_cumprod'))
  batch_size, steps = spec['batch'], spec['steps_per_run']
  tbatch = trainer.to_torch(measure.unflatten(arrays, f'batch/{batch_size}/'))

  def run():
    for _ in range(steps):
      trainer.step(tbatch)

  m = time_runs({'torch': run}, batch_size * steps, spec['repeats'], device)
  return {'row': m.row(), 'env': environment(device)}
