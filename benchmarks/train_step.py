"""Training-step throughput of each trained network: ours (the stage's step function, jitted) vs PyTorch.

  python -m benchmarks.train_step                    # both configs, batch 16/64, 5 timed runs of 3 steps
  python -m benchmarks.train_step --quick            # tiny networks, seconds (what the smoke test runs)
  python -m benchmarks.train_step --configs=mscmr --batches=16 --networks=diffusion

Networks (sizes from configs/mnist_m.py and configs/mscmr.py), each the stage's own task declaration:
  teacher    FFD-VAE teacher (stages/teacher.task): CE + Dice + L2 reconstruction + beta KL;
  diffusion  eps-prediction UNet (stages/diffusion.task) on the config's latents + z_dom;
  segment    segmentation UNet (stages/segment.task): CE + Dice.
Ours: the task's `loss_fn` through the generic `train.task.train_step` under jax.jit with the state donated,
TrainState with the task's optimiser (AdamW from train/state.make_optimizer: global-norm clipping,
warm-up/cosine schedule, weight decay) and EMA, exactly what the training loop compiles (single device).
PyTorch: the same architecture (benchmarks/torch_mirror.py) with our initial weights copied in,
torch.optim.AdamW (same betas/eps/weight decay), clip_grad_norm_ and an EMA update (constant learning rate: a
schedule costs nothing measurable). Before timing, the loss and the gradient norm of both are checked equal on
one batch (posterior means instead of samples for the FFD-VAE).
The last printed line is `train_vs_torch=...`: the geometric mean over the networks of ours/torch images/s
for config (b) mscmr, batch 16.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from benchmarks.sampler import case_config
from diffuseg_jax.config_files import load_config
from diffuseg_jax.data import DataSpec
from diffuseg_jax.sampling import schedules
from diffuseg_jax.stages import diffusion, segment, teacher
from diffuseg_jax.train.state import TrainState
from diffuseg_jax.train.task import Task, train_step

CONFIGS = ('mnist_m', 'mscmr')
NETWORKS = ('teacher', 'diffusion', 'segment')
SUMMARY_CASE = ('mscmr', 16)
DATA = {'mnist_m': {'channels': 3, 'num_classes': 2}, 'mscmr': {'channels': 1, 'num_classes': 4}}


@dataclasses.dataclass
class Net:
  """One network of one config: the pipeline's task for it, initial params, hyper-parameters."""

  name: str
  task: Task
  params: Any
  learning_rate: float  # the torch mirror's (constant) learning rate: the peak of ours
  image: tuple[int, int, int]  # [H, W, C] of the network input (latent shape for diffusion)
  num_classes: int
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def model(self):
    return self.task.model


def make_net(config: str, network: str, quick: bool = False, dtype: str = 'float32') -> Net:
  """`dtype`: the network's compute dtype (train.compute_dtype); params (and the initial values) are the same
  float32 ones for every dtype."""
  if network not in NETWORKS:
    raise ValueError(f'unknown network {network!r}; choose from {NETWORKS}')
  cfg, latent = case_config(config, quick)
  cfg.train.compute_dtype = dtype
  size = 16 if quick else int(cfg.data.image_size)
  spec = DataSpec((size, size), DATA[config]['channels'], DATA[config]['num_classes'])
  extra = {}
  if network == 'teacher':
    if quick:
      cfg.vae.base_channels = 8
    task, image, lr = teacher.task(cfg, spec), spec.image_shape, cfg.vae.learning_rate
    extra = {'vae': cfg.vae, 'beta': float(cfg.vae.beta), 'seg_weight': float(cfg.vae.seg_weight)}
  elif network == 'diffusion':
    task, image, lr = diffusion.task(cfg, latent), latent, cfg.diffusion.learning_rate
    d = cfg.diffusion
    extra = {'alphas_cumprod': schedules.make_schedule(d.schedule, d.num_timesteps, d.beta_start,
                                                       d.beta_end).alphas_cumprod,
             'cond_dropout': float(d.cond_dropout)}
  else:
    if quick:
      cfg.segmentation.base_channels = 4
      cfg.segmentation.levels = 2
    task, image, lr = segment.task(cfg, spec, 'transfer', 0), spec.image_shape, cfg.segmentation.learning_rate
  return Net(network, task, common.host_params(task.init_params), float(lr), image, spec.num_classes, extra)


