"""The label channels a mask-conditioned denoiser sees, against a hand loop; the conditioned call."""

import jax.numpy as jnp
import numpy as np
import pytest

from diffuseg_jax.sampling import mask_condition


def _reference(labels, k, f):
  b, h, w = labels.shape
  out = np.zeros((b, h // f, w // f, k - 1), np.float32)
  for n in range(b):
    for i in range(h // f):
      for j in range(w // f):
        block = labels[n, i * f:(i + 1) * f, j * f:(j + 1) * f]
        for c in range(1, k):
          out[n, i, j, c - 1] = np.count_nonzero(block == c) / (f * f)
  return out


@pytest.mark.parametrize('factor', [1, 2, 4])
def test_label_channels_are_the_class_fractions_per_block(factor):
  labels = np.random.default_rng(0).integers(0, 4, size=(3, 8, 8))
  got = mask_condition.label_channels(labels, 4, factor)
  np.testing.assert_allclose(got, _reference(labels, 4, factor), atol=1e-7)
  assert isinstance(got, np.ndarray)
  np.testing.assert_allclose(np.asarray(mask_condition.label_channels(jnp.asarray(labels), 4, factor)), got)


def test_a_one_pixel_line_is_seen_at_latent_size():
  labels = np.zeros((1, 8, 8), np.int64)
  labels[0, :, 3] = 1  # 1 px wide: a quarter of each 4 x 4 block in its column
  got = mask_condition.label_channels(labels, 2, 4)
  np.testing.assert_allclose(got[0, :, :, 0], [[0.25, 0.0], [0.25, 0.0]])


def test_conditioned_call_concatenates_and_repeats_for_guidance():
  seen = []

  def apply(x, t, z, drop):
    seen.append(x)
    return x[..., :2]

  channels = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  call = mask_condition.conditioned(apply, channels)
  x = jnp.ones((2, 4, 4, 2))
  call(x, None, None, None)
  np.testing.assert_array_equal(seen[-1], jnp.concatenate([x, channels], -1))
  call(jnp.concatenate([x, x]), None, None, None)  # classifier-free guidance: [cond, uncond]
  np.testing.assert_array_equal(seen[-1][..., 2:], jnp.concatenate([channels, channels]))


def test_modes():
  assert mask_condition.num_channels('none', 4) == 0
  assert mask_condition.num_channels('pseudo_labels', 4) == 3
  with pytest.raises(ValueError, match='mask_condition'):
    mask_condition.num_channels('labels', 4)
