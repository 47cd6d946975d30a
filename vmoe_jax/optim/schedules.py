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

Short runs (`from_config`): when the configured warmup + cooldown (in steps,
or in epochs) exceed the run, both are scaled down by the same factor so that
together they take half of the run (`fit_to_run`; one log line says so). For
example warmup 100 + cooldown 300 in a 100-step run become 12 + 38.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax.numpy as jnp

from vmoe_jax.errors import UserError

DECAYS = ('rsqrt', 'constant', 'cosine', 'linear')

log = logging.getLogger(__name__)


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


def fit_to_run(warmup: int, cooldown: int, total_steps: int) -> tuple[int, int]:
  """(warmup, cooldown) unchanged when they fit in `total_steps`, else scaled to half of it.

  The scaled pair keeps the ratio of the two (rounded; each that was > 0
  keeps at least 1 step while the half-run allows it) and sums to
  total_steps // 2, so that at least half of the run is at the decay.
  """
  if warmup + cooldown <= total_steps:
    return warmup, cooldown
  budget = total_steps // 2
  if cooldown == 0:
    return budget, 0
  if warmup == 0:
    return 0, budget
  scaled = round(warmup * budget / (warmup + cooldown))
  scaled = min(max(scaled, 1), max(budget - 1, 0))
  return scaled, budget - scaled


def warmup_cooldown_steps(config, total_steps: int, steps_per_epoch: float) -> tuple[int, int]:
  """The warmup and cooldown steps of `config` for a run of `total_steps` (see fit_to_run).

  Epochs (train.warmup_epochs / cooldown_epochs) win over steps when > 0.
  Logs one line when the run is too short for them.
  """
  warmup = config.schedule.warmup_steps
  cooldown = config.schedule.cooldown_steps
  if config.train.warmup_epochs > 0:
    warmup = round(config.train.warmup_epochs * steps_per_epoch)
  if config.train.cooldown_epochs > 0:
    cooldown = round(config.train.cooldown_epochs * steps_per_epoch)
  fitted = fit_to_run(warmup, cooldown, total_steps)
  if fitted != (warmup, cooldown):
    log.info(
      'Schedule: warmup %d + cooldown %d steps exceed the %d training steps; scaled to %d + %d '
      '(half of the run, same ratio).',
      warmup,
      cooldown,
      total_steps,
      *fitted,
    )
  return fitted


def from_config(config, total_steps: int, steps_per_epoch: float) -> Callable:
  """The schedule of `config.schedule` (warmup/cooldown in epochs win when > 0).

  Warmup and cooldown that do not fit in `total_steps` are scaled down
  (`warmup_cooldown_steps`).
  """
  warmup, cooldown = warmup_cooldown_steps(config, total_steps, steps_per_epoch)
  return create_learning_rate_schedule(
    peak_value=config.optimizer.learning_rate,
    total_steps=total_steps,
    warmup_steps=warmup,
    cooldown_steps=cooldown,
    decay=config.schedule.decay,
    timescale=config.schedule.timescale,
    end_value=config.schedule.end_value,
  )