def make_batch(net: Net, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  h, w, c = net.image
  if net.name == 'diffusion':
    return {'latent': rng.standard_normal((batch, h, w, c)).astype(np.float32),
            'z_dom': rng.standard_normal((batch, net.model.cond_dim)).astype(np.float32)}
  return {'image': rng.uniform(-1, 1, (batch, h, w, c)).astype(np.float32),
          'label': rng.integers(0, net.num_classes, (batch, h, w)).astype(np.int32)}


# --- ours --------------------------------------------------------------------------------------------------

def jax_train(net: Net, train_config):
  """(state, jitted step with the state donated), as the training loop compiles the task on one device. The
  state owns copies of net.params: donation deletes the state's buffers (on GPUs; XLA CPU ignores donation)."""
  del train_config  # the task carries its optimiser and EMA decay
  params = jax.tree.map(jnp.copy, net.params)
  state = jax.device_put(TrainState.create(params, net.task.optimizer, net.task.ema_decay))
  return state, jax.jit(functools.partial(train_step, net.task.loss_fn), donate_argnums=0)


def jax_loss(net: Net, params, batch: dict[str, jax.Array], fixed: dict[str, jax.Array]) -> jax.Array:
  """The task's loss with its randomness fixed (t, noise, drop from `fixed`; FFD-VAE posterior means)."""
  if net.name == 'teacher':
    return teacher.loss_fn(net.model, net.extra['vae'], params, batch, jax.random.key(0), None, sample=False)[0]
  if net.name == 'diffusion':
    return diffusion.denoising_loss(net.model, jnp.asarray(net.extra['alphas_cumprod']), params,
                                    batch['latent'], batch['z_dom'], fixed['t'], fixed['noise'], fixed['drop'])
  return segment.loss_fn(net.model, params, batch, None, None)[0]


# --- PyTorch -----------------------------------------------------------------------------------------------

class TorchTrainer:
  """The PyTorch counterpart of one step: forward, loss, backward, clip, AdamW, EMA."""

  def __init__(self, net: Net, train_config, dtype: str = 'float32'):
    import torch

    from benchmarks import torch_mirror

    self.torch, self.net = torch, net
    self.device = common.torch_device()
    h, w, c = net.image
    if net.name == 'teacher':
      module = torch_mirror.ffd_vae_from_linen(net.model)
    elif net.name == 'diffusion':
      module = torch_mirror.cond_unet_from_linen(net.model, c)
      self.alphas = torch.from_numpy(np.asarray(net.extra['alphas_cumprod'], np.float32)).to(self.device)
    else:
      module = torch_mirror.seg_unet_from_linen(net.model, c)
    module.load_flax(jax.tree.map(np.asarray, net.params))
    if torch_mirror.count_params(module) != common.param_count(net.params):
      raise AssertionError(f'{net.name}: torch mirror and linen module differ in parameter count')
    self.module = module.to(self.device).train()
    self.mirror = torch_mirror
    self.params = [p for p in module.parameters()]
    self.ema = [p.detach().clone() for p in self.params]
    self.ema_decay = float(train_config.ema_decay)
    self.grad_clip = float(train_config.grad_clip or 0.0)
    self.opt = torch.optim.AdamW(self.params, lr=net.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=float(train_config.weight_decay))
    self.num_steps = 0
    self.dtype = dtype  # forward and loss under torch.autocast to it (our compute dtype)

  def to_torch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    t = self.torch
    out = {}
    for k, v in batch.items():
      v = np.asarray(v)
      if v.ndim == 4:
        v = np.ascontiguousarray(np.moveaxis(v, -1, 1))
      out[k] = t.from_numpy(v.astype(np.int64) if v.dtype == np.int32 else v).to(self.device)
    return out

  def loss(self, batch: dict[str, Any], fixed: dict[str, Any] | None = None):
    """The step's loss; `fixed` (t, noise, drop) and posterior means make it deterministic for the check."""
    t, m = self.torch, self.mirror
    if self.net.name == 'teacher':
      out = self.module(batch['image'], sample=fixed is None)
      return m.teacher_loss(out, batch['image'], batch['label'], self.net.extra['beta'],
                            self.net.extra['seg_weight'])
    if self.net.name == 'diffusion':
      x0 = batch['latent']
      b = x0.shape[0]
      if fixed is None:
        fixed = {'t': t.randint(0, len(self.alphas), (b,), device=self.device), 'noise': t.randn_like(x0),
                 'drop': t.rand(b, device=self.device) < self.net.extra['cond_dropout']}
      a = self.alphas[fixed['t']][:, None, None, None]
      x_t = a.sqrt() * x0 + (1 - a).sqrt() * fixed['noise']
      eps = self.module(x_t, fixed['t'], batch['z_dom'], fixed['drop'])
      return (fixed['noise'] - eps).square().mean()
    return m.ce_dice(self.module(batch['image']), batch['label'])

  def step(self, batch: dict[str, Any]) -> float:
    t = self.torch
    self.opt.zero_grad(set_to_none=True)
    with common.torch_autocast(self.dtype):
      loss = self.loss(batch)
    loss.backward()
    if self.grad_clip:
      t.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
    self.opt.step()
    with t.no_grad():
      decay = min(self.ema_decay, (1.0 + self.num_steps) / (10.0 + self.num_steps))
      t._foreach_lerp_(self.ema, self.params, 1.0 - decay)
    self.num_steps += 1
    return common.torch_sync(loss)


def check_equivalence(net: Net, trainer: TorchTrainer, batch: dict[str, np.ndarray],
                      tol: float | None = None) -> dict[str, float]:
  """Relative |torch - jax| of the loss and of the global gradient norm on one batch; AssertionError > tol."""
  tol = common.equivalence_tolerance() if tol is None else tol
  torch = trainer.torch
  b = next(iter(batch.values())).shape[0]
  rng = np.random.default_rng(5)
  fixed = {}
  if net.name == 'diffusion':
    fixed = {'t': rng.integers(0, len(net.extra['alphas_cumprod']), b).astype(np.int32),
             'noise': rng.standard_normal(batch['latent'].shape).astype(np.float32),
             'drop': rng.random(b) < 0.5}
  loss, grads = jax.jit(jax.value_and_grad(lambda p, b, f: jax_loss(net, p, b, f)))(net.params, batch, fixed)
  tb = trainer.to_torch(batch)
  tfixed = trainer.to_torch(fixed) if fixed else None
  if tfixed:
    tfixed['drop'] = torch.from_numpy(fixed['drop']).to(trainer.device)
  trainer.module.zero_grad(set_to_none=True)
  tloss = trainer.loss(tb, fixed=tfixed if fixed else {})
  tloss.backward()
  tnorm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in trainer.params if p.grad is not None))
  trainer.module.zero_grad(set_to_none=True)
  jnorm = float(optax.tree.norm(grads))
  errs = {'loss_rel_err': abs(float(tloss.detach()) - float(loss)) / abs(float(loss)),
          'grad_norm_rel_err': abs(float(tnorm) - jnorm) / jnorm}
  for name, err in errs.items():
    if not err <= tol:
      raise AssertionError(f'{net.name}: torch step differs from ours: {name}={err:.2e} > {tol}')
  return errs


