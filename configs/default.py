"""Every field of a diffuseg_jax run, with its default. Dataset configs import this and override.

  python -m diffuseg_jax.main --config=configs/default.py --workdir=runs/default  # full
  python -m diffuseg_jax.main --config=configs/default.py:quick --workdir=runs/default_quick  # quick
  python -m diffuseg_jax.main --config=configs/default.py:gpu --workdir=runs/default_gpu  # gpu
  python -m diffuseg_jax.main --config=configs/default.py:sd --config.sd_path=/path/to/sd --workdir=runs/default_sd

(The defaults are the embedded MNIST -> MNIST-M experiment; `configs/mnist_m.py` is the named entry.)
Variants, shared by the dataset configs (`quick` and `gpu` below; each dataset adds its own sizes):
  full   the defaults below;
  quick  a few-minute CPU run-through of the whole pipeline on the same data (embedded, or any data.root
         with --config.data.name/root): fewer steps, smaller networks, at most data.max_cases subjects per
         split, one segmentation seed;
  gpu    the sizes for a real run on a GPU: long training (diffusion 30k steps, segmentation 5k), batches of
         128, wider networks; train.compute_dtype=auto (bfloat16 for the FFD-VAE on a GPU, float32 elsewhere);
  sd     the paper's Stable Diffusion route from a local folder, --config.sd_path=DIR (diffusers Flax layout:
         vae/, unet/, scheduler/): its VAE as the latent space, its UNet as the denoiser, its schedule.
"""

from collections.abc import Callable

import ml_collections
from ml_collections.config_dict import placeholder

from diffuseg_jax.config_files import apply_variant
from diffuseg_jax.stages import STAGES


