"""Smoke test of the Stable-Diffusion-sized sampler benchmark at its --quick size (no timing assertions): every
part runs, the JSON holds what the GPU run will be read for, and the last line is the summary."""

import json
import os
import sys

import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import sd_sampler  # noqa: E402


def test_quick_run_writes_rows_stage_and_summary(tmp_path, capsys):
  path = tmp_path / 'sd.json'
  result = sd_sampler.main(['--quick', '--batches=2', '--steps=2', '--repeats=1', '--stage-batches=2',
                            f'--json={path}'])
  saved = json.loads(path.read_text())
  assert saved['summary'] == result['summary']
  (row,) = saved['rows']
  assert 'error' not in row, row
  assert row['batch'] == 2 and row['attention'] == 'fused' and row['autotune_warm']
  assert row['img_s'] > 0 and row['scan_compile_s'] > 0 and row['gflop_per_image'] > 0 and row['frac_bf16'] > 0
  assert saved['step']['lower_compile_s'] > 0 and saved['step']['batch'] == 2
  assert saved['ceiling']['bfloat16'] > 0 and saved['ceiling']['float32'] > 0
  stage = saved['stage']
  assert 'error' not in stage, stage
  assert stage['batch'] == 2 and stage['decode_included'] and stage['files_written'] == 4
  assert stage['stage_img_s'] > 0 and stage['synthesize_img_s'] > 0 and stage['stage_vs_sampler'] > 0
  assert stage['scan_img_s'] == row['img_s']
  keys = ['img_s_b2', 'frac_bf16_b2', 'stage_vs_sampler', 'scan_compile_s', 'step_compile_s']
  assert list(saved['summary']) == keys and all(saved['summary'][k] is not None for k in keys)
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith('sd_sampler: img_s_b2=') and all(f'{k}=' in last for k in keys)


def test_summary_takes_the_first_cold_scan_compile_and_skips_failed_rows():
  rows = [{'batch': 64, 'img_s': 10.0, 'frac_bf16': 0.3, 'scan_compile_s': 20.0, 'autotune_warm': True,
           'attention': 'default'},
          {'batch': 256, 'error': 'XlaRuntimeError: RESOURCE_EXHAUSTED'},
          {'batch': 512, 'img_s': 2.0, 'frac_bf16': 0.1, 'scan_compile_s': 70.0, 'autotune_warm': False,
           'attention': 'memory_efficient'},
          {'batch': 16, 'img_s': 5.0, 'frac_bf16': 0.2, 'scan_compile_s': 50.0, 'autotune_warm': False,
           'attention': 'default'}]
  result = {'rows': rows, 'stage': {'stage_vs_sampler': 0.95}, 'step': {'lower_compile_s': 40.0}}
  assert sd_sampler.summary(result, 256) == {'img_s_b256': None, 'frac_bf16_b256': None, 'stage_vs_sampler': 0.95,
                                             'scan_compile_s': 50.0, 'step_compile_s': 40.0}
  assert sd_sampler.summary(result, 64)['img_s_b64'] == 10.0
  assert sd_sampler.summary({**result, 'rows': rows[:3]}, 512)['scan_compile_s'] == 70.0  # cold, other attention
  assert sd_sampler.summary({**result, 'rows': rows[:1]}, 64)['scan_compile_s'] == 20.0  # only a warm one


def test_attention_choice(monkeypatch):
  """auto takes the pipeline's fused attention, unless that would be XLA's einsums (no GPU) and their score
  tensors would take half the device memory: then diffusers' memory-efficient loop."""
  unet = sd_sampler.da.FlaxUNet2DConditionModel(**sd_sampler.SD_UNET, dtype=jnp.bfloat16)
  setup = sd_sampler.Setup(unet, 16, 4, jnp.bfloat16, None, sd_sampler.SD_LATENT, None, None, False)
  # 256 x 8 heads x 4096^2 tokens at 64x64, scores + probabilities, 2 bytes each
  assert sd_sampler.attention_bytes(unet, 256, (64, 64)) == 2 * 256 * 8 * 4096**2 * 2
  assert sd_sampler.attention_bytes(unet, 16, (64, 64)) == 2 * 16 * 8 * 4096**2 * 2
  assert sd_sampler.attention_for('memory_efficient', setup, 1) == 'memory_efficient'
  assert sd_sampler.attention_for('default', setup, 256) == 'default'
  assert sd_sampler.attention_for('auto', setup, 256) == 'fused'  # CPU: no memory limit to exceed
  monkeypatch.setattr(sd_sampler, 'memory_limit_bytes', lambda: 126 * 2**30)
  assert sd_sampler.attention_for('auto', setup, 16) == 'fused'
  assert sd_sampler.attention_for('auto', setup, 256) == 'memory_efficient'
  monkeypatch.setattr(sd_sampler.jax, 'default_backend', lambda: 'gpu')
  assert sd_sampler.attention_for('auto', setup, 256) == 'fused'  # cuDNN's flash attention: no score tensors


def test_step_flops_fallbacks(monkeypatch, capsys):
  """Where XLA gives no cost analysis (a GPU with jax 0.11.2), --step-gflop is used and said so; --count-flops
  prints the count that --step-gflop takes."""
  setup, _ = sd_sampler.build(quick=True, steps=2, dtype='float32')
  loop, inputs = sd_sampler._loop(setup, 'default'), sd_sampler.sampler_inputs(setup, 2)
  direct = sd_sampler.common.xla_flops(sd_sampler.sampler_bench.lower_step(loop, setup.params, inputs))
  assert direct
  assert sd_sampler.step_gflop_per_image(setup, 2) == (pytest.approx(direct / 2 / 1e9), 'xla cost analysis')
  monkeypatch.setattr(sd_sampler.common, 'xla_flops', lambda program: None)
  assert sd_sampler.step_gflop_per_image(setup, 2) == (None, None)
  setup.step_gflop = 781.7
  assert sd_sampler.step_gflop_per_image(setup, 2) == (781.7, '--step-gflop')
  monkeypatch.undo()
  result = sd_sampler.main(['--quick', '--count-flops', '--batches=2', '--steps=2', '--dtype=float32'])
  assert result['step_gflop_per_image'][2] == pytest.approx(direct / 2 / 1e9)
  assert 'GFLOP per image per step (xla cost analysis)' in capsys.readouterr().out
