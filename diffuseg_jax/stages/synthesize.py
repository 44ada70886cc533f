"""Stage `synthesize`: blended DDIM synthesis of a labelled target-domain image for every mask.

For mask m_i (default: the source labels) and a random target reference image x_ref(i) (seeded by i):
  z_dom   = T's domain code of x_ref                      (the condition)
  r(m)    = region content at noise level 0, in latent space:
              'rendered' (default): the label map painted with per-class target appearance (per-channel mean
                and std of target pixels under T's pseudo-labels, i.i.d. per pixel), then encoded;
              'label': the literal label map as intensities (class k -> -1 + 2k/(K-1) in every channel).
  x_0     = blended DDIM (sampling/sampler.py) with m = the union of foreground classes at latent resolution
  image   = decode(x_0)

Work is split into shards of `sampling.shard_size` masks; process p does shards k % P == p on its LOCAL
devices, and each shard is written atomically (synthetic_io.py), so a killed job rerun skips finished shards
and every mask appears exactly once. Memory is flat in the number of masks: one shard at a time.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from diffuseg_jax import figures, synthetic_io
from diffuseg_jax.errors import ConfigError
from diffuseg_jax.inference import batched_apply
from diffuseg_jax.sampling import blend as blend_lib
from diffuseg_jax.sampling.sampler import SamplerSettings, blended_ddim_sample
from diffuseg_jax.stages import diffusion, ffd_vae


def masks_for(ctx) -> np.ndarray:
  """The label maps to synthesise from: [M, H, W] int32 class indices."""
  cfg, data = ctx.config.sampling, ctx.data
  if cfg.mask_set == 'source':
    masks = data.source.labels
  elif cfg.mask_set == 'test':
    masks = data.test.labels
  else:
    raise ConfigError(f"config.sampling.mask_set={cfg.mask_set!r} must be 'source' or 'test'")
  if cfg.num_masks is not None:
    masks = masks[: int(cfg.num_masks)]
  return np.asarray(masks, np.int32)


def num_shards(ctx) -> int:
  return -(-len(masks_for(ctx)) // ctx.config.sampling.shard_size)


def is_done(ctx) -> bool:
  return os.path.exists(os.path.join(synthetic_io.synthetic_dir(ctx), 'manifest.jsonl')) and \
      'synthesize' in ctx.read_metrics()


def reference_indices(num_masks: int, num_targets: int, seed: int) -> np.ndarray:
  """Reference target image of each mask: uniform, fixed by (seed, mask index) whatever the sharding."""
  return np.random.default_rng([seed, 1729]).integers(0, num_targets, size=num_masks)


def class_appearance(ctx, student) -> dict[str, np.ndarray]:
  """Per-class, per-channel mean and std of target training pixels under T's pseudo-labels: [K, C] each."""
  model, params = student
  images = ctx.data.target.images
  k = ctx.data.num_classes

  @jax.jit
  def pseudo(x, p):
    return jnp.argmax(model.apply({'params': p}, x, sample=False)['seg_logits'], -1)

  labels = batched_apply(pseudo, images, ctx.config.eval.batch_size, ctx.mesh, args=(params,))
  pix = images.reshape(-1, images.shape[-1])
  lab = labels.reshape(-1)
  mean = np.zeros((k, images.shape[-1]), np.float32)
  std = np.zeros_like(mean)
  overall_mean, overall_std = pix.mean(0), pix.std(0)
  for c in range(k):
    sel = pix[lab == c]
    mean[c], std[c] = (sel.mean(0), sel.std(0)) if len(sel) >= 10 else (overall_mean, overall_std)
  return {'mean': mean, 'std': std, 'pseudo_label_fraction': np.bincount(lab, minlength=k) / lab.size}


def render_regions(masks: np.ndarray, mode: str, appearance: dict | None, num_classes: int, channels: int,
                   rng: np.random.Generator) -> np.ndarray:
  """Region content r(m) in image space [B, H, W, C] in [-1, 1]."""
  if mode == 'label':
    value = -1.0 + 2.0 * masks.astype(np.float32) / max(num_classes - 1, 1)
    return np.repeat(value[..., None], channels, axis=-1)
  mean, std = appearance['mean'][masks], appearance['std'][masks]
  return np.clip(mean + std * rng.standard_normal(mean.shape).astype(np.float32), -1.0, 1.0)