def d(**kwargs) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(kwargs)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Comma-separated subset of diffuseg_jax.stages.STAGES, run in pipeline order. A stage whose units are
  # complete for this config (same fingerprint, diffuseg_jax/run_identity.py) is reused; others resume.
  c.stages = ','.join(STAGES)

  c.data = d(
      name='mnist_m',  # mnist_m | folder | mscmr | acdc | mmwhs | retina
      root=placeholder(str),  # dataset folder (required for every dataset except mnist_m); `~/` is the home folder
      # Slices/images are resized (or padded, mnist_m) to image_size x image_size; a multiple of 2^vae.levels,
      # 2^segmentation.levels and (for the diffusion UNet) of autoencoder.downsample * 2^(len(channel_mult) - 1).
      image_size=32,
      # Embedded MNIST -> MNIST-M: counts of digits in each disjoint split (of the 5,000 shipped digits).
      num_source=2000,
      num_target=2000,
      num_test=1000,
      mnist_idx_dir=placeholder(str),  # optional folder with full MNIST idx files (train-images-idx3-ubyte[.gz], ...)
      # Medical / folder options.
      # Dataset-specific source/target selectors (e.g. MSCMR sequences 'C0' -> 'DE', MM-WHS modalities 'mr' -> 'ct',
      # retina 'drive' -> 'iostar'); folder and mnist_m have none and ignore them.
      source=placeholder(str),
      target=placeholder(str),
      target_root=placeholder(str),  # optional second root when the target is a different dataset (e.g. IOSTAR)
      slice_axis=2,  # axis of the (canonically reoriented, RAS) volume that 2D slices are taken along
      # NIfTI volumes: intensities clipped at these percentiles of the volume (0 <= low < high <= 100), then
      # scaled to [0, 1]; 2D raster images are scaled by their bit depth instead.
      percentiles=(0.5, 99.5),
      empty_slices='keep',  # keep | drop | drop_source: slices whose label is all background
      split_fractions=(0.7, 0.1, 0.2),  # train / val / test, by subject
      channels=placeholder(int),  # force a channel count (1 or 3); None: the dataset's (folder: the larger found)
      max_cases=placeholder(int),  # cap the number of subjects per split (quick runs)
  )

  # FFD-VAE (paper section III-B, eq. 1-6).
  c.vae = d(
      compute_dtype='inherit',  # this network's: inherit (train.compute_dtype) | float32 | bfloat16
      base_channels=32,
      levels=2,  # downsampling levels of the encoders: z_seg is (H / 2^levels, W / 2^levels, z_seg_channels)
      z_seg_channels=8,
      z_dom_dim=16,
      beta=1e-3,  # weight of the KL(q(z|x) || N(0, I)) terms of both encoders
      seg_weight=1.0,  # teacher: CE + soft Dice weight
      alpha=1.0,  # eq. 3: L_skd = L_kd + alpha * L_latent
      lam=1.0,  # eq. 6: L_FFD = L_rec + lam * L_skd
      dist='dice',  # eq. 1 Dist(): 'dice' (soft Dice) or 'js' (1 - Jensen-Shannon divergence / log 2)
      latent_temperature=1.0,  # softmax temperature of the flattened bottlenecks in eq. 2
      teacher_steps=1500,
      student_steps=1500,
      batch_size=64,
      learning_rate=1e-3,
      # Student T: random flips / 90-degree rotations of the target images (training batches only). For
      # few-shot targets; off by default (every published run trained without it).
      augment_target=False,
      # Student T is distilled on: target (unlabelled target images) | target_and_source (the source images too,
      # labels unused: the paper's "using the given segmentation dataset" read literally).
      distill_on='target',
      # Teacher S: each source image given random intensities (a value per labelled class, or a random intensity
      # curve: source_intensity_curves) plus noise (data/intensity.py), so that S does not learn the source's
      # contrast and its pseudo-labels of the target, which colour r(m), are better (benchmarks/QUALITY.md).
      # False: the paper's teacher.
      augment_source_intensity=True,
      # Which intensities: per_class (every image a random intensity per labelled class, evenly spaced levels in a
      # random order: no image keeps an order the network could learn as a shortcut) | any (half of them
      # non-monotone, so classes in the middle of the range can swap order too, as tissue does between T1 and
      # T2 / PD MRI) | monotone (increasing or reversed) | classes (as any, but half of the remapped images get
      # a random intensity per labelled class instead of a curve). benchmarks/QUALITY.md.
      source_intensity_curves='per_class',
      # With those curves, also a random smooth bias field and a random blur per source image (data/intensity.py):
      # the other ways two scanners image one anatomy. benchmarks/QUALITY.md.
      augment_source_bias_blur=False,
      # Which weights of the teacher and of the student are kept: val (those whose segmentation head scores the
      # best Dice on the labelled target validation split, scored every select_every steps and at the last; the
      # final weights where there is no such split; selection.py) | last (the final EMA weights, the paper's).
      # A teacher's accuracy on the target peaks, then falls as it fits the source (benchmarks/QUALITY.md).
      select='val',
      select_every=20,
  )

  # Latent space of the diffusion model (stage `autoencoder`).
  c.autoencoder = d(
      compute_dtype='inherit',  # this network's: inherit (train.compute_dtype) | float32 | bfloat16
      kind='identity',  # identity (pixel space) | kl (trained here) | pretrained (local diffusers Flax dir)
      path=placeholder(str),  # local directory of a diffusers FlaxAutoencoderKL, for kind='pretrained'
      downsample=4,  # spatial factor f for kind='kl' (power of two)
      latent_channels=4,
      base_channels=32,
      kl_weight=1e-6,
      steps=2000,
      batch_size=32,
      learning_rate=1e-3,
      scaling_factor=placeholder(float),  # latents are multiplied by this; None: 1 / std of training latents
  )

  # Conditional diffusion UNet D(x_t, t, z_dom) (eq. 7).
  c.diffusion = d(
      compute_dtype='inherit',  # this network's: inherit (train.compute_dtype) | float32 | bfloat16
      # linear | scaled_linear | cosine | pretrained (the scheduler config beside pretrained_unet_path: its
      # schedule, num_timesteps and betas replace the three fields below)
      schedule='linear',
      num_timesteps=1000,
      beta_start=1e-4,
      beta_end=2e-2,
      base_channels=32,
      channel_mult=(1, 2, 2),
      num_res_blocks=1,
      attention_levels=(2,),  # levels (indices into channel_mult) with self/cross-attention
      num_heads=4,
      cond_mode='both',  # cross_attention | film | both
      num_cond_tokens=4,  # z_dom is projected to this many cross-attention tokens
      cond_dropout=0.1,  # probability of replacing z_dom by the learned null condition (for guidance)
      pretrained_unet_path=placeholder(str),  # local diffusers FlaxUNet2DConditionModel directory (SD layout)
      # What the UNet predicts: epsilon (eq. 7) | v_prediction (SD 2.x) | pretrained (the scheduler config's)
      prediction_type='epsilon',
      finetune='full',  # a pretrained UNet: full | attention (only its attention blocks + the z_dom projection)
      # pseudo_labels (D also sees the label map: trained with the student's pseudo-labels of the target images,
      # sampled with the given mask; sampling/mask_condition.py; benchmarks/QUALITY.md) | none (eq. 7: D(x_t, t,
      # z_dom), the paper's; the Stable Diffusion route, whose pretrained UNet takes no extra channels)
      mask_condition='pseudo_labels',
      # The target labels that the mask-conditioned denoiser and the pasted region's class appearance learn
      # from: student (the FFD-VAE student's segmentation) | diffuseg (a second round: those of the diffuseg
      # segmenters of a first round run with the student's, diffuseg_jax/relabel.py; each diffuseg segmenter
      # keeps the round's weights that score higher on validation; about twice the diffusion, synthesis and
      # diffuseg training time; benchmarks/QUALITY.md) | auto (diffuseg where the data has a labelled
      # validation split to choose each seed's round on, else student: the run logs which, config.json records it)
      pseudo_labels_from='auto',
      loss_weighting='uniform',  # uniform (eq. 7) | min_snr (min(SNR, gamma) weighting of the x0 error)
      min_snr_gamma=5.0,
      steps=4000,
      batch_size=64,
      learning_rate=2e-4,
      # Random flips / 90-degree rotations of the target latents (z_dom kept: the domain code of the
      # unrotated image; exact for pixel space, approximate through an autoencoder). For few-shot targets;
      # off by default (every published run trained without it).
      augment=False,
  )

  # Blended DDIM synthesis (stage `synthesize`).
  c.sampling = d(
      num_steps=50,
      eta=0.0,
      guidance_scale=1.0,
      blend_mode='hard',  # hard | soft | soft_vp (soft, keeping the noise variance) | pyramid
      # Fraction of the DDIM steps that blend; the rest denoise freely (harmonise): with a mask-conditioned
      # denoiser the region is redrawn in the target's appearance (0.5; QUALITY.md). 1.0: the paper's loop.
      blend_until=0.5,
      soft_sigma=1.0,  # soft mode: Gaussian blur sigma (latent pixels) of the mask edge
      pyramid_levels=3,  # pyramid mode: Laplacian pyramid levels
      # Pixel mask -> latent mask: coverage (every latent pixel holding a labelled pixel: thin structures keep
      # every pixel) | majority (more than half covered). The same for pixel-space diffusion (factor 1).
      latent_mask='coverage',
      region_content='rendered',  # rendered (per-class target appearance) | label (literal label map)
      mask_union=True,  # blend with the union of foreground classes (True) or all classes incl. background
      # source | test (test: the masks are the test split's own labels, so every score trained on synthetic
      # pairs is an ORACLE; the run prints a warning before its first stage).
      mask_set='source',
      # Pairs to synthesise. None: one per mask of the mask set; more than the masks: further passes over
      # all masks, each in a seeded order (stages/synthesize.py mask_plan), each pair with its own reference.
      num_masks=placeholder(int),
      batch_size=64,
      shard_size=256,  # pairs per atomically written output shard
      writer_queue=2,  # finished shards waiting for the background writer before sampling waits for it
      clip_x0=placeholder(float),  # None: 1.0 in pixel space (images in [-1, 1]), no clipping for latents
  )

  # Segmentation UNet and the paper's Table II strategies (stage `segment`).
  c.segmentation = d(
      compute_dtype='inherit',  # this network's: inherit (train.compute_dtype) | float32 | bfloat16
      base_channels=16,
      levels=3,
      # transfer | self | semi | diffuseg; self and semi train on target labels (folder: <root>/target/labels/).
      strategies='transfer,self,semi,diffuseg,diffuseg_st',
      seeds=(0, 1, 2),
      steps=800,
      batch_size=64,
      learning_rate=1e-3,
      augment=True,  # random flips / 90-degree rotations
      # Strategies whose training images get random intensity curves (sometimes reversed) plus noise
      # (data/intensity.py), so contrast becomes a nuisance and shape and texture are learned: 'a,b' | all | none.
      augment_intensity='none',
      # Which EMA weights evaluation uses: val (the best mean foreground Dice on the labelled validation split,
      # scored every select_every steps; the last step where there is no validation split) | last. Never test.
      select='val',
      select_every=100,
      # diffuseg_st: target pixels whose pseudo-label (the diffuseg segmenter's softmax) is below this
      # confidence are ignored by the loss.
      st_threshold=0.9,
  )

  # Shared training options. Every training batch size above (vae, autoencoder, diffusion, segmentation) must be
  # a multiple of the device count and of the process count; sampling and eval batches are rounded up to one.
  c.train = d(
      ema_decay=0.999,
      weight_decay=1e-4,
      grad_clip=1.0,
      warmup_steps=100,
      log_every=50,
      progress=True,  # tqdm progress bars
      # Activations and matmuls of every network in this dtype (unless its section sets its own); params,
      # optimizer state and losses stay float32. auto: bfloat16 on GPUs/TPUs for the networks measured to gain
      # from it (the FFD-VAE, a pretrained SD UNet), float32 elsewhere and on CPUs (runtime.auto_dtype).
      compute_dtype='float32',  # float32 | bfloat16 | auto
  )

  c.mesh = d(
      axes=(('data', -1),),  # one mesh axis over all devices; batch sharded on 'data', params replicated
  )

  c.checkpoint = d(
      every_steps=500,
      max_to_keep=2,
      # Multi-process runs: steps between two checks that all processes agree on a SIGTERM (or a first Ctrl-C; a
      # collective): it takes effect within this many steps plus one save (see train/preemption.py).
      preemption_check_every=10,
  )

  c.eval = d(
      batch_size=128,
      hd_percentile=95.0,
      inception_path=placeholder(str),  # local Inception weights (.npz) for FID/KID; None: in-project feature network
      num_quality_images=1000,  # synthetic and real images compared by FID / KID / MBS
      num_figure_examples=8,
  )
  return apply_variant(c, arg, VARIANTS, __file__)