# --- the benchmark -----------------------------------------------------------------------------------------

def bench_net(config: str, network: str, batches: tuple[int, ...], repeats: int, steps_per_run: int,
              quick: bool, with_torch: bool, ceiling_gflops: float,
              dtype: str = 'float32') -> tuple[list[dict[str, Any]], dict]:
  """Rows (one per batch and implementation) and the equivalence errors of one network. The equivalence
  check runs in float32 (for a bfloat16 run: the float32 twin of both networks, same weights)."""
  train_config = load_config(config).train
  net = make_net(config, network, quick, dtype)
  trainer = TorchTrainer(net, train_config, dtype) if with_torch else None
  checks = {}
  if with_torch:
    net32 = net if dtype == 'float32' else make_net(config, network, quick)
    checks = check_equivalence(net32, TorchTrainer(net32, train_config) if net32 is not net else trainer,
                               make_batch(net, 2, seed=7))
  rows = []
  for batch_size in batches:
    rows += _bench_batch(config, net, trainer, train_config, batch_size, repeats, steps_per_run,
                         ceiling_gflops)
    common.progress_line(f'{config} {network} batch {batch_size}', rows[-2 if trainer else -1:])
  return rows, checks


def _bench_batch(config: str, net: Net, trainer: TorchTrainer | None, train_config, batch_size: int,
                 repeats: int, steps_per_run: int, ceiling_gflops: float) -> list[dict[str, Any]]:
  host = make_batch(net, batch_size)
  batch = {k: jnp.asarray(v) for k, v in host.items()}
  state, step = jax_train(net, train_config)
  rng = jax.random.key(0)
  t0 = time.perf_counter()
  lowered = step.lower(state, batch, rng, None)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  flops = common.xla_flops(lowered)
  holder = {'state': state}

  def run_jax():
    for _ in range(steps_per_run):
      holder['state'], metrics = compiled(holder['state'], batch, rng, None)
    jax.block_until_ready((holder['state'], metrics))

  runs = {'ours': run_jax}
  if trainer is not None:
    tbatch = trainer.to_torch(host)

    def run_torch():
      for _ in range(steps_per_run):
        trainer.step(tbatch)

    runs['torch'] = run_torch
  rows = []
  for name, m in common.measure(runs, batch_size * steps_per_run, repeats).items():
    med = m.timing.images_per_second()[0]
    gflops = flops / batch_size * med / 1e9 if flops else None
    rows.append({'config': config, 'network': net.name, 'dtype': jnp.dtype(net.model.dtype).name,
                 'batch': batch_size, 'impl': name, **m.row(),
                 'compile_s': compile_s if name == 'ours' else None, 'gflop_s': gflops,
                 'frac_of_matmul': common.ratio(gflops, ceiling_gflops),
                 'step_gflop': flops / 1e9 if flops else None})
  return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, float | None]:
  """train_vs_torch: geometric mean over networks of ours/torch images/s at SUMMARY_CASE."""
  config, batch = SUMMARY_CASE
  pick = [r for r in rows if r['config'] == config and r['batch'] == batch]
  if not pick and rows:
    pick = [r for r in rows if r['config'] == rows[-1]['config'] and r['batch'] == rows[-1]['batch']]
  rates = {}
  for r in pick:
    rates.setdefault(r['network'], {})[r['impl']] = r['img_s']
  ratios = [common.ratio(v.get('ours'), v.get('torch')) for v in rates.values()]
  ratios = [x for x in ratios if x]
  return {'train_vs_torch': math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None}


