"""The paper's losses (section III-B eq. 1-6, section III-C eq. 7) as pure jax.numpy functions.

Conventions, shared by every function here:
  logits / probabilities  float [B, H, W, K], classes last (K = number of classes incl. background)
  labels                  int   [B, H, W] class indices 0..K-1
  images                  float [B, H, W, C]
Every scalar is a *mean over the batch* (the paper writes sums over samples i; a mean keeps the learning
rate independent of the batch size). Per-pixel terms are averaged over pixels too; each docstring says
exactly which axes are summed and which are averaged. Teacher quantities are wrapped in `jax.lax.stop_gradient`, so the
teacher can be passed in as plain outputs without freezing anything else.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

Array = jax.Array

# Clip for log(p) of probabilities: softmax in float32 can underflow to exactly 0 for a confident network,
# and log(0) would turn a finite loss into inf/nan gradients.
_LOG_EPS = 1e-12

KD_DISTS = ('dice', 'js')


def cross_entropy(logits: Array, target: Array) -> Array:
  """Mean cross-entropy of softmax(logits) against `target`.

  logits [..., K]; target either int class indices [...] or probabilities [..., K] (soft labels).
  Returns -sum_k target_k log softmax(logits)_k, averaged over every leading position (batch and pixels).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if jnp.issubdtype(target.dtype, jnp.integer):
    if target.shape != logits.shape[:-1]:
      raise ValueError(f'integer target shape {target.shape} != logits shape {logits.shape} without classes')
    nll = -jnp.take_along_axis(logp, target[..., None].astype(jnp.int32), axis=-1)[..., 0]
  else:
    if target.shape != logits.shape:
      raise ValueError(f'probability target shape {target.shape} != logits shape {logits.shape}')
    nll = -jnp.sum(target.astype(jnp.float32) * logp, axis=-1)
  return jnp.mean(nll)


def soft_dice(p: Array, q: Array, eps: float = 1e-6) -> Array:
  """Soft Dice similarity of two probability maps [B, ..., K] (1 = identical hard maps).

  Per sample and class: (2 sum_pixels p q + eps) / (sum_pixels p + sum_pixels q + eps); then the mean over
  batch and classes. The eps in the numerator makes a class absent from both maps count as a perfect match
  (Dice 1) instead of 0, so empty classes do not dominate the loss.
  """
  p = p.astype(jnp.float32)
  q = q.astype(jnp.float32)
  axes = tuple(range(1, p.ndim - 1))  # pixel axes
  inter = jnp.sum(p * q, axis=axes)
  denom = jnp.sum(p, axis=axes) + jnp.sum(q, axis=axes)
  return jnp.mean((2.0 * inter + eps) / (denom + eps))


def soft_dice_loss(p: Array, q: Array, eps: float = 1e-6) -> Array:
  """1 - soft_dice(p, q): the Dice loss (0 for identical hard maps)."""
  return 1.0 - soft_dice(p, q, eps)


def _xlogx_over(p: Array, m: Array) -> Array:
  """sum_k p_k log(p_k / m_k) with 0 log 0 = 0 (probabilities clipped inside the log only)."""
  return jnp.sum(p * (jnp.log(jnp.maximum(p, _LOG_EPS)) - jnp.log(jnp.maximum(m, _LOG_EPS))), axis=-1)


def js_similarity(p: Array, q: Array) -> Array:
  """1 - JS(p || q) / log 2, per pixel over the class axis, averaged over batch and pixels.

  JS(p||q) = (KL(p||m) + KL(q||m)) / 2 with m = (p + q) / 2, natural log; dividing by log 2 (its maximum)
  puts the similarity in [0, 1], 1 for identical distributions.
  """
  p = p.astype(jnp.float32)
  q = q.astype(jnp.float32)
  m = 0.5 * (p + q)
  js = 0.5 * (_xlogx_over(p, m) + _xlogx_over(q, m))
  return jnp.mean(1.0 - js / jnp.log(2.0))


def gaussian_kl(mean: Array, logvar: Array) -> Array:
  """KL(N(mean, exp(logvar)) || N(0, I)), summed over all non-batch axes, averaged over the batch [B, ...]."""
  mean = mean.astype(jnp.float32)
  logvar = logvar.astype(jnp.float32)
  kl = 0.5 * (jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar)
  return jnp.mean(jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1))


