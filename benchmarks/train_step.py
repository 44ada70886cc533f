"""Training-step throughput of each trained network: ours (the stage's step function, jitted) vs PyTorch.

  python -m benchmarks.train_step                    # both configs, batch 16/64, 5 timed runs of 3 steps
  python -m benchmarks.train_step --quick            # tiny networks, seconds (what the smoke test runs)
  python -m benchmarks.train_step --configs=mscmr --batches=16 --networks=diffusion
  python -m benchmarks.train_step --same-process     # the old method: everything in this one process

Networks (sizes from configs/mnist_m.py and configs/mscmr.py), each the stage's own task declaration:
  teacher    FFD-VAE teacher (stages/teacher.task): CE + Dice + L2 reconstruction + beta KL;
  diffusion  eps-prediction UNet (stages/diffusion.task) on the config's latents + z_dom;
  segment    segmentation UNet (stages/segment.task): CE + Dice.
Ours: the task's `loss_fn` through the generic `train.task.train_step` under jax.jit with the state donated,
TrainState with the task's optimiser (AdamW from train/state.make_optimizer: global-norm clipping,
warm-up/cosine schedule, weight decay) and EMA, exactly what the training loop compiles (single device).
PyTorch (torch_active, torch_passive: OMP_WAIT_POLICY=ACTIVE / PASSIVE; the faster is the torch of the
ratios): the same architecture (benchmarks/torch_mirror.py) with our initial weights copied in,
torch.optim.AdamW (same betas/eps/weight decay), clip_grad_norm_ and an EMA update (constant learning rate: a
schedule costs nothing measurable).
Method (default; benchmarks/worker.py): one fresh process per (case, implementation), one after the other;
the JAX ones never import torch, the PyTorch ones never import jax (weights and batches through an .npz) and
run with PyTorch's default threads. First a check process (both frameworks) checks the loss and the gradient
norm of both equal on one batch (posterior means instead of samples for the FFD-VAE); a mismatch raises
before anything is timed. Each process measures its own framework's matmul ceiling and reports its own peak
RSS. With --same-process both run interleaved in this process (torch as `torch`, PASSIVE).
The last printed line is `train_vs_torch=... torch_policy=... baseline=...`: train_vs_torch is the geometric
mean over the networks of ours/torch images/s for config (b) mscmr, batch 16.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common, measure, worker
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


def make_net(config: str, network: str, quick: bool = False, dtype: str = 'float32',
             arrays: Mapping[str, np.ndarray] | None = None) -> Net:
  """`dtype`: the network's compute dtype (train.compute_dtype); params (and the initial values) are the same
  float32 ones for every dtype. `arrays`: take the params from this .npz content instead of drawing them."""
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
  if arrays is None:
    params = common.host_params(task.init_params)
  else:
    params = jax.tree.map(jnp.asarray, measure.unflatten(arrays, 'params/'))
  return Net(network, task, params, float(lr), image, spec.num_classes, extra)


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


# --- PyTorch (benchmarks/torch_side.py) ---------------------------------------------------------------------

def torch_meta(net: Net, train_config) -> dict[str, Any]:
  """What torch_side.TorchTrainer needs besides the weights, as JSON values."""
  from benchmarks import torch_mirror

  return {'network': net.name, 'arch': torch_mirror.architecture(net.model, net.image[-1]),
          'num_params': common.param_count(net.params), 'learning_rate': net.learning_rate,
          'ema_decay': float(train_config.ema_decay), 'grad_clip': float(train_config.grad_clip or 0.0),
          'weight_decay': float(train_config.weight_decay),
          **{k: v for k, v in net.extra.items() if k in ('beta', 'seg_weight', 'cond_dropout')}}


def torch_trainer(net: Net, train_config, dtype: str = 'float32', device: str | None = None):
  """The PyTorch counterpart of one step of `net` (torch_side.TorchTrainer) with net's weights."""
  from benchmarks import torch_side

  return torch_side.TorchTrainer(torch_meta(net, train_config), jax.tree.map(np.asarray, net.params),
                                 device or common.torch_device(), dtype, net.extra.get('alphas_cumprod'))