def quick(c: ml_collections.ConfigDict) -> None:
  """A few-minute CPU run-through (of any dataset: dataset configs apply this, then their image size).

  data.num_* are the embedded MNIST -> MNIST-M counts; data.max_cases (subjects, or images for 2D data, per
  split) applies to every other dataset."""
  c.data.update(num_source=1000, num_target=1000, num_test=300, max_cases=8)
  c.vae.update(base_channels=16, teacher_steps=150, student_steps=150, batch_size=32)
  c.autoencoder.update(base_channels=16, steps=300, batch_size=16)
  c.diffusion.update(base_channels=16, steps=300, batch_size=16)
  c.sampling.update(num_steps=20, num_masks=256)
  c.segmentation.update(base_channels=8, steps=150, batch_size=32, seeds=(0,), strategies='transfer,self,diffuseg')
  c.eval.num_quality_images = 256


def gpu(c: ml_collections.ConfigDict) -> None:
  """The sizes of a real run on one GPU or more (global batches divide by 8 devices); train.compute_dtype=auto."""
  c.vae.update(base_channels=64, teacher_steps=5000, student_steps=5000, batch_size=128)
  c.autoencoder.update(base_channels=64, steps=10000, batch_size=64)
  c.diffusion.update(base_channels=128, steps=30000, batch_size=128)
  c.sampling.update(batch_size=256, shard_size=1024)
  c.segmentation.update(base_channels=32, steps=5000, batch_size=128)
  c.train.update(warmup_steps=500, log_every=100, compute_dtype='auto')
  c.checkpoint.every_steps = 2000
  c.eval.update(batch_size=256, num_quality_images=2000)


