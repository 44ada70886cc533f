"""Smoke tests of the benchmark harnesses at a tiny size (no timing assertions: benchmarks are not tests).

The harnesses themselves raise if the PyTorch reference or the loop samplers disagree with ours, so running
them is a correctness check of the references; the torch parts run only when torch (the `bench` extra) is
installed.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

common.prepare_process()  # before torch is first imported (OpenMP reads it at load)

from benchmarks import sampler, train_step  # noqa: E402


def _has_torch() -> bool:
  return common.torch_or_none() is not None


def test_sampler_harness_runs(capsys):
  result = sampler.main(['--quick', '--configs=mscmr', '--batches=1', '--steps=1', '--repeats=1',
                         '--matmul-n=64'] + ([] if _has_torch() else ['--no-torch']))
  impls = {r['impl'] for r in result['rows']}
  assert impls == ({'scan', 'loop'} | ({'torch'} if _has_torch() else set()))
  assert all(r['img_s'] > 0 for r in result['rows'])
  scan = next(r for r in result['rows'] if r['impl'] == 'scan')
  assert scan['step_gflop'] > 0 and 0 < scan['frac_of_matmul']
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith('sampler_vs_torch=') and 'scan_vs_loop=' in last and 'matmul_frac=' in last
  if _has_torch():
    assert result['checks']['mscmr']['sample_rel_err'] < 1e-3


def test_train_step_harness_runs(capsys):
  result = train_step.main(['--quick', '--configs=mscmr', '--networks=segment', '--repeats=1',
                            '--matmul-n=64'] + ([] if _has_torch() else ['--no-torch']))
  assert {r['impl'] for r in result['rows']} == ({'ours', 'torch'} if _has_torch() else {'ours'})
  assert all(r['img_s'] > 0 and r['step_gflop'] > 0 for r in result['rows'] if r['impl'] == 'ours')
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith('train_vs_torch=')


@pytest.mark.parametrize('network', train_step.NETWORKS)
def test_fixed_randomness_loss_is_the_pipelines_loss(network):
  """The torch check's loss (`jax_loss`, randomness given) equals the task's own `loss_fn` fed the draws it
  makes from its key: the benchmark compares the loss the pipeline trains with."""
  net = train_step.make_net('mscmr', network, quick=True)
  batch = {k: jnp.asarray(v) for k, v in train_step.make_batch(net, 2).items()}
  rng, fixed = jax.random.key(3), {}
  if network == 'diffusion':
    k_t, k_noise, k_drop = jax.random.split(rng, 3)
    fixed = {'t': jax.random.randint(k_t, (2,), 0, len(net.extra['alphas_cumprod'])),
             'noise': jax.random.normal(k_noise, batch['latent'].shape),
             'drop': jax.random.bernoulli(k_drop, net.extra['cond_dropout'], (2,))}
  got = train_step.jax_loss(net, net.params, batch, fixed)
  if network == 'teacher':  # posterior means: the task's loss without its sampling
    want = net.task.loss_fn.func(*net.task.loss_fn.args, net.params, batch, rng, None, sample=False)[0]
  else:
    want = net.task.loss_fn(net.params, batch, rng, None)[0]
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_bf16_subset_of_impls_and_lowered_flops():
  """--dtype=bfloat16 with --impls=scan: only the scan row, the bf16 UNet, and FLOPs from the lowered program
  (the same count as float32: cost analysis before backend passes does not depend on the compute dtype)."""
  args = ['--quick', '--configs=mscmr', '--batches=1', '--steps=1', '--repeats=1', '--matmul-n=64', '--no-torch']
  f32 = sampler.main(args)['rows'][0]
  bf16 = sampler.main(args + ['--dtype=bfloat16', '--impls=scan'])['rows']
  assert [r['impl'] for r in bf16] == ['scan'] and bf16[0]['dtype'] == 'bfloat16' and f32['dtype'] == 'float32'
  assert bf16[0]['step_gflop'] == pytest.approx(f32['step_gflop'], rel=0.05)
  with pytest.raises(SystemExit):
    sampler.main(args + ['--impls=loop'])  # scan always runs


def test_summary_ratios_hand_computed():
  rows = [{'config': 'mscmr', 'batch': 16, 'impl': 'scan', 'img_s': 30.0, 'frac_of_matmul': 0.25},
          {'config': 'mscmr', 'batch': 16, 'impl': 'loop', 'img_s': 20.0},
          {'config': 'mscmr', 'batch': 16, 'impl': 'torch', 'img_s': 10.0},
          {'config': 'mscmr', 'batch': 1, 'impl': 'torch', 'img_s': 1.0}]
  assert sampler.summary(rows) == {'sampler_vs_torch': 3.0, 'scan_vs_loop': 1.5, 'matmul_frac': 0.25}
  rows = [{'config': 'mscmr', 'batch': 16, 'network': n, 'impl': i, 'img_s': v}
          for n, i, v in [('a', 'ours', 8.0), ('a', 'torch', 2.0), ('b', 'ours', 1.0), ('b', 'torch', 1.0)]]
  assert train_step.summary(rows)['train_vs_torch'] == pytest.approx(2.0)  # sqrt(4 * 1)


def test_timing_statistics():
  t = common.Timing(images=4, seconds=[1.0, 2.0, 0.5])
  assert t.images_per_second() == (4.0, 2.0, 8.0)


def test_torch_mirrors_match_linen():
  torch = pytest.importorskip('torch')
  from benchmarks import torch_mirror
  from diffuseg_jax.models.ffd_vae import FFDVAE
  from diffuseg_jax.models.seg_unet import SegUNet

  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
  for model, mirror in [(FFDVAE(num_classes=3, out_channels=3, base_channels=4, levels=2, z_seg_channels=2,
                                z_dom_dim=4), torch_mirror.ffd_vae_from_linen),
                        (SegUNet(num_classes=3, base_channels=4, levels=2),
                         lambda m: torch_mirror.seg_unet_from_linen(m, 3))]:
    params = common.host_params(
        lambda k, m=model: m.init({'params': k, 'latent': k}, jnp.asarray(x))['params'])
    net = mirror(model)
    net.load_flax(jax.tree.map(np.asarray, params))
    assert torch_mirror.count_params(net) == common.param_count(params)
    with torch.no_grad():
      if isinstance(model, FFDVAE):
        ours = jax.jit(lambda p, m=model: m.apply({'params': p}, x, sample=False))(params)
        theirs = net(xt, sample=False)
        pairs = [(ours[k], theirs[k]) for k in ('seg_logits', 'recon', 'seg_mean', 'dom_mean')]
      else:
        pairs = [(jax.jit(lambda p, m=model: m.apply({'params': p}, x))(params), net(xt))]
    for a, b in pairs:
      b = b.numpy()
      b = np.moveaxis(b, 1, -1) if b.ndim == 4 else b
      np.testing.assert_allclose(b, np.asarray(a), rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))
