"""Stage `synthesize`: blended DDIM synthesis of `sampling.num_masks` labelled target-domain images.

Pair i (the synthesis index, 0..M-1: its file name, its place in the synthetic set, its nnU-Net case name)
uses mask m_i = row `mask_index[i]` of the mask set (default: the source labels; `mask_plan`: rows 0..M-1
in order while M <= the number of masks, beyond that further passes over all masks, each in its own seeded
order) and a random target reference image x_ref(i) (seeded by i):
  z_dom   = T's domain code of x_ref                      (the condition)
  r(m)    = region content at noise level 0, in latent space:
              'rendered' (default): the label map painted with per-class target appearance: per-channel mean
                and std of the reference image's pixels under T's pseudo-labels (or a first round's labels,
                diffusion.pseudo_labels_from; global target statistics where the reference lacks a class),
                i.i.d. per pixel, then encoded;
              'label': the literal label map as intensities (class k -> -1 + 2k/(K-1) in every channel).
  x_0     = blended DDIM (sampling/sampler.py) with m = the union of foreground classes at latent resolution
  image   = decode(x_0)

A mask drawn more than once gives a different pair each time: its own reference image, region noise and
DDIM noise. Work is split into shards of `sampling.shard_size` synthesis indices; process p does shards
k % P == p on its LOCAL devices, and each shard is written atomically (synthetic_io.py), so a killed job
rerun skips finished shards and every synthesis index appears exactly once. Memory is flat in the number
of pairs: one shard at a time.
For NIfTI (medical) data the finished set is also exported as an nnU-Net v2 raw dataset,
synthetic/nnunet/Dataset501_<data.name>/ (imagesTr/, labelsTr/, dataset.json), to train nnU-Net on it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from diffuseg_jax import figures, logs, synthetic_io
from diffuseg_jax.background_writer import BackgroundWriter
from diffuseg_jax.data import export
from diffuseg_jax.errors import ConfigError, DataError
from diffuseg_jax.prefetch import prefetch
from diffuseg_jax.sampling import mask_condition, synthesis
from diffuseg_jax.sampling.sampler import SamplerSettings
from diffuseg_jax.stages import diffusion, student

NNUNET_DATASET_ID = 501  # synthetic/nnunet/Dataset501_<data.name>: medical (NIfTI) data only


def mask_set(ctx) -> np.ndarray:
  """Every label map of the mask set (`sampling.mask_set`): [N, H, W] int32 class indices."""
  cfg, data = ctx.config.sampling, ctx.data
  if cfg.mask_set == 'source':
    return np.asarray(data.source.labels, np.int32)
  if cfg.mask_set == 'test':
    return np.asarray(data.test.labels, np.int32)
  # config_validation.MASK_SETS
  raise ConfigError(f'config.sampling.mask_set={cfg.mask_set!r} is not one of source, test')


MASK_PLAN_SALT = 2718  # seeds the orders of the repeated passes over the masks (see `mask_plan`)


def mask_plan(num_available: int, num_masks: int | None, seed: int) -> np.ndarray:
  """int64 [M]: the mask-set row that synthesis index i = 0..M-1 draws its mask from.

  M = num_masks (None: num_available). The first pass is rows 0, 1, ..., num_available - 1 in order, so
  M <= num_available takes the first M masks (what this stage always did). A larger M draws further passes
  over ALL the masks, pass c >= 1 in the order `default_rng([seed, MASK_PLAN_SALT, c]).permutation`: every
  mask is used floor(M / N) or ceil(M / N) times (N = num_available), and the plan of M is the first M
  entries of the plan of any larger M (so raising num_masks only appends pairs).
  """
  if num_available < 1:
    raise DataError('sampling: the mask set is empty: there is no label map to synthesise from')
  m = num_available if num_masks is None else int(num_masks)
  passes = [np.arange(num_available)]
  for c in range(1, -(-m // num_available)):
    passes.append(np.random.default_rng([seed, MASK_PLAN_SALT, c]).permutation(num_available))
  return np.concatenate(passes)[:m].astype(np.int64)


def mask_indices(ctx, num_available: int | None = None) -> np.ndarray:
  """`mask_plan` of this run: the mask-set row of every synthesis index."""
  n = len(mask_set(ctx)) if num_available is None else num_available
  return mask_plan(n, ctx.config.sampling.num_masks, ctx.config.seed)


def mask_spacing(ctx, mask_index: np.ndarray) -> np.ndarray:
  """[M, 2] in-plane pixel size (mm for medical data) of the slices the masks `mask_index` come from."""
  split = ctx.data.source if ctx.config.sampling.mask_set == 'source' else ctx.data.test
  return split.spacing[np.asarray(mask_index)]


def export_nnunet(ctx) -> str:
  """The synthetic pairs as an nnU-Net v2 raw dataset: synthetic/nnunet/Dataset501_<data.name>/."""
  synth = synthetic_io.load_synthetic(ctx)
  channels = synth['image'].shape[-1]
  root = export.export_nnunet(
      {'images': synth['image'], 'labels': synth['label'], 'spacing': mask_spacing(ctx, synth['mask_index']),
       'names': [f'{ctx.config.data.name}_{int(i):07d}' for i in synth['synthesis_index']]},
      os.path.join(synthetic_io.synthetic_dir(ctx), 'nnunet'), NNUNET_DATASET_ID, str(ctx.config.data.name),
      ctx.data.class_names, ('image',) if channels == 1 else tuple(f'channel{c}' for c in range(channels)))
  return str(root)


def num_shards(ctx) -> int:
  return -(-len(mask_indices(ctx)) // ctx.config.sampling.shard_size)


def units(ctx) -> list[str]:
  return ['synthesize']


def reference_indices(num_masks: int, num_targets: int, seed: int) -> np.ndarray:
  """Reference target image of each synthesis index: uniform, fixed by (seed, index) whatever the sharding."""
  return np.random.default_rng([seed, 1729]).integers(0, num_targets, size=num_masks)


MIN_CLASS_PIXELS = 4  # fewer pseudo-labelled pixels of a class in a reference image: use the global stats


def class_appearance(ctx, student) -> dict[str, np.ndarray]:
  """Per-class, per-channel mean and std of target training pixels under T's pseudo-labels (or the labels
  diffusion.pseudo_labels_from names: diffusion.pseudo_labels).

  'image_mean'/'image_std' [N, K, C]: the statistics within each target image (its own appearance), falling
  back to 'mean'/'std' [K, C] (over all target images) where the image has < MIN_CLASS_PIXELS of a class.
  """
  images = ctx.data.target.images
  return appearance_statistics(images, diffusion.pseudo_labels(ctx, images, student), ctx.data.num_classes)


def appearance_statistics(images: np.ndarray, labels: np.ndarray, k: int) -> dict[str, np.ndarray]:
  """The statistics of `class_appearance` from images [N, H, W, C] and labels [N, H, W] in 0..k-1."""
  n, c = len(images), images.shape[-1]
  counts = np.zeros((n, k), np.float64)
  sums = np.zeros((n, k, c), np.float64)
  squares = np.zeros((n, k, c), np.float64)
  for cls in range(k):
    m = (labels == cls).astype(np.float64)
    counts[:, cls] = m.sum(axis=(1, 2))
    sums[:, cls] = np.einsum('nhw,nhwc->nc', m, images)
    squares[:, cls] = np.einsum('nhw,nhwc->nc', m, images.astype(np.float64) ** 2)
  total = np.maximum(counts.sum(0), 1)[:, None]
  mean = sums.sum(0) / total
  std = np.sqrt(np.maximum(squares.sum(0) / total - mean**2, 0.0))
  absent = counts.sum(0) < MIN_CLASS_PIXELS
  mean[absent] = images.reshape(-1, c).mean(0)
  std[absent] = images.reshape(-1, c).std(0)
  enough = (counts >= MIN_CLASS_PIXELS)[..., None]
  safe = np.maximum(counts, 1)[..., None]
  image_mean = np.where(enough, sums / safe, mean[None])
  image_std = np.where(enough, np.sqrt(np.maximum(squares / safe - (sums / safe) ** 2, 0.0)), std[None])
  return {'mean': mean.astype(np.float32), 'std': std.astype(np.float32),
          'image_mean': image_mean.astype(np.float32), 'image_std': image_std.astype(np.float32),
          'pseudo_label_fraction': counts.sum(0) / counts.sum()}


def render_regions(masks: np.ndarray, mode: str, appearance: dict | None, num_classes: int, channels: int,
                   rng: np.random.Generator, references: np.ndarray | None = None) -> np.ndarray:
  """Region content r(m) in image space [B, H, W, C] in [-1, 1].

  'label': class k -> -1 + 2k/(K-1) in every channel. 'rendered': each pixel of class k drawn from
  N(mean_k, std_k) per channel, with the statistics of the mask's reference target image (`references` [B]
  rows of appearance['image_mean']) so that the region matches the image it is blended into.
  """
  if mode == 'label':
    value = -1.0 + 2.0 * masks.astype(np.float32) / max(num_classes - 1, 1)
    return np.repeat(value[..., None], channels, axis=-1)
  rows = np.asarray(references)[:, None, None]
  mean, std = appearance['image_mean'][rows, masks], appearance['image_std'][rows, masks]
  return np.clip(mean + std * rng.standard_normal(mean.shape).astype(np.float32), -1.0, 1.0)


def run(ctx) -> None:
  cfg, data = ctx.config.sampling, ctx.data
  root = synthetic_io.synthetic_dir(ctx)
  masks = mask_set(ctx)
  plan = mask_indices(ctx, len(masks))  # synthesis index -> mask-set row
  shards = -(-len(plan) // cfg.shard_size)
  settings = SamplerSettings.from_config(ctx.config)
  student_model = student.load(ctx)
  unet, unet_params, codec = diffusion.load(ctx)
  if cfg.clip_x0 is None and codec.kind == 'identity':  # pixel space: images lie in [-1, 1]
    settings = dataclasses.replace(settings, clip_x0=1.0)
  alphas = jnp.asarray(diffusion.schedule(ctx.config).alphas_cumprod)
  z_dom_all = diffusion.domain_codes(ctx, data.target.images, student_model)
  refs = reference_indices(len(plan), len(data.target), ctx.config.seed)
  appearance = class_appearance(ctx, student_model) if cfg.region_content == 'rendered' else None

  # Synthesis runs on this process's devices only: processes work on disjoint shards independently.
  local = Mesh(np.asarray(jax.local_devices()), ('data',))
  ndev = len(jax.local_devices())
  batch_size = -(-cfg.batch_size // ndev) * ndev
  repl, rows = NamedSharding(local, P()), NamedSharding(local, P('data'))
  host = jax.tree.map(np.asarray, jax.device_get((unet_params, codec)))
  unet_params, codec = jax.device_put(host, repl)
  # The schedule is bound as a constant (as the sampler was first measured); params and data are arguments.
  conditioned = ctx.config.diffusion.mask_condition != 'none'
  synthesise = jax.jit(functools.partial(synthesis.synthesize, unet, settings, alphas),
                       in_shardings=(repl, repl, repl, rows, rows, rows) + ((rows,) if conditioned else ()),
                       out_shardings=(rows, rows))

  todo = shards_of_this_process(root, shards)
  base_key = ctx.rng('synthesize')

  def batches():
    """((shard, its synthesis indices, batch rows), device inputs) in order, built on a thread (`prefetch`) while
    the device samples."""
    for k in todo:
      idx = np.arange(k * cfg.shard_size, min((k + 1) * cfg.shard_size, len(plan)))
      for b, start in enumerate(range(0, len(idx), batch_size)):
        sel = idx[start:start + batch_size]
        pad = np.concatenate([sel, np.full(batch_size - len(sel), sel[-1])])
        m = masks[plan[pad]]
        rng = np.random.default_rng([ctx.config.seed, k, b])
        region = render_regions(m, cfg.region_content, appearance, data.num_classes, data.channels, rng,
                                refs[pad])
        blend_mask = (m > 0) if cfg.mask_union else np.ones_like(m, bool)
        key = jax.random.fold_in(jax.random.fold_in(base_key, k), b)
        inputs = (unet_params, codec, key, jax.device_put(region, rows),
                  jax.device_put(blend_mask.astype(np.float32), rows), jax.device_put(z_dom_all[refs[pad]], rows))
        if conditioned:  # the denoiser sees the given label map (diffusion.mask_condition)
          inputs += (jax.device_put(mask_condition.label_channels(m, data.num_classes, codec.downsample), rows),)
        yield (k, idx, sel), inputs

  bar = tqdm(total=sum(len(range(k * cfg.shard_size, min((k + 1) * cfg.shard_size, len(plan)))) for k in todo),
             desc='synthesize', disable=not ctx.show_progress, dynamic_ncols=True)
  timing = StageTiming()
  buffers: dict[int, tuple[list, list]] = {}
  last_inputs = None
  # Batches are rendered on a background thread while the device samples, batch i + 1 is dispatched before
  # batch i is copied back, and finished shards are written by another thread: the device never waits for
  # region rendering, the copy or the files.
  with BackgroundWriter(depth=cfg.writer_queue) as writer:
    for (k0, idx0, sel0), inputs, images, err in dispatch_in_order(synthesise, prefetch(batches()), timing):
      images, err, last_inputs = images[: len(sel0)], err[: len(sel0)], inputs
      timing.batch_done(len(sel0))
      bar.update(len(sel0))
      bar.set_postfix(img_s=f'{timing.images / timing.elapsed():.1f}')
      out_images, errs = buffers.setdefault(k0, ([], []))
      out_images.append(images)
      errs.append(err)
      if sel0[-1] == idx0[-1]:  # the shard's last batch: hand it to the writer
        del buffers[k0]
        timing.max_err = max(timing.max_err, float(np.max(np.concatenate(errs))))
        writer.submit(synthetic_io.write_shard, root, k0, np.concatenate(out_images), masks[plan[idx0]], idx0,
                      plan[idx0], refs[idx0], mask_spacing(ctx, plan[idx0]), data.image_format)
  bar.close()
  timing.finish(writer)
  sampler_rate = bare_sampler_rate(synthesise, last_inputs, batch_size) if last_inputs is not None else None
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('synthesize: all shards written')
  if not ctx.is_main_process:
    # Leave together with process 0, once the manifest exists: the next stage reads it.
    multihost_utils.sync_global_devices('synthesize: manifest merged')
    return
  missing = _missing_shards(root, shards, wait_s=120.0 if jax.process_count() > 1 else 0.0)
  if missing:
    raise RuntimeError(f'synthesize: shards {missing[:5]}... are missing after all processes finished')
  count = synthetic_io.merge_manifest(root, shards)
  # Before the metrics entry that marks the stage done: a failed export is retried by a rerun.
  nnunet_dir = export_nnunet(ctx) if data.image_format == 'nifti' else None
  result = {
      'num_images': count,
      **timing.summary(sampler_rate),
      'region_content': cfg.region_content, 'blend_mode': cfg.blend_mode, 'blend_until': cfg.blend_until,
      'num_steps': cfg.num_steps, 'eta': cfg.eta, 'guidance_scale': cfg.guidance_scale,
      # Largest |x_0 - r(m)| inside the blended region (latent space, this run's shards): 0 up to float
      # rounding for hard blending with blend_until = 1, where the method pastes r(m) at the last step.
      'region_max_abs_error_latent': timing.max_err if timing.images else None,
  }
  if nnunet_dir is not None:
    result['nnunet_dataset'] = os.path.join('synthetic', os.path.relpath(nnunet_dir, root))
  if appearance is not None:
    result['class_appearance_mean'] = appearance['mean'].tolist()
    result['class_appearance_std'] = appearance['std'].tolist()
  ctx.save_unit_results('synthesize', result)
  synth = synthetic_io.load_synthetic(ctx)
  n = min(ctx.config.eval.num_figure_examples, count)
  figures.synthesis_figure(synth['label'][:n], synth['image'][:n], data.target.images[synth['reference_index'][:n]],
                           os.path.join(ctx.unit_dir('synthesize'), 'figures', 'synthesis_examples.png'),
                           data.num_classes,
                           title='blended DDIM: given mask | synthetic with mask contour | target reference')
  ctx.complete('synthesize')
  logs.say(f'[synthesize] {count} images in {root}')
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('synthesize: manifest merged')


def shards_of_this_process(root: str, num: int) -> list[int]:
  """The unfinished shards this process samples: the unfinished ones dealt round-robin over the processes.

  Every process lists the finished shards before any of them writes one (a barrier), so they agree on the
  list, and a resumed job spreads what is left evenly (dealing all shards by k mod P would leave a process
  idle when the finished ones were mostly its own). Counts differ by at most one shard between processes.
  """
  todo = [k for k in range(num) if not synthetic_io.shard_done(root, k)]
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('synthesize: unfinished shards listed')
  return todo[jax.process_index()::jax.process_count()]


@dataclasses.dataclass
class StageTiming:
  """Images/s of the whole stage (sampling, copying back, writing files) after its first batch, which holds
  the compilation; `images_per_second_this_run` counts everything. `dispatch_in_order` marks the first batch's
  end (`first_ready`), the loop each batch back on the host (`batch_done`)."""
  start: float = dataclasses.field(default_factory=time.perf_counter)
  first_batch_done: float | None = None
  last_batch_done: float | None = None
  batches: int = 0
  images: int = 0
  images_after_first: int = 0
  end: float | None = None
  max_err: float = 0.0
  writer_busy_seconds: float = 0.0
  writer_wait_seconds: float = 0.0

  def elapsed(self) -> float:
    return max(time.perf_counter() - self.start, 1e-9)

  def first_ready(self) -> None:
    """The first batch's outputs are on the device (`dispatch_in_order` waits for them)."""
    self.first_batch_done = time.perf_counter()

  def batch_done(self, n: int) -> None:
    """A batch of n images is back on the host."""
    if self.batches:
      self.images_after_first += n
    self.batches += 1
    self.images += n
    self.last_batch_done = time.perf_counter()

  def finish(self, writer: BackgroundWriter) -> None:
    self.end = time.perf_counter()  # after the writer has written the last shard
    self.writer_busy_seconds, self.writer_wait_seconds = writer.busy_seconds, writer.wait_seconds

  def summary(self, sampler_rate: float | None) -> dict:
    """stage_*: from the first batch's end to the last shard written; sampling_*: to the last batch back on the
    host (the loop's own rate, without the wait for the last shard's files that a run pays once)."""
    steady = sampling = None
    if self.images_after_first and self.first_batch_done is not None:
      steady = self.images_after_first / max(self.end - self.first_batch_done, 1e-9)
      sampling = self.images_after_first / max(self.last_batch_done - self.first_batch_done, 1e-9)
    return {
        'images_per_second_this_run': self.images / (self.end - self.start) if self.images else None,
        'stage_images_per_second': steady,
        'sampling_images_per_second': sampling,
        'sampler_images_per_second': sampler_rate,
        'stage_vs_sampler': (steady / sampler_rate) if steady and sampler_rate else None,
        'sampling_vs_sampler': (sampling / sampler_rate) if sampling and sampler_rate else None,
        'writer_busy_seconds': round(self.writer_busy_seconds, 3),
        'writer_wait_seconds': round(self.writer_wait_seconds, 3),
    }