def l2_reconstruction(x: Array, x_hat: Array) -> Array:
  """The paper's "L2 norm" L_rec, as the mean squared error over every element (batch, pixels, channels).

  A mean (not a sum) keeps the weights lambda / beta comparable across image sizes and channel counts.
  """
  return jnp.mean(jnp.square(x.astype(jnp.float32) - x_hat.astype(jnp.float32)))


def _kd_terms(student_logits: Array, teacher_logits: Array, dist: str) -> tuple[Array, Array]:
  """(1 - Dist(y~, y), CE(y, y~)) of eq. 1; y = softmax(teacher) is a fixed target."""
  if dist not in KD_DISTS:
    raise ValueError(f'dist={dist!r} is not one of {list(KD_DISTS)}')
  y = jax.lax.stop_gradient(jax.nn.softmax(teacher_logits.astype(jnp.float32), axis=-1))
  y_student = jax.nn.softmax(student_logits.astype(jnp.float32), axis=-1)
  sim = soft_dice(y_student, y) if dist == 'dice' else js_similarity(y_student, y)
  return 1.0 - sim, cross_entropy(student_logits, y)


def kd_loss(student_logits: Array, teacher_logits: Array, dist: str = 'dice') -> Array:
  """Eq. 1: (1 - Dist(y~, y)) + CE(y, y~), y = softmax(teacher) (no gradient), y~ = softmax(student).

  Logits [B, H, W, K]. Dist is the soft Dice similarity (mean over batch and classes) or 1 - JS / log 2
  (mean over batch and pixels); CE(y, y~) = -sum_k y_k log y~_k averaged over batch and pixels.
  """
  dist_term, ce = _kd_terms(student_logits, teacher_logits, dist)
  return dist_term + ce


def latent_kl(teacher_bottleneck: Array, student_bottleneck: Array, temperature: float = 1.0) -> Array:
  """Eq. 2: KL(S || T) of the flattened, softmax-normalised segmentation bottlenecks.

  Bottlenecks [B, ...] (same shape); each sample is flattened and normalised by softmax(. / temperature);
  KL(S || T) = sum_j S_j log(S_j / T_j) with S from the teacher (source model, no gradient) and T from the
  student (target model); mean over the batch. No temperature**2 rescaling is applied.
  """
  if teacher_bottleneck.shape != student_bottleneck.shape:
    raise ValueError(f'bottleneck shapes differ: teacher {teacher_bottleneck.shape}, '
                     f'student {student_bottleneck.shape}')
  b = teacher_bottleneck.shape[0]
  t_flat = jax.lax.stop_gradient(teacher_bottleneck.astype(jnp.float32)).reshape(b, -1) / temperature
  s_flat = student_bottleneck.astype(jnp.float32).reshape(b, -1) / temperature
  log_teacher = jax.nn.log_softmax(t_flat, axis=-1)
  log_student = jax.nn.log_softmax(s_flat, axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), axis=-1))


def segmentation_losses(logits: Array, labels: Array, num_classes: int) -> tuple[Array, Array]:
  """(cross-entropy, soft Dice loss) of logits [B, H, W, K] against int labels [B, H, W]: the segmentation
  objective of the teacher and of every segmenter. The Dice loss compares softmax(logits) with one-hot labels
  over all K classes (background included)."""
  ce = cross_entropy(logits, labels)
  dice = soft_dice_loss(jax.nn.softmax(logits.astype(jnp.float32), axis=-1),
                        jax.nn.one_hot(labels, num_classes, dtype=jnp.float32))
  return ce, dice


IGNORE = -1  # label of pixels no loss reads (self-training: pseudo-labels below the confidence threshold)


def masked_segmentation_losses(logits: Array, labels: Array, num_classes: int) -> tuple[Array, Array]:
  """`segmentation_losses` where pixels labelled IGNORE (any negative label) count in neither term: the
  cross-entropy is the mean over the other pixels (0 when there are none), and the soft Dice compares
  softmax(logits) and the one-hot labels with both zeroed at ignored pixels."""
  valid = labels >= 0
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  weight = valid.astype(jnp.float32)
  ce = jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)
  dice = soft_dice_loss(jnp.exp(logp) * weight[..., None],
                        jax.nn.one_hot(safe, num_classes, dtype=jnp.float32) * weight[..., None])
  return ce, dice


