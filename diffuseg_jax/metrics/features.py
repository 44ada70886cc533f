"""Feature extractors for Fréchet distance / KID, each with an honest `name` to label the results with.

Without local Inception weights the default is `random-conv-64`: a fixed convolutional network whose
weights are drawn once from a seeded numpy generator (He-normal, so identical on every machine and
platform) and never trained. Fréchet distances on random-network features are a known, useful proxy for
distribution distance, but the numbers are NOT comparable with published FID values; only InceptionV3
pool3 features from the FID weights (`inception.py`, given by `eval.inception_path`) give FID proper.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffuseg_jax.metrics import inception

RANDOM_CONV_NAME = 'random-conv-64 (in-project, not Inception)'


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
  """`fn`: jitted float32 [B, H, W, 3] in [-1, 1] -> [B, feature_dim]."""

  name: str
  feature_dim: int
  fn: Callable[[jax.Array], jax.Array]


class RandomConvNet(nn.Module):
  """[B, H, W, 3] -> resize to image_size^2 -> (3x3 stride-2 conv + ReLU) per width -> global mean [B, F]."""

  widths: tuple[int, ...] = (64, 128, 256, 512)
  image_size: int = 64
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, _, _, c = x.shape
    x = jax.image.resize(x, (b, self.image_size, self.image_size, c), 'bilinear').astype(self.dtype)
    for i, w in enumerate(self.widths):
      x = nn.relu(nn.Conv(w, (3, 3), strides=(2, 2), padding='SAME', dtype=self.dtype, name=f'conv{i}')(x))
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def random_conv_params(model: RandomConvNet, seed: int = 0) -> dict:
  """He-normal kernels (std sqrt(2 / fan_in)) and zero biases from np.random.default_rng(seed)."""
  dummy = jnp.zeros((1, model.image_size, model.image_size, 3))
  shapes = jax.eval_shape(model.init, jax.random.key(0), dummy)
  flat = traverse_util.flatten_dict(shapes)
  rng = np.random.default_rng(seed)
  params = {}
  for key in sorted(flat):  # a fixed order, so the draw does not depend on dict ordering
    shape = flat[key].shape
    if key[-1] == 'kernel':
      fan_in = int(np.prod(shape[:-1]))
      params[key] = jnp.asarray(rng.standard_normal(shape) * np.sqrt(2.0 / fan_in), jnp.float32)
    else:
      params[key] = jnp.zeros(shape, jnp.float32)
  return traverse_util.unflatten_dict(params)


def random_conv_extractor(seed: int = 0) -> FeatureExtractor:
  model = RandomConvNet()
  variables = random_conv_params(model, seed)
  apply = jax.jit(model.apply)
  return FeatureExtractor(RANDOM_CONV_NAME, model.widths[-1], lambda x: apply(variables, x))


def load_feature_extractor(inception_path: str | None) -> FeatureExtractor:
  """None -> `random-conv-64`; a path -> InceptionV3 pool3 (2048-d) with weights from that local `.npz`.

  A missing or invalid file raises UserError naming it (see `inception.load_variables`).
  """
  if inception_path is None:
    return random_conv_extractor()
  fn = inception.make_inception_fn(inception_path)
  return FeatureExtractor(f'InceptionV3-FID pool3 ({inception_path})', 2048, fn)


def to_three_channels(images: np.ndarray) -> np.ndarray:
  """[N, H, W, C] -> [N, H, W, 3]: RGB kept, any other channel count -> the channel mean repeated 3 times."""
  if images.shape[-1] == 3:
    return images
  grey = images.mean(axis=-1, keepdims=True)
  return np.repeat(grey, 3, axis=-1)


def extract_features(extractor: FeatureExtractor, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
  """float32 [N, H, W, C] in [-1, 1] -> float32 numpy [N, F], in batches of `batch_size`.

  The last batch is zero-padded to `batch_size` so the extractor compiles once per image shape.
  """
  images = to_three_channels(np.asarray(images, np.float32))
  n = images.shape[0]
  batch_size = max(1, min(batch_size, n))
  out = []
  for start in range(0, n, batch_size):
    batch = images[start:start + batch_size]
    k = batch.shape[0]
    if k < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - k, *batch.shape[1:]), np.float32)])
    out.append(np.asarray(extractor.fn(jnp.asarray(batch)))[:k])
  if not out:
    return np.zeros((0, extractor.feature_dim), np.float32)
  return np.concatenate(out).astype(np.float32)