def check_equivalence(net: Net, trainer, batch: dict[str, np.ndarray],
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


# --- ours: one case ------------------------------------------------------------------------------------------

def jax_run(net: Net, host: dict[str, np.ndarray], steps_per_run: int) -> dict[str, Any]:
  """The timed callable of our step (`steps_per_run` steps of the compiled step, state donated), its compile
  time and the FLOPs of one step (XLA cost analysis of the lowered step)."""
  batch = {k: jnp.asarray(v) for k, v in host.items()}
  state, step = jax_train(net, None)
  rng = jax.random.key(0)
  t0 = time.perf_counter()
  lowered = step.lower(state, batch, rng, None)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  holder = {'state': state}

  def run():
    for _ in range(steps_per_run):
      holder['state'], metrics = compiled(holder['state'], batch, rng, None)
    jax.block_until_ready((holder['state'], metrics))

  return {'run': run, 'compile_s': compile_s, 'flops': common.xla_flops(lowered)}


def _flop_columns(flops, batch_size: int) -> dict[str, Any]:
  return {'step_gflop': flops / 1e9 if flops else None,
          'gflop_per_image': flops / batch_size / 1e9 if flops else None}


# --- the separate-process method (default) ------------------------------------------------------------------

def _case_name(config: str, network: str) -> str:
  return f'{config}/{network}'


def check_worker(spec: dict[str, Any]) -> dict[str, Any]:
  """The check process (JAX and PyTorch): per (config, network), draws the weights and every batch into an
  .npz for the timing processes, then checks the torch step built from that .npz against ours (float32)."""
  with_torch, quick = spec['with_torch'], spec['quick']
  device = common.torch_device() if with_torch else None
  out = {'backend': jax.default_backend(), 'torch_device': device, 'env': common.jax_environment(),
         'checks': {}, 'cases': {}}
  for config in spec['configs']:
    train_config = load_config(config).train
    for network in spec['networks']:
      # float32: the weights are the same for every compute dtype, and a bfloat16 run is checked on its
      # float32 twin (bfloat16 rounding differs between the stacks)
      net = make_net(config, network, quick)
      arrays = dict(measure.flatten(net.params, 'params/'))
      if 'alphas_cumprod' in net.extra:
        arrays['alphas_cumprod'] = np.asarray(net.extra['alphas_cumprod'], np.float32)
      for size in spec['batches']:
        arrays.update({f'batch/{size}/{k}': v for k, v in make_batch(net, size).items()})
      name = _case_name(config, network)
      path = os.path.join(spec['dir'], f"train_{name.replace('/', '_')}.npz")
      np.savez(path, **arrays)
      out['cases'][name] = {'npz': path}
      if with_torch:
        from benchmarks import torch_side

        meta = out['cases'][name]['meta'] = torch_meta(net, train_config)
        loaded = measure.load_npz(path)  # what the torch timing processes load
        trainer = torch_side.TorchTrainer(meta, measure.unflatten(loaded, 'params/'), device, 'float32',
                                          loaded.get('alphas_cumprod'))
        out['checks'][name] = check_equivalence(net, trainer, make_batch(net, 2, seed=7))
  return out


def jax_worker(spec: dict[str, Any]) -> dict[str, Any]:
  """A JAX timing process: our step of one (config, network, batch), weights and batch from the .npz."""
  arrays = measure.load_npz(spec['npz'])
  net = make_net(spec['config'], spec['network'], spec['quick'], spec['dtype'], arrays=arrays)
  size = spec['batch']
  jx = jax_run(net, measure.unflatten(arrays, f'batch/{size}/'), spec['steps_per_run'])
  (m,) = measure.measure({'ours': jx['run']}, size * spec['steps_per_run'], spec['repeats'],
                         device_peak=lambda _: common.device_peak_bytes()).values()
  return {'row': {**m.row(), 'compile_s': jx['compile_s'], **_flop_columns(jx['flops'], size)},
          'env': common.jax_environment()}


def run_separate(configs, networks, batches, repeats, steps_per_run, quick, with_torch, matmul_n: int | None,
                 dtype: str = 'float32', policies: tuple[str, ...] = common.OMP_POLICIES,
                 work_dir: str | None = None) -> dict[str, Any]:
  """The benchmark with one process per (case, implementation) (benchmarks/worker.py); returns {'method',
  'env', 'ceiling', 'rows', 'checks', 'processes', 'summary'}. This process starts no JAX backend."""
  with_torch = with_torch and common.importable('torch')
  base = {'harness': 'train_step', 'quick': quick, 'dtype': dtype, 'repeats': repeats,
          'steps_per_run': steps_per_run}
  rows, torch_env = [], None
  with worker.Session(work_dir) as session:
    check = session.spawn('check', {**base, 'role': 'check', 'configs': list(configs), 'networks': list(networks),
                                    'batches': list(batches), 'with_torch': with_torch, 'dir': session.dir})
    n = common.resolve_matmul_n(matmul_n, quick, check['backend'])
    session.spawn('numpy', {'role': 'numpy', 'matmul_n': n})
    for config in configs:
      for network in networks:
        info = check['cases'][_case_name(config, network)]
        case_spec = {**base, 'config': config, 'network': network, 'npz': info['npz'], 'matmul_n': n}
        for size in batches:
          key = {'config': config, 'network': network, 'dtype': dtype, 'batch': size}
          prefix = f'{config}_{network}_b{size}'
          out = session.spawn(f'{prefix}_ours', {**case_spec, 'role': 'jax', 'impl': 'ours', 'batch': size})
          case_rows = [{**key, 'impl': 'ours', **common.worker_row(out)}]
          for policy in policies if with_torch else ():
            impl = f'torch_{policy}'
            out = session.spawn(f'{prefix}_{impl}', {**case_spec, 'role': 'torch', 'impl': impl, 'batch': size,
                                                     'meta': info['meta'], 'torch_device': check['torch_device']},
                                worker.torch_env(policy))
            torch_env = torch_env or common.shared_torch_env(out)
            case_rows.append({**key, 'impl': impl, **common.worker_row(out)})
          common.progress_line(f'{config} {network} batch {size}', case_rows)
          rows += case_rows
    result = {'method': common.BASELINES[False],
              'env': {**measure.host_environment(), **check['env'], 'torch': torch_env},
              'ceiling': common.ceilings(session.processes, n, dtype), 'rows': rows, 'checks': check['checks'],
              'processes': session.processes}
  common.finish_rows(rows, ('config', 'network', 'batch'), result['ceiling']['best_gflop_s'])
  result['summary'] = summary(rows)
  return result


# --- the in-process method (--same-process) ----------------------------------------------------------------

def bench_net(config: str, network: str, batches: tuple[int, ...], repeats: int, steps_per_run: int,
              quick: bool, with_torch: bool, ceiling_gflops: float,
              dtype: str = 'float32') -> tuple[list[dict[str, Any]], dict]:
  """Rows (one per batch and implementation) and the equivalence errors of one network. The equivalence
  check runs in float32 (for a bfloat16 run: the float32 twin of both networks, same weights)."""
  train_config = load_config(config).train
  net = make_net(config, network, quick, dtype)
  trainer = torch_trainer(net, train_config, dtype) if with_torch else None
  checks = {}
  if with_torch:
    net32 = net if dtype == 'float32' else make_net(config, network, quick)
    checks = check_equivalence(net32, torch_trainer(net32, train_config) if net32 is not net else trainer,
                               make_batch(net, 2, seed=7))
  rows = []
  for batch_size in batches:
    rows += _bench_batch(config, net, trainer, batch_size, repeats, steps_per_run, ceiling_gflops)
    common.progress_line(f'{config} {network} batch {batch_size}', rows[-2 if trainer else -1:])
  return rows, checks


def _bench_batch(config: str, net: Net, trainer, batch_size: int, repeats: int, steps_per_run: int,
                 ceiling_gflops: float) -> list[dict[str, Any]]:
  host = make_batch(net, batch_size)
  jx = jax_run(net, host, steps_per_run)
  runs = {'ours': jx['run']}
  if trainer is not None:
    tbatch = trainer.to_torch(host)

    def run_torch():
      for _ in range(steps_per_run):
        trainer.step(tbatch)

    runs['torch'] = run_torch
  rows = []
  flops = jx['flops']
  for name, m in common.measure(runs, batch_size * steps_per_run, repeats).items():
    med = m.timing.images_per_second()[0]
    gflops = flops / batch_size * med / 1e9 if flops else None
    rows.append({'config': config, 'network': net.name, 'dtype': jnp.dtype(net.model.dtype).name,
                 'batch': batch_size, 'impl': name, **m.row(),
                 'compile_s': jx['compile_s'] if name == 'ours' else None, 'gflop_s': gflops,
                 'frac_of_matmul': common.ratio(gflops, ceiling_gflops),
                 'step_gflop': flops / 1e9 if flops else None})
  return rows


def run(configs, networks, batches, repeats, steps_per_run, quick, with_torch, matmul_n,
        dtype: str = 'float32') -> dict[str, Any]:
  """The in-process benchmark (--same-process)."""
  torch = common.torch_or_none() if with_torch else None
  result = common.new_result(matmul_n, dtype, torch)
  for config in configs:
    for network in networks:
      rows, checks = bench_net(config, network, batches, repeats, steps_per_run, quick, torch is not None,
                               result['ceiling']['jax_gflop_s'], dtype)
      result['rows'] += rows
      result['checks'][_case_name(config, network)] = checks
  return common.finish_result(result, summary)


# --- summary and command line ------------------------------------------------------------------------------

def summary(rows: list[dict[str, Any]], baseline: str = common.BASELINES[False]) -> dict[str, Any]:
  """train_vs_torch: geometric mean over networks of ours / the best torch policy's images/s at SUMMARY_CASE
  (else the last measured case); with separate processes also each network's winning torch_policy."""
  config, batch = SUMMARY_CASE
  pick = [r for r in rows if r['config'] == config and r['batch'] == batch]
  if not pick and rows:
    pick = [r for r in rows if r['config'] == rows[-1]['config'] and r['batch'] == rows[-1]['batch']]
  per_network: dict[str, list[dict[str, Any]]] = {}
  for r in pick:
    per_network.setdefault(r['network'], []).append(r)
  ratios, policies = [], []
  for network, net_rows in per_network.items():
    ours = next((r['img_s'] for r in net_rows if r['impl'] == 'ours'), None)
    best = common.best_torch(net_rows)
    if best:
      ratios.append(common.ratio(ours, best['img_s']))
      policies.append(f"{network}:{best['impl'].removeprefix('torch_')}")
  values = {'train_vs_torch': common.geomean(ratios)}
  if baseline == common.BASELINES[False]:
    values['torch_policy'] = ','.join(policies) or None
  values['baseline'] = baseline
  return values


COLUMNS = ('config', 'network', 'dtype', 'batch', 'impl', 'img_s', 'img_s_range', 'vs_torch', 'compile_s',
           'first_call_s', 'peak_rss_MiB', 'rss_delta_MiB', 'device_peak_MiB', 'gflop_s', 'matmul_gflop_s',
           'frac_of_matmul', 'frac_of_best_matmul')
SAME_PROCESS_COLUMNS = ('config', 'network', 'dtype', 'batch', 'impl', 'img_s', 'img_s_range', 'compile_s',
                        'first_call_s', 'peak_rss_MiB', 'rss_delta_MiB', 'device_peak_MiB', 'gflop_s',
                        'frac_of_matmul')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--configs', default=','.join(CONFIGS))
  p.add_argument('--networks', default=','.join(NETWORKS))
  p.add_argument('--batches', default=None, help='comma-separated batch sizes (default 16,64; --quick: 2)')
  p.add_argument('--steps-per-run', type=int, default=None, help='training steps per timed run (default 3; '
                 '--quick: 1)')
  common.add_harness_args(p)
  return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  configs = common.names(args.configs, CONFIGS, 'configs')
  networks = common.names(args.networks, NETWORKS, 'networks')
  # --quick: tiny networks at 16x16, batch 2, 2 runs of 1 step (each unless given)
  batches = tuple(int(b) for b in (args.batches or ('2' if args.quick else '16,64')).split(','))
  repeats = args.repeats or (2 if args.quick else 5)
  steps_per_run = args.steps_per_run or (1 if args.quick else 3)
  if args.same_process:
    common.prepare_process()  # before torch is imported
    result = run(configs, networks, batches, repeats, steps_per_run, args.quick, not args.no_torch,
                 common.matmul_n(args), args.dtype)
    common.report(result, SAME_PROCESS_COLUMNS, 'torch step', args.json)
  else:
    result = run_separate(configs, networks, batches, repeats, steps_per_run, args.quick, not args.no_torch,
                          args.matmul_n, args.dtype, common.omp_policies(args), args.work_dir)
    common.report(result, COLUMNS, 'torch step', args.json)
  return result


if __name__ == '__main__':
  main()
