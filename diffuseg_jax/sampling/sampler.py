"""Blended DDIM: conditional DDIM denoising toward the target domain, blended with the noised mask content.

Per DDIM step i (timestep t -> t_prev, alphas a_t -> a_prev; see `schedules.ddim_timesteps`):
  eps    = eps_fn(x_t, t, z_dom)                        (classifier-free guidance when guidance_scale != 1)
  x_dom  = ddim_step(x_t, eps, a_t, a_prev, eta)        denoise toward the domain of z_dom
  x_seg  = sqrt(a_prev) r(m) + sqrt(1 - a_prev) eps'    the region content at the same noise level, fresh eps'
  x_prev = blend(x_dom, x_seg, m)  if i < blend_until * num_steps  else  x_dom
With hard blending and blend_until = 1 the last step has a_prev = 1, so the region m = 1 of x_0 *is* r(m).

`blended_ddim_sample` runs the steps as one `jax.lax.scan`; `LoopSampler` (and `loop_ddim_sample`) run the
same jitted step in a Python loop with the same keys (tests, benchmarks, debugging). All call the step made by
`make_step_fn`, so they cannot diverge. Randomness: rng -> (x_T key, step key); step i uses
fold_in(step key, i), split into the DDIM noise key and the x_seg noise key.

eps_fn(x_t [N, h, w, C], t int32 [N], z_dom [N, D], drop_cond bool [N]) -> eps [N, h, w, C]; drop_cond = True
asks for the unconditional prediction (the null condition used in training with condition dropout).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffuseg_jax.sampling import blend as blend_lib
from diffuseg_jax.sampling import ddim, prediction, schedules

EpsFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
StepFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Static sampler configuration (hashable; bound with functools.partial or passed as a static argument).

  num_steps: DDIM steps S; eta: 0 deterministic DDIM .. 1 DDPM-like; guidance_scale: classifier-free guidance
  s (1 = conditional only, 0 = unconditional only); blend_mode: hard | soft | soft_vp | pyramid; blend_until: fraction
  of the steps (from the noisiest) that blend, the rest denoise freely; soft_sigma, pyramid_levels: see
  `blend.blend`; save_trajectory: also return x after every step; num_timesteps: T of the training schedule;
  clip_x0: clip the implied x_0 to [-clip_x0, clip_x0] (pixel space; see `ddim.ddim_step`), None = no clip;
  latent_mask: how the synthesis kernel turns the pixel mask into the latent one (`blend.LATENT_MASKS`);
  prediction_type: what the denoiser outputs (`prediction.PREDICTION_TYPES`); the synthesis kernel turns it
  into the eps this sampler works on (`prediction.eps_fn`).
  """

  num_steps: int = 50
  eta: float = 0.0
  guidance_scale: float = 1.0
  blend_mode: str = 'hard'
  blend_until: float = 1.0
  soft_sigma: float = 1.0
  pyramid_levels: int = 3
  save_trajectory: bool = False
  num_timesteps: int = 1000
  clip_x0: float | None = None
  latent_mask: str = 'coverage'
  prediction_type: str = 'epsilon'

  def __post_init__(self):
    if not 1 <= self.num_steps <= self.num_timesteps:
      raise ValueError(f'num_steps={self.num_steps} must be in [1, num_timesteps={self.num_timesteps}]')
    if self.eta < 0:
      raise ValueError(f'eta={self.eta} must be >= 0')
    if self.guidance_scale < 0:
      raise ValueError(f'guidance_scale={self.guidance_scale} must be >= 0')
    if self.blend_mode not in blend_lib.BLEND_MODES:
      raise ValueError(f'blend_mode={self.blend_mode!r} is not one of '
                        f'{list(blend_lib.BLEND_MODES)}')
    if not 0.0 <= self.blend_until <= 1.0:
      raise ValueError(f'blend_until={self.blend_until} must be in [0, 1]')
    if self.latent_mask not in blend_lib.LATENT_MASKS:
      raise ValueError(f'latent_mask={self.latent_mask!r} is not one of {list(blend_lib.LATENT_MASKS)}')
    if self.pyramid_levels < 1:
      raise ValueError(f'pyramid_levels={self.pyramid_levels} must be >= 1')
    prediction.check(self.prediction_type)

  @classmethod
  def from_config(cls, config: Any) -> SamplerSettings:
    """From a full run config (sections `sampling` and `diffusion`); the pipeline keeps x_0 only, so
    save_trajectory (for library use, e.g. figures of a trajectory) stays off."""
    s = config.sampling
    return cls(num_steps=int(s.num_steps), eta=float(s.eta), guidance_scale=float(s.guidance_scale),
               blend_mode=str(s.blend_mode), blend_until=float(s.blend_until), soft_sigma=float(s.soft_sigma),
               pyramid_levels=int(s.pyramid_levels),
               clip_x0=None if s.get('clip_x0') is None else float(s.clip_x0),
               latent_mask=str(s.get('latent_mask', 'coverage')),
               num_timesteps=int(config.diffusion.num_timesteps),
               prediction_type=str(config.diffusion.get('prediction_type', 'epsilon')))


