"""Learning rate schedules: linear warmup -> decay -> linear cooldown to zero.

All schedules are pure functions of the (0-based) step, usable inside jit:

  warmup    lr(t) = peak * t / warmup_steps                       t < warmup
  decay     s = t - warmup_steps, n = total_steps - warmup_steps
            rsqrt:    peak * sqrt(timescale / (s + timescale))
                      (Zhai et al. 2022, "Scaling Vision Transformers")
            constant: peak
            cosine:   end + (peak - end) * (1 + cos(pi * s / n)) / 2
            linear:   peak + (end - peak) * s / n
  cooldown  the value above times (total_steps - t) / cooldown_steps
            for t >= total_steps - cooldown_steps (reaches 0 at the end).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from vmoe_jax.errors import UserError

DECAYS = ('rsqrt', 'constant', 'cosine', 'linear')


def create_learning_rate_schedule(
  *,
  peak_value: float,
  total_steps: int,
  warmup_steps: int = 0,
  cooldown_steps: int = 0,
  decay: str = 'rsqrt',
  timescale: int = 10_000,
  end_value: float = 0.0,
) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """Returns step -> learning rate (float32), as in the module docstring."""
  if decay not in DECAYS:
    raise UserError(f'schedule decay {decay!r} is unknown; use one of {DECAYS}.')
  if warmup_steps + cooldown_steps > total_steps:
    raise UserError(
      f'warmup_steps={warmup_steps} + cooldown_steps={cooldown_steps} exceed the '
      f'{total_steps} training steps; shorten them or train longer.'
    )
  if decay == 'rsqrt' and timescale <= 0:
    raise UserError(f'schedule timescale must be > 0 for rsqrt, got {timescale}.')
  decay_steps = max(1, total_steps - warmup_steps)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    s = jnp.maximum(t - warmup_steps, 0.0)
    if decay == 'rsqrt':
      value = peak_value * jnp.sqrt(timescale / (s + timescale))
    elif decay == 'constant':
      value = jnp.full_like(s, peak_value)
    elif decay == 'cosine':
      frac = jnp.minimum(s / decay_steps, 1.0)
      value = end_value + (peak_value - end_value) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    else:  # linear
      frac = jnp.minimum(s / decay_steps, 1.0)
      value = peak_value + (end_value - peak_value) * frac
    if warmup_steps > 0:
      value = jnp.where(t < warmup_steps, peak_value * t / warmup_steps, value)
    if cooldown_steps > 0:
      factor = jnp.clip((total_steps - t) / cooldown_steps, 0.0, 1.0)
      value = value * factor
    return value.astype(jnp.float32)

  return schedule


def from_config(config, total_steps: int, steps_per_epoch: float) -> Callable:
  """The schedule of `config.schedule` (warmup/cooldown in epochs win when > 0)."""
  warmup = config.schedule.warmup_steps
  cooldown = config.schedule.cooldown_steps
  if config.train.warmup_epochs > 0:
    warmup = round(config.train.warmup_epochs * steps_per_epoch)
  if config.train.cooldown_epochs > 0:
    cooldown = round(config.train.cooldown_epochs * steps_per_epoch)
  return create_learning_rate_schedule(
    peak_value=config.optimizer.learning_rate,
    total_steps=total_steps,
    warmup_steps=warmup,
    cooldown_steps=cooldown,
    decay=config.schedule.decay,
    timescale=config.schedule.timescale,
    end_value=config.schedule.end_value,
  )