def dispatch_in_order(synthesise, items, timing: StageTiming):
  """(meta, inputs, images, err) for each (meta, inputs) of `items`, outputs copied to the host, in order.

  Item i + 1 is dispatched before item i is copied back, so the device has the next batch queued while the
  host copies and hands out this one. The first item is waited for before the second is dispatched, and its end
  opens `timing`'s steady window: on a GPU, dispatching a program with a loop (the sampler's scan) returns only
  near its end, so a first copy back made after the next dispatch would come one batch late and the window
  would count one batch too few (measured: 1.29x the bare program's rate on an H200)."""
  in_flight = None
  for item in itertools.chain(items, [None]):
    launched = None
    if item is not None:
      meta, inputs = item
      outputs = synthesise(*inputs)
      if timing.first_batch_done is None:
        jax.block_until_ready(outputs)
        timing.first_ready()
      launched = (meta, inputs, outputs)
    if in_flight is not None:
      meta0, inputs0, (images, err) = in_flight
      yield meta0, inputs0, np.asarray(images), np.asarray(err)
    in_flight = launched


def bare_sampler_rate(synthesise, inputs, batch_size: int) -> float:
  """Images/s of the compiled synthesis program alone (sample + decode, no host work), timed on one more
  call with the last batch's inputs: what the stage would give if rendering, copies and writing were free."""
  start = time.perf_counter()
  jax.block_until_ready(synthesise(*inputs))
  return batch_size / max(time.perf_counter() - start, 1e-9)


def _missing_shards(root: str, num: int, wait_s: float) -> list[int]:
  """Shards without a manifest, after waiting up to `wait_s` for them to appear: a shared filesystem (NFS)
  may show files that another node has just written only once its attribute cache expires."""
  deadline = time.monotonic() + wait_s
  while True:
    missing = [k for k in range(num) if not synthetic_io.shard_done(root, k)]
    if not missing or time.monotonic() >= deadline:
      return missing
    time.sleep(2.0)