def run(ctx) -> None:
  cfg, data = ctx.config.sampling, ctx.data
  root = synthetic_io.synthetic_dir(ctx)
  masks = masks_for(ctx)
  shards = num_shards(ctx)
  settings = SamplerSettings.from_config(ctx.config)
  student = ffd_vae.load(ctx, 'student')
  unet, unet_params, codec = diffusion.load(ctx)
  alphas = jnp.asarray(diffusion.schedule(ctx).alphas_cumprod)
  z_dom_all = diffusion.domain_codes(ctx, data.target.images, student)
  refs = reference_indices(len(masks), len(data.target), ctx.config.seed)
  appearance = class_appearance(ctx, student) if cfg.region_content == 'rendered' else None

  # Synthesis runs on this process's devices only: processes work on disjoint shards independently.
  local = Mesh(np.asarray(jax.local_devices()), ('data',))
  ndev = len(jax.local_devices())
  batch_size = -(-cfg.batch_size // ndev) * ndev
  repl, rows = NamedSharding(local, P()), NamedSharding(local, P('data'))
  host = jax.tree.map(np.asarray, jax.device_get((unet_params, codec)))
  unet_params, codec = jax.device_put(host, repl)
  f = codec.downsample

  @functools.partial(jax.jit, in_shardings=(repl, repl, repl, rows, rows, rows), out_shardings=(rows, rows))
  def synthesise(params, codec, key, region_image, mask, z_dom):
    region = codec.encode(region_image)
    m = blend_lib.mask_to_latent(mask, f)

    def eps_fn(x, t, z, drop):
      return unet.apply({'params': params}, x, t, z, drop)

    x0, _ = blended_ddim_sample(eps_fn, alphas, key, region, m, z_dom, settings)
    err = jnp.max(jnp.abs(x0 - region) * m, axis=(1, 2, 3))
    return jnp.clip(codec.decode(x0), -1.0, 1.0), err

  mine = [k for k in range(shards) if k % jax.process_count() == jax.process_index()]
  todo = [k for k in mine if not synthetic_io.shard_done(root, k)]
  base_key = ctx.rng('synthesize')
  bar = tqdm(total=sum(len(range(k * cfg.shard_size, min((k + 1) * cfg.shard_size, len(masks)))) for k in todo),
             desc='synthesize', disable=not ctx.show_progress, dynamic_ncols=True)
  max_err, t0, done_images = 0.0, time.perf_counter(), 0
  for k in todo:
    idx = np.arange(k * cfg.shard_size, min((k + 1) * cfg.shard_size, len(masks)))
    out_images, errs = [], []
    for b, start in enumerate(range(0, len(idx), batch_size)):
      sel = idx[start:start + batch_size]
      pad = np.concatenate([sel, np.full(batch_size - len(sel), sel[-1])])
      m = masks[pad]
      rng = np.random.default_rng([ctx.config.seed, k, b])
      region = render_regions(m, cfg.region_content, appearance, data.num_classes, data.channels, rng)
      blend_mask = (m > 0) if cfg.mask_union else np.ones_like(m, bool)
      key = jax.random.fold_in(jax.random.fold_in(base_key, k), b)
      images, err = synthesise(unet_params, codec, key, jax.device_put(region, rows),
                               jax.device_put(blend_mask.astype(np.float32), rows),
                               jax.device_put(z_dom_all[refs[pad]], rows))
      out_images.append(np.asarray(images)[: len(sel)])
      errs.append(np.asarray(err)[: len(sel)])
      done_images += len(sel)
      bar.update(len(sel))
      bar.set_postfix(img_s=f'{done_images / (time.perf_counter() - t0):.1f}')
    max_err = max(max_err, float(np.max(np.concatenate(errs))))
    synthetic_io.write_shard(root, k, np.concatenate(out_images), masks[idx], idx, refs[idx],
                             data.source.spacing[idx % len(data.source)] if cfg.mask_set == 'source'
                             else data.test.spacing[idx % len(data.test)], data.image_format)
  bar.close()
  elapsed = time.perf_counter() - t0
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('synthesize: all shards written')
  if not ctx.is_main_process:
    return
  missing = [k for k in range(shards) if not synthetic_io.shard_done(root, k)]
  if missing:
    raise RuntimeError(f'synthesize: shards {missing[:5]}... are missing after all processes finished')
  count = synthetic_io.merge_manifest(root, shards)
  result = {
      'num_images': count,
      'images_per_second_this_run': (done_images / elapsed) if done_images else None,
      'region_content': cfg.region_content, 'blend_mode': cfg.blend_mode, 'blend_until': cfg.blend_until,
      'num_steps': cfg.num_steps, 'eta': cfg.eta, 'guidance_scale': cfg.guidance_scale,
      # Largest |x_0 - r(m)| inside the blended region (latent space, this run's shards): 0 up to float
      # rounding for hard blending with blend_until = 1, where the method pastes r(m) at the last step.
      'region_max_abs_error_latent': max_err if done_images else None,
  }
  if appearance is not None:
    result['class_appearance_mean'] = appearance['mean'].tolist()
    result['class_appearance_std'] = appearance['std'].tolist()
  ctx.update_metrics('synthesize', result)
  synth = synthetic_io.load_synthetic(ctx)
  n = min(ctx.config.eval.num_figure_examples, count)
  figures.synthesis_figure(synth['label'][:n], synth['image'][:n], data.target.images[synth['reference_index'][:n]],
                           ctx.path('figures', 'synthesis_examples.png'), data.num_classes,
                           title='blended DDIM: given mask | synthetic with mask contour | target reference')
  print(f'[synthesize] {count} images in {root}', flush=True)