def _guided_eps(eps_fn: EpsFn, x: jax.Array, t: jax.Array, z_dom: jax.Array, scale: float) -> jax.Array:
  """eps_u + s (eps_c - eps_u), with cond and uncond in ONE eps_fn call on the batch [cond; uncond]."""
  b = x.shape[0]
  if scale == 1.0:
    return eps_fn(x, t, z_dom, jnp.zeros((b,), bool))
  if scale == 0.0:
    return eps_fn(x, t, z_dom, jnp.ones((b,), bool))
  drop = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)])
  eps = eps_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([z_dom, z_dom]), drop)
  eps_c, eps_u = eps[:b], eps[b:]
  return eps_u + scale * (eps_c - eps_u)


def make_step_fn(eps_fn: EpsFn, settings: SamplerSettings) -> StepFn:
  """One blended DDIM step, shared by the scan and the loop sampler.

  step(x [B,h,w,C], key, region_latent [B,h,w,C], mask [B,h,w,1], z_dom [B,D], t int32 scalar,
       a_t f32 scalar, a_prev f32 scalar, do_blend bool scalar) -> x_prev [B,h,w,C]
  """

  def step(x, key, region_latent, mask, z_dom, t, a_t, a_prev, do_blend):
    key_ddim, key_seg = jax.random.split(key)
    t_b = jnp.full((x.shape[0],), t, jnp.int32)
    eps = _guided_eps(eps_fn, x, t_b, z_dom, settings.guidance_scale).astype(x.dtype)
    a_t = a_t.astype(x.dtype)
    a_prev = a_prev.astype(x.dtype)
    noise = jax.random.normal(key_ddim, x.shape, x.dtype) if settings.eta > 0 else None
    x_dom = ddim.ddim_step(x, eps, a_t, a_prev, settings.eta, noise, settings.clip_x0)
    if settings.blend_until <= 0.0:
      return x_dom
    noise_seg = jax.random.normal(key_seg, x.shape, x.dtype)
    x_seg = jnp.sqrt(a_prev) * region_latent + jnp.sqrt(1.0 - a_prev) * noise_seg
    if settings.blend_mode == 'soft_vp':
      x0_dom, _ = ddim.implied_x0_eps(x, eps, a_t, settings.clip_x0)
      blended = blend_lib.variance_preserving_blend(x_dom, x0_dom, x_seg, region_latent, mask, a_prev,
                                                    settings.soft_sigma)
    else:
      blended = blend_lib.blend(x_dom, x_seg, mask, settings.blend_mode, settings.soft_sigma,
                                settings.pyramid_levels)
    return jnp.where(do_blend, blended, x_dom)

  return step


def _plan(alphas_cumprod: jax.Array | np.ndarray, settings: SamplerSettings):
  """Per-step scan inputs: (step index, t, a_t, a_prev, do_blend), each [S]."""
  num_timesteps = alphas_cumprod.shape[0]
  if num_timesteps != settings.num_timesteps:
    raise ValueError(f'the diffusion schedule has {num_timesteps} timesteps but the sampler was configured '
                      f'with num_timesteps={settings.num_timesteps}')
  t, t_prev = schedules.ddim_timesteps(num_timesteps, settings.num_steps)
  index = np.arange(settings.num_steps, dtype=np.int32)
  do_blend = index < settings.blend_until * settings.num_steps
  a_t = schedules.alphas_at(alphas_cumprod, t)
  a_prev = schedules.alphas_at(alphas_cumprod, t_prev)
  return index, t, a_t, a_prev, do_blend