COLUMNS = ('config', 'network', 'dtype', 'batch', 'impl', 'img_s', 'img_s_range', 'compile_s', 'first_call_s',
           'peak_rss_MiB', 'rss_delta_MiB', 'device_peak_MiB', 'gflop_s', 'frac_of_matmul')


def run(configs, networks, batches, repeats, steps_per_run, quick, with_torch, matmul_n,
        dtype: str = 'float32') -> dict[str, Any]:
  torch = common.torch_or_none() if with_torch else None
  result = common.new_result(matmul_n, dtype, torch)
  for config in configs:
    for network in networks:
      rows, checks = bench_net(config, network, batches, repeats, steps_per_run, quick, torch is not None,
                               result['ceiling']['jax_gflop_s'], dtype)
      result['rows'] += rows
      result['checks'][f'{config}/{network}'] = checks
  return common.finish_result(result, summary)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--configs', default=','.join(CONFIGS))
  p.add_argument('--networks', default=','.join(NETWORKS))
  p.add_argument('--batches', default='16,64')
  p.add_argument('--steps-per-run', type=int, default=3, help='training steps per timed run')
  common.add_harness_args(p)
  return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
  common.prepare_process()
  args = parse_args(argv)
  configs = common.names(args.configs, CONFIGS, 'configs')
  networks = common.names(args.networks, NETWORKS, 'networks')
  batches, repeats, steps_per_run = tuple(int(b) for b in args.batches.split(',')), args.repeats, args.steps_per_run
  if args.quick:  # tiny networks at 16x16, 1 step a run
    batches, repeats, steps_per_run = (2,), 2, 1
  result = run(configs, networks, batches, repeats, steps_per_run, args.quick, not args.no_torch,
               common.matmul_n(args), args.dtype)
  common.report(result, COLUMNS, 'torch step', args.json)
  return result


if __name__ == '__main__':
  main()