def teacher_loss(out: Mapping[str, Array], images: Array, labels: Array, *, num_classes: int, beta: float,
                 seg_weight: float) -> tuple[Array, dict[str, Array]]:
  """Stage 1 (source FFD-VAE S): seg_weight (CE + soft Dice loss) + L_rec + beta (KL(z_seg) + KL(z_dom)).

  out: FFD-VAE outputs seg_logits [B, H, W, K], recon [B, H, W, C], seg_mean/seg_logvar [B, h, w, c],
  dom_mean/dom_logvar [B, D]. images [B, H, W, C]; labels int [B, H, W]. The Dice loss compares
  softmax(seg_logits) with one-hot labels. Returns (loss, metrics) with every term a float32 scalar.
  """
  ce, dice = segmentation_losses(out['seg_logits'], labels, num_classes)
  rec = l2_reconstruction(images, out['recon'])
  kl_seg = gaussian_kl(out['seg_mean'], out['seg_logvar'])
  kl_dom = gaussian_kl(out['dom_mean'], out['dom_logvar'])
  loss = seg_weight * (ce + dice) + rec + beta * (kl_seg + kl_dom)
  metrics = {'loss': loss, 'ce': ce, 'dice_loss': dice, 'rec': rec, 'kl_seg': kl_seg, 'kl_dom': kl_dom}
  return loss, metrics


def student_loss(student_out: Mapping[str, Array], teacher_out: Mapping[str, Array], images: Array, *,
                 alpha: float, lam: float, beta: float, dist: str,
                 latent_temperature: float) -> tuple[Array, dict[str, Array]]:
  """Stage 2 (target FFD-VAE T), eq. 6: L_rec + lam (L_kd + alpha L_latent) + beta (KL(z_seg) + KL(z_dom)).

  student_out / teacher_out: FFD-VAE output dicts (see `teacher_loss`) of T and of the frozen S, both applied
  to the same target images [B, H, W, C]. L_kd (eq. 1) compares the seg logits; L_latent (eq. 2) compares the
  z_seg posterior means, the "segmentation bottlenecks". The beta KL term on the student's posteriors is not
  written in the paper's eq. 6, but a VAE needs it to keep q(z|x) close to the prior that sampling relies on.
  """
  dist_term, kd_ce = _kd_terms(student_out['seg_logits'], teacher_out['seg_logits'], dist)
  l_kd = dist_term + kd_ce
  l_latent = latent_kl(teacher_out['seg_mean'], student_out['seg_mean'], latent_temperature)
  l_skd = l_kd + alpha * l_latent  # eq. 3
  rec = l2_reconstruction(images, student_out['recon'])
  kl_seg = gaussian_kl(student_out['seg_mean'], student_out['seg_logvar'])
  kl_dom = gaussian_kl(student_out['dom_mean'], student_out['dom_logvar'])
  loss = rec + lam * l_skd + beta * (kl_seg + kl_dom)
  metrics = {'loss': loss, 'rec': rec, 'kd': l_kd, 'kd_dist': dist_term, 'kd_ce': kd_ce, 'latent': l_latent,
             'skd': l_skd, 'kl_seg': kl_seg, 'kl_dom': kl_dom}
  return loss, metrics


def diffusion_loss(noise: Array, eps_pred: Array, weights: Array | None = None) -> Array:
  """Eq. 7: ||eps - D(x_t, t, z_dom)||^2 as the mean squared error over every element (batch, pixels,
  channels); `weights` [B] (min-SNR weighting) scale each sample's mean before the batch mean."""
  per_sample = jnp.mean(jnp.square(noise.astype(jnp.float32) - eps_pred.astype(jnp.float32)),
                        axis=tuple(range(1, noise.ndim)))
  return jnp.mean(per_sample if weights is None else per_sample * weights.astype(jnp.float32))


LOSS_WEIGHTINGS = ('uniform', 'min_snr')


def min_snr_weights(alphas_cumprod_t: Array, gamma: float, prediction_type: str) -> Array:
  """Min-SNR-gamma loss weights (Hang et al. 2023) [B] for timesteps with alpha-bar `alphas_cumprod_t` [B].

  SNR = a / (1 - a). Weighting the x0 error by min(SNR, gamma) keeps the many easy low-noise steps from
  dominating; written for the network's own target, that is min(SNR, gamma) / SNR for eps-prediction and
  min(SNR, gamma) / (SNR + 1) for v-prediction.
  """
  a = alphas_cumprod_t.astype(jnp.float32)
  snr = a / jnp.maximum(1.0 - a, 1e-12)
  clipped = jnp.minimum(snr, gamma)
  return clipped / (snr + 1.0) if prediction_type == 'v_prediction' else clipped / jnp.maximum(snr, 1e-12)