def _init(rng: jax.Array, region_latent: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x_T ~ N(0, I) like region_latent, the key that per-step keys are folded from)."""
  key_init, key_steps = jax.random.split(rng)
  return jax.random.normal(key_init, region_latent.shape, region_latent.dtype), key_steps


def blended_ddim_sample(eps_fn: EpsFn, alphas_cumprod: jax.Array | np.ndarray, rng: jax.Array,
                        region_latent: jax.Array, mask: jax.Array, z_dom: jax.Array,
                        settings: SamplerSettings) -> tuple[jax.Array, jax.Array | None]:
  """Blended DDIM synthesis as one `jax.lax.scan`; pure and jittable with eps_fn and settings static.

  alphas_cumprod float [T]; rng a PRNG key; region_latent r(m) [B, h, w, C] (float dtype of the sampler);
  mask [B, h, w, 1] at latent resolution (see `blend.mask_to_latent`); z_dom [B, D].
  Returns (x_0 [B, h, w, C], trajectory [S, B, h, w, C] = x after each step, the last being x_0, or None).
  """
  step = make_step_fn(eps_fn, settings)
  index, t, a_t, a_prev, do_blend = _plan(alphas_cumprod, settings)
  x_T, key_steps = _init(rng, region_latent)

  def body(x, xs):
    i, t_i, a_t_i, a_prev_i, blend_i = xs
    x = step(x, jax.random.fold_in(key_steps, i), region_latent, mask, z_dom, t_i, a_t_i, a_prev_i, blend_i)
    return x, (x if settings.save_trajectory else None)

  xs = (jnp.asarray(index), jnp.asarray(t), a_t, a_prev, jnp.asarray(do_blend))
  x0, trajectory = jax.lax.scan(body, x_T, xs)
  return x0, trajectory


class LoopSampler:
  """`blended_ddim_sample` as a Python loop over ONE jitted step (same keys, same result); not jittable.

  apply_eps(params, x_t, t, z_dom, drop_cond) -> eps is the denoiser with its parameters as the first
  argument, so the step compiles once per input shape and is reused across calls and parameter values.
  `step(params, x, key, region_latent, mask, z_dom, t, a_t, a_prev, do_blend)` is that jitted step.
  """

  def __init__(self, apply_eps: Callable[..., jax.Array], settings: SamplerSettings):
    self.settings = settings
    self.step = jax.jit(lambda params, *args: make_step_fn(functools.partial(apply_eps, params), settings)(*args))

  def __call__(self, params: Any, alphas_cumprod: jax.Array | np.ndarray, rng: jax.Array,
               region_latent: jax.Array, mask: jax.Array, z_dom: jax.Array
               ) -> tuple[jax.Array, jax.Array | None]:
    settings = self.settings
    index, t, a_t, a_prev, do_blend = _plan(alphas_cumprod, settings)
    x, key_steps = _init(rng, region_latent)
    trajectory = []
    for i in range(settings.num_steps):
      x = self.step(params, x, jax.random.fold_in(key_steps, int(index[i])), region_latent, mask, z_dom,
                    jnp.int32(t[i]), a_t[i], a_prev[i], jnp.asarray(do_blend[i]))
      if settings.save_trajectory:
        trajectory.append(x)
    return x, (jnp.stack(trajectory) if settings.save_trajectory else None)


def loop_ddim_sample(eps_fn: EpsFn, alphas_cumprod: jax.Array | np.ndarray, rng: jax.Array,
                     region_latent: jax.Array, mask: jax.Array, z_dom: jax.Array,
                     settings: SamplerSettings) -> tuple[jax.Array, jax.Array | None]:
  """`blended_ddim_sample` with a Python loop over a jitted step, for a closure eps_fn (tests, debugging).

  The step closes over eps_fn, so every call compiles it anew; loops that run more than once should build
  one `LoopSampler` with the parameters as an argument instead.
  """
  return LoopSampler(lambda _params, *args: eps_fn(*args), settings)(
      None, alphas_cumprod, rng, region_latent, mask, z_dom)
