"""Smoke tests of the benchmark harnesses at a tiny size (no timing assertions: benchmarks are not tests).

The harnesses themselves raise if the PyTorch reference or the loop samplers disagree with ours, so running
them is a correctness check of the references; the torch parts run only when torch (the `bench` extra) is
installed. The default method starts one process per framework (benchmarks/worker.py): the tests check that
each timing process loaded only its own framework, and that a failed check stops the run before any timing.
"""

import contextlib
import io
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

common.prepare_process()  # before torch is first imported (OpenMP reads it at load)

from benchmarks import sampler, train_step, worker  # noqa: E402

TINY = ['--quick', '--repeats=1', '--matmul-n=64']


@pytest.fixture(scope='module', autouse=True)
def _shared_compilation_cache(tmp_path_factory):
  """The timing processes of these tests share one XLA compilation cache: the scan that the check process
  compiles is the scan worker's, the loop worker compiles its step twice (once to report the compile time).
  Only the reported compile times change, which nothing here asserts; the benchmarks themselves use none."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path_factory.mktemp('xla_cache')))
    mp.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
    yield


def _has_torch() -> bool:
  return common.torch_or_none() is not None


def _torch_args() -> list[str]:
  return [] if _has_torch() else ['--no-torch']


def _assert_one_framework_per_process(result, jax_impls):
  """Timing processes: JAX ones imported no torch, torch ones no jax, numpy neither; torch ran once per
  OpenMP policy, JAX without one."""
  roles = {}
  for p in result['processes']:
    roles.setdefault(p['role'], []).append(p)
    want = {'check': ['jax', 'torch'] if _has_torch() else ['jax'], 'jax': ['jax'], 'torch': ['torch'],
            'numpy': []}[p['role']]
    assert p['modules'] == want, p
  assert [p['impl'] for p in roles['jax']] == list(jax_impls) and len(roles['check']) == len(roles['numpy']) == 1
  assert all(p['OMP_WAIT_POLICY'] is None for p in roles['jax'])
  torch_impls = ['torch_active', 'torch_passive'] if _has_torch() else []
  assert [p['impl'] for p in roles.get('torch', [])] == torch_impls
  assert [p['OMP_WAIT_POLICY'] for p in roles.get('torch', [])] == [i.split('_')[1].upper() for i in torch_impls]
  for row in result['rows']:
    assert row['modules'] == (['torch'] if row['impl'].startswith('torch') else ['jax'])
    assert row['img_s'] > 0 and row['peak_rss_MiB'] > 0 and row['matmul_gflop_s'] > 0
    assert row['frac_of_matmul'] > 0 and row['frac_of_best_matmul'] > 0
  c = result['ceiling']
  assert {'numpy', 'jax', *torch_impls} <= set(c) and c['best_gflop_s'] >= c['jax']['gflop_s'] > 0
  return jax_impls + tuple(torch_impls)


SAMPLER_ARGS = TINY + ['--configs=mscmr', '--batches=1', '--steps=1']


@pytest.fixture(scope='module')
def sampler_run():
  """The sampler benchmark with separate processes (and torch when installed): (result, printed lines)."""
  capture = io.StringIO()
  with contextlib.redirect_stdout(capture):
    result = sampler.main(SAMPLER_ARGS + _torch_args())
  return result, capture.getvalue().strip().splitlines()


def test_sampler_separate_processes(sampler_run):
  result, lines = sampler_run
  impls = _assert_one_framework_per_process(result, ('scan', 'loop'))
  assert [r['impl'] for r in result['rows']] == list(impls)
  scan = result['rows'][0]
  assert scan['step_gflop'] > 0 and scan['scan_cost_gflop'] > 0
  checks = result['checks']['mscmr']
  assert checks['loop_rel_err'] < 1e-4
  s = result['summary']
  assert list(s) == ['sampler_vs_torch', 'scan_vs_loop', 'matmul_frac', 'rss_vs_torch', 'torch_policy', 'baseline']
  assert s['baseline'] == 'separate_processes' and s['scan_vs_loop'] > 0 and s['matmul_frac'] > 0
  if _has_torch():
    assert checks['eps_rel_err'] < 1e-3 and checks['sample_rel_err'] < 1e-3  # the check process ran
    assert s['sampler_vs_torch'] > 0 and s['rss_vs_torch'] > 0 and s['torch_policy'] in common.OMP_POLICIES
    assert 1.0 in {r['vs_torch'] for r in result['rows'] if r['impl'].startswith('torch')}
  last = lines[-1]
  assert last.startswith('sampler_vs_torch=') and 'scan_vs_loop=' in last and 'matmul_frac=' in last
  assert 'rss_vs_torch=' in last and last.endswith('baseline=separate_processes')


def test_train_step_separate_processes(capsys):
  result = train_step.main(TINY + ['--configs=mscmr', '--networks=segment'] + _torch_args())
  impls = _assert_one_framework_per_process(result, ('ours',))
  assert [r['impl'] for r in result['rows']] == list(impls)
  assert result['rows'][0]['step_gflop'] > 0
  s = result['summary']
  assert list(s) == ['train_vs_torch', 'torch_policy', 'baseline'] and s['baseline'] == 'separate_processes'
  if _has_torch():
    checks = result['checks']['mscmr/segment']
    assert checks['loss_rel_err'] < 1e-3 and checks['grad_norm_rel_err'] < 1e-3
    assert s['train_vs_torch'] > 0 and s['torch_policy'].startswith('segment:')
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith('train_vs_torch=') and last.endswith('baseline=separate_processes')


def test_failed_check_stops_the_run_before_timing(monkeypatch):
  """An equivalence mismatch (an AssertionError in the check process) raises before any timing process."""
  started = []

  def spawn(self, name, spec, env=None):
    started.append(spec['role'])
    raise AssertionError('mscmr: torch reference differs from ours')

  monkeypatch.setattr(worker.Session, 'spawn', spawn)
  with pytest.raises(AssertionError, match='differs'):
    sampler.main(TINY + ['--configs=mscmr'])
  with pytest.raises(AssertionError, match='differs'):
    train_step.main(TINY + ['--configs=mscmr', '--networks=segment'])
  assert started == ['check', 'check']


def test_worker_failure_is_raised_with_its_traceback(tmp_path):
  with worker.Session(str(tmp_path)) as session:
    with pytest.raises(RuntimeError, match='numpy process failed'):
      session.spawn('numpy', {'role': 'numpy', 'matmul_n': -1})
    assert session.processes == []


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


def test_same_process_bf16_and_no_torch_scan_only(sampler_run):
  """The old method (--same-process) still runs; --dtype=bfloat16 with --no-torch --impls=scan: only the scan
  row, the bf16 UNet, and FLOPs from the lowered program (the same count as float32, the scan row of the
  separate-processes run: cost analysis before backend passes does not depend on the compute dtype)."""
  args = SAMPLER_ARGS + ['--no-torch', '--impls=scan']
  bf16 = sampler.main(args + ['--dtype=bfloat16', '--same-process'])
  assert bf16['summary']['baseline'] == 'same_process' and 'rss_vs_torch' not in bf16['summary']
  f32, bf16 = sampler_run[0]['rows'][0], bf16['rows']
  assert f32['impl'] == 'scan'
  assert [r['impl'] for r in bf16] == ['scan'] and bf16[0]['dtype'] == 'bfloat16' and f32['dtype'] == 'float32'
  assert bf16[0]['step_gflop'] == pytest.approx(f32['step_gflop'], rel=0.05)
  with pytest.raises(SystemExit):
    sampler.main(args[:-1] + ['--impls=loop'])  # scan always runs


def test_summary_ratios_hand_computed():
  rows = [{'config': 'mscmr', 'batch': 16, 'impl': 'scan', 'img_s': 30.0, 'frac_of_matmul': 0.25,
           'peak_rss_MiB': 300.0},
          {'config': 'mscmr', 'batch': 16, 'impl': 'loop', 'img_s': 20.0},
          {'config': 'mscmr', 'batch': 16, 'impl': 'torch_active', 'img_s': 10.0, 'peak_rss_MiB': 100.0},
          {'config': 'mscmr', 'batch': 16, 'impl': 'torch_passive', 'img_s': 12.0, 'peak_rss_MiB': 150.0},
          {'config': 'mscmr', 'batch': 1, 'impl': 'torch_active', 'img_s': 1.0}]
  assert sampler.summary(rows) == {'sampler_vs_torch': 2.5, 'scan_vs_loop': 1.5, 'matmul_frac': 0.25,
                                   'rss_vs_torch': 2.0, 'torch_policy': 'passive',
                                   'baseline': 'separate_processes'}
  same = [dict(r, impl='torch') if r['impl'] == 'torch_active' else r for r in rows if r['impl'] != 'torch_passive']
  assert sampler.summary(same, baseline='same_process') == {'sampler_vs_torch': 3.0, 'scan_vs_loop': 1.5,
                                                            'matmul_frac': 0.25, 'baseline': 'same_process'}
  rows = [{'config': 'mscmr', 'batch': 16, 'network': n, 'impl': i, 'img_s': v}
          for n, i, v in [('a', 'ours', 8.0), ('a', 'torch_active', 2.0), ('a', 'torch_passive', 4.0),
                          ('b', 'ours', 1.0), ('b', 'torch_active', 1.0), ('b', 'torch_passive', 0.5)]]
  s = train_step.summary(rows)
  assert s['train_vs_torch'] == pytest.approx(2.0**0.5) and s['torch_policy'] == 'a:passive,b:active'


def test_per_case_columns_and_ceilings_hand_computed():
  """frac_of_matmul against the row's own process's ceiling, frac_of_best_matmul against the best of the run,
  vs_torch against the faster torch policy; the FLOPs per image come from the JAX row."""
  rows = [{'config': 'c', 'batch': 2, 'impl': 'scan', 'img_s': 4.0, 'gflop_per_image': 5.0, 'step_gflop': 1.0,
           'matmul_gflop_s': 100.0},
          {'config': 'c', 'batch': 2, 'impl': 'torch_active', 'img_s': 2.0, 'matmul_gflop_s': 50.0},
          {'config': 'c', 'batch': 2, 'impl': 'torch_passive', 'img_s': 1.0, 'matmul_gflop_s': 40.0}]
  common.finish_rows(rows, ('config', 'batch'), best_ceiling=200.0)
  assert [r['gflop_s'] for r in rows] == [20.0, 10.0, 5.0] and [r['step_gflop'] for r in rows] == [1.0] * 3
  assert [r['frac_of_matmul'] for r in rows] == [0.2, 0.2, 0.125]
  assert [r['frac_of_best_matmul'] for r in rows] == [0.1, 0.05, 0.025]
  assert [r['vs_torch'] for r in rows] == [2.0, 1.0, 0.5]
  procs = [{'role': 'numpy', 'ceiling_gflop_s': 90.0}, {'role': 'jax', 'ceiling_gflop_s': 100.0},
           {'role': 'jax', 'ceiling_gflop_s': 120.0}, {'role': 'check', 'ceiling_gflop_s': None},
           {'role': 'torch', 'OMP_WAIT_POLICY': 'ACTIVE', 'ceiling_gflop_s': 130.0}]
  c = common.ceilings(procs, 64, 'float32')
  assert c['jax'] == {'gflop_s': 110.0, 'min': 100.0, 'max': 120.0, 'processes': 2}
  assert c['numpy']['gflop_s'] == 90.0 and c['torch_active']['gflop_s'] == 130.0 and c['best_gflop_s'] == 130.0


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