def sd_route(c: ml_collections.ConfigDict) -> None:
  """The Stable Diffusion pieces of `sd` without its sizes: `config.sd_path` (a local diffusers Flax folder:
  vae/, unet/, scheduler/) gives the latent space, the denoiser, the schedule and the prediction type."""
  c.sd_path = placeholder(str)
  c.data.channels = 3  # the SD VAE reads RGB: grayscale slices are repeated into three channels
  c.autoencoder.kind = 'pretrained'
  c.autoencoder.path = c.get_ref('sd_path')  # follows --config.sd_path
  c.autoencoder.scaling_factor = None  # the VAE config's
  c.diffusion.pretrained_unet_path = c.get_ref('sd_path')
  c.diffusion.update(schedule='pretrained', prediction_type='pretrained', finetune='attention')
  # The pretrained UNet reads the latent only (no label channels): the paper's loop, blending every step.
  c.diffusion.mask_condition = 'none'
  c.sampling.blend_until = 1.0


def sd(c: ml_collections.ConfigDict) -> None:
  """Stable Diffusion from the local folder `--config.sd_path=DIR` (diffusers Flax layout: vae/, unet/,
  scheduler/; nothing is downloaded), on a GPU.

  The folder's VAE is the latent space (its scaling_factor), its UNet the denoiser with z_dom entering through
  its cross-attention tokens, its scheduler config the schedule, timestep count and prediction type (epsilon
  or v). 256 x 256 RGB images (32 x 32 x 4 latents; --config.data.image_size=512 for SD's native size); only
  the UNet's attention blocks and the z_dom projection are fine-tuned (--config.diffusion.finetune=full for
  all of it), at learning rate 1e-4 for 10k steps of batch 32; bfloat16 compute. The other networks keep the
  gpu variant's sizes.
  """
  gpu(c)
  sd_route(c)
  c.data.image_size = 256
  c.diffusion.update(steps=10000, batch_size=32, learning_rate=1e-4)
  c.train.compute_dtype = 'bfloat16'


def latent_slices(c: ml_collections.ConfigDict, name: str, **data) -> ml_collections.ConfigDict:
  """Dataset `name` as 128 x 128 slices (plus the `data` fields given), with latent diffusion in a KL
  autoencoder of factor 4: 32 x 32 x 4 latents (the medical datasets' setting)."""
  c.data.update(name=name, image_size=128, **data)
  c.autoencoder.update(kind='kl', downsample=4, latent_channels=4)
  return c


def quick_at(image_size: int, **data) -> Callable[[ml_collections.ConfigDict], None]:
  """The `quick` variant at `image_size` (plus the `data` fields given)."""

  def variant(c: ml_collections.ConfigDict) -> None:
    quick(c)
    c.data.update(image_size=image_size, **data)

  variant.__doc__ = f'`quick` at {image_size} x {image_size}'
  return variant


# The variants of a `latent_slices` dataset: quick at 64 x 64 (16 x 16 x 4 latents), gpu.
LATENT_SLICE_VARIANTS = {'quick': quick_at(64), 'gpu': gpu, 'sd': sd}
VARIANTS = {'quick': quick, 'gpu': gpu, 'sd': sd}
