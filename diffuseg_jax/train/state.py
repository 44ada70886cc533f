"""Train state with EMA weights, and the optimiser built from config.

`TrainState` is a pytree: step, params, ema_params, opt_state. The optax transformation is static (not a
leaf), so the state can be sharded, donated and checkpointed as one tree.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  ema_decay: float = flax.struct.field(pytree_node=False, default=0.999)

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, ema_decay: float) -> TrainState:
    return cls(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        tx=tx,
        ema_decay=ema_decay,
    )

  def apply_gradients(self, grads) -> TrainState:
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    # EMA warm-up (as in many diffusion codebases): early steps track the weights closely.
    decay = jnp.minimum(self.ema_decay, (1.0 + self.step) / (10.0 + self.step))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, self.ema_params, params)
    return self.replace(step=self.step + 1, params=params, ema_params=ema, opt_state=opt_state)


def make_optimizer(learning_rate: float, num_steps: int, train_config) -> optax.GradientTransformation:
  """AdamW (the paper's optimiser) with linear warm-up, cosine decay to 10%, and global-norm clipping."""
  warmup = int(min(train_config.warmup_steps, max(num_steps // 10, 1)))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=learning_rate,
      warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1),
      end_value=0.1 * learning_rate,
  )
  parts = []
  if train_config.grad_clip:
    parts.append(optax.clip_by_global_norm(train_config.grad_clip))
  parts.append(optax.adamw(schedule, weight_decay=train_config.weight_decay))
  return optax.chain(*parts)
