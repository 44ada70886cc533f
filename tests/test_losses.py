"""Losses (paper eq. 1-7) against numpy / scipy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats
from scipy.spatial import distance

from diffuseg_jax import losses

RNG = np.random.default_rng(0)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_ce(logits, target_probs):
  return np.mean(-np.sum(target_probs * np.log(_softmax(logits)), -1))


def _np_dice(p, q, eps=1e-6):
  b, k = p.shape[0], p.shape[-1]
  vals = []
  for i in range(b):
    for c in range(k):
      pi, qi = p[i, ..., c].ravel(), q[i, ..., c].ravel()
      vals.append((2 * np.dot(pi, qi) + eps) / (pi.sum() + qi.sum() + eps))
  return np.mean(vals)


def _np_js_sim(p, q):
  pf, qf = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
  return np.mean([1.0 - distance.jensenshannon(a, b, base=2) ** 2 for a, b in zip(pf, qf, strict=True)])


def _np_gauss_kl(mean, logvar):
  sd = np.exp(0.5 * logvar)
  per = np.log(1.0 / sd) + (sd**2 + mean**2) / 2.0 - 0.5
  return np.mean(per.reshape(per.shape[0], -1).sum(-1))


def _np_latent_kl(teacher, student, temp):
  b = teacher.shape[0]
  s = special.softmax(teacher.reshape(b, -1) / temp, axis=-1)
  t = special.softmax(student.reshape(b, -1) / temp, axis=-1)
  return np.mean([stats.entropy(s[i], t[i]) for i in range(b)])


def test_cross_entropy_int_and_soft_targets():
  logits = RNG.normal(size=(2, 3, 4, 5)).astype(np.float32)
  labels = RNG.integers(0, 5, size=(2, 3, 4))
  onehot = np.eye(5)[labels]
  np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)),
                             _np_ce(logits, onehot), rtol=1e-5)
  probs = _softmax(RNG.normal(size=(2, 3, 4, 5)))
  np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(probs, jnp.float32)),
                             _np_ce(logits, probs), rtol=1e-5)


def test_soft_dice_against_loop_and_extremes():
  p = _softmax(RNG.normal(size=(2, 4, 4, 3))).astype(np.float32)
  q = _softmax(RNG.normal(size=(2, 4, 4, 3))).astype(np.float32)
  np.testing.assert_allclose(losses.soft_dice(p, q), _np_dice(p, q), rtol=1e-5)
  np.testing.assert_allclose(losses.soft_dice_loss(p, q), 1 - _np_dice(p, q), rtol=1e-5)
  hard = np.eye(3, dtype=np.float32)[RNG.integers(0, 3, size=(2, 4, 4))]
  np.testing.assert_allclose(losses.soft_dice(hard, hard), 1.0, atol=1e-6)
  np.testing.assert_allclose(losses.soft_dice(hard, 1.0 - hard), 0.0, atol=1e-3)


def test_js_similarity_against_scipy():
  p = _softmax(RNG.normal(size=(2, 3, 3, 4)))
  q = _softmax(RNG.normal(size=(2, 3, 3, 4)))
  np.testing.assert_allclose(losses.js_similarity(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32)),
                             _np_js_sim(p, q), rtol=1e-5)
  onehot = np.eye(4, dtype=np.float32)[[0, 1]]
  np.testing.assert_allclose(losses.js_similarity(onehot[:1], onehot[1:]), 0.0, atol=1e-6)
  np.testing.assert_allclose(losses.js_similarity(onehot, onehot), 1.0, atol=1e-6)


def test_gaussian_kl_and_l2():
  mean = RNG.normal(size=(3, 2, 2, 4)).astype(np.float32)
  logvar = RNG.normal(size=(3, 2, 2, 4)).astype(np.float32) * 0.5
  np.testing.assert_allclose(losses.gaussian_kl(mean, logvar), _np_gauss_kl(mean, logvar), rtol=1e-5)
  np.testing.assert_allclose(losses.gaussian_kl(np.zeros((2, 5)), np.zeros((2, 5))), 0.0, atol=1e-7)
  x, y = RNG.normal(size=(2, 4, 4, 3)), RNG.normal(size=(2, 4, 4, 3))
  np.testing.assert_allclose(losses.l2_reconstruction(x, y), np.mean((x - y) ** 2), rtol=1e-5)
  np.testing.assert_allclose(losses.diffusion_loss(x, y), np.mean((x - y) ** 2), rtol=1e-5)


@pytest.mark.parametrize('dist', ['dice', 'js'])
def test_kd_loss(dist):
  s = RNG.normal(size=(2, 4, 4, 3)).astype(np.float32)
  t = RNG.normal(size=(2, 4, 4, 3)).astype(np.float32) * 2
  ps, pt = _softmax(s.astype(np.float64)), _softmax(t.astype(np.float64))
  sim = _np_dice(ps, pt) if dist == 'dice' else _np_js_sim(ps, pt)
  want = (1 - sim) + _np_ce(s.astype(np.float64), pt)
  np.testing.assert_allclose(losses.kd_loss(s, t, dist), want, rtol=1e-5)
  # The teacher is a fixed target: no gradient flows into it.
  g = jax.grad(lambda tt: losses.kd_loss(jnp.asarray(s), tt, dist))(jnp.asarray(t))
  np.testing.assert_array_equal(g, 0.0)
  assert np.abs(jax.grad(lambda ss: losses.kd_loss(ss, jnp.asarray(t), dist))(jnp.asarray(s))).max() > 0


def test_kd_loss_rejects_unknown_dist():
  with pytest.raises(ValueError, match='dist='):
    losses.kd_loss(jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 2, 2, 2)), 'l1')


@pytest.mark.parametrize('temp', [1.0, 2.5])
def test_latent_kl(temp):
  teacher = RNG.normal(size=(3, 2, 2, 4)).astype(np.float32)
  student = RNG.normal(size=(3, 2, 2, 4)).astype(np.float32)
  np.testing.assert_allclose(losses.latent_kl(teacher, student, temp), _np_latent_kl(teacher, student, temp),
                             rtol=1e-4)
  np.testing.assert_allclose(losses.latent_kl(teacher, teacher, temp), 0.0, atol=1e-6)
  g = jax.grad(lambda tt: losses.latent_kl(tt, jnp.asarray(student), temp))(jnp.asarray(teacher))
  np.testing.assert_array_equal(g, 0.0)


def _vae_out(b=2, h=4, w=4, k=3, c=1):
  f32 = lambda *s: RNG.normal(size=s).astype(np.float32)  # noqa: E731
  return {'seg_logits': f32(b, h, w, k), 'recon': f32(b, h, w, c), 'seg_mean': f32(b, 2, 2, 2),
          'seg_logvar': 0.3 * f32(b, 2, 2, 2), 'dom_mean': f32(b, 5), 'dom_logvar': 0.3 * f32(b, 5)}


def test_teacher_loss():
  out = _vae_out()
  images = RNG.normal(size=(2, 4, 4, 1)).astype(np.float32)
  labels = RNG.integers(0, 3, size=(2, 4, 4))
  loss, metrics = losses.teacher_loss(out, images, labels, num_classes=3, beta=0.1, seg_weight=2.0)
  logits = out['seg_logits'].astype(np.float64)
  ce = _np_ce(logits, np.eye(3)[labels])
  dice = 1 - _np_dice(_softmax(logits), np.eye(3)[labels])
  rec = np.mean((images - out['recon']) ** 2)
  kl = _np_gauss_kl(out['seg_mean'], out['seg_logvar']) + _np_gauss_kl(out['dom_mean'], out['dom_logvar'])
  np.testing.assert_allclose(loss, 2.0 * (ce + dice) + rec + 0.1 * kl, rtol=1e-5)
  np.testing.assert_allclose(metrics['ce'], ce, rtol=1e-5)
  np.testing.assert_allclose(metrics['dice_loss'], dice, rtol=1e-5)
  assert set(metrics) >= {'loss', 'ce', 'dice_loss', 'rec', 'kl_seg', 'kl_dom'}


@pytest.mark.parametrize('dist', ['dice', 'js'])
def test_student_loss(dist):
  st, te = _vae_out(), _vae_out()
  images = RNG.normal(size=(2, 4, 4, 1)).astype(np.float32)
  loss, metrics = losses.student_loss(st, te, images, alpha=0.5, lam=3.0, beta=0.01, dist=dist,
                                      latent_temperature=2.0)
  s, t = st['seg_logits'].astype(np.float64), te['seg_logits'].astype(np.float64)
  sim = _np_dice(_softmax(s), _softmax(t)) if dist == 'dice' else _np_js_sim(_softmax(s), _softmax(t))
  kd = (1 - sim) + _np_ce(s, _softmax(t))
  lat = _np_latent_kl(te['seg_mean'], st['seg_mean'], 2.0)
  rec = np.mean((images - st['recon']) ** 2)
  kl = _np_gauss_kl(st['seg_mean'], st['seg_logvar']) + _np_gauss_kl(st['dom_mean'], st['dom_logvar'])
  np.testing.assert_allclose(loss, rec + 3.0 * (kd + 0.5 * lat) + 0.01 * kl, rtol=1e-5)
  np.testing.assert_allclose(metrics['kd'], kd, rtol=1e-5)
  np.testing.assert_allclose(metrics['latent'], lat, rtol=1e-4)
  np.testing.assert_allclose(metrics['rec'], rec, rtol=1e-5)
  # Nothing flows back into the teacher's outputs.
  g = jax.grad(lambda tt: losses.student_loss(st, tt, images, alpha=0.5, lam=3.0, beta=0.01, dist=dist,
                                              latent_temperature=2.0)[0])(te)
  for v in jax.tree.leaves(g):
    np.testing.assert_array_equal(v, 0.0)


def test_masked_segmentation_losses_ignore_pixels_against_numpy():
  """Pixels labelled IGNORE count in neither term: CE is the mean over the others, the soft Dice compares the
  probabilities and one-hot labels zeroed there; without ignored pixels it equals segmentation_losses."""
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (2, 5, 4))
  labels[0, :2] = losses.IGNORE
  labels[1, 3, 1] = losses.IGNORE
  ce, dice = losses.masked_segmentation_losses(jnp.asarray(logits), jnp.asarray(labels), 3)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  valid = labels >= 0
  want_ce = -np.mean(np.log(p[valid, labels[valid]]))
  onehot = np.eye(3)[np.where(valid, labels, 0)] * valid[..., None]
  np.testing.assert_allclose(ce, want_ce, rtol=1e-5)
  np.testing.assert_allclose(dice, 1 - _np_dice(p * valid[..., None], onehot), rtol=1e-5)
  full = rng.integers(0, 3, (2, 5, 4))
  for got, want in zip(losses.masked_segmentation_losses(jnp.asarray(logits), jnp.asarray(full), 3),
                       losses.segmentation_losses(jnp.asarray(logits), jnp.asarray(full), 3), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  none = np.full((2, 5, 4), losses.IGNORE)
  ce0, _ = losses.masked_segmentation_losses(jnp.asarray(logits), jnp.asarray(none), 3)
  assert float(ce0) == 0.0


def test_weighted_diffusion_loss_and_min_snr_weights():
  rng = np.random.default_rng(1)
  x, y = rng.standard_normal((2, 3, 4, 4, 2)).astype(np.float32)
  w = np.asarray([0.5, 2.0, 1.0], np.float32)
  want = np.mean(np.mean((x - y) ** 2, axis=(1, 2, 3)) * w)
  np.testing.assert_allclose(losses.diffusion_loss(x, y, w), want, rtol=1e-5)
  a = np.asarray([0.999, 0.8, 0.5, 0.01], np.float32)  # SNR 999, 4, 1, 0.0101
  snr = a / (1 - a)
  np.testing.assert_allclose(losses.min_snr_weights(a, 5.0, 'epsilon'), np.minimum(snr, 5.0) / snr, rtol=1e-4)
  np.testing.assert_allclose(losses.min_snr_weights(a, 5.0, 'v_prediction'), np.minimum(snr, 5) / (snr + 1),
                             rtol=1e-4)
  # By hand: eps-weights are 5/999, then 1 where SNR <= gamma.
  np.testing.assert_allclose(losses.min_snr_weights(a, 5.0, 'epsilon'), [5 / 999, 1, 1, 1], rtol=1e-3)
