"""Learning rate schedules pinned at chosen steps (values worked out by hand)."""

import numpy as np
import pytest

from vmoe_jax import schedules
from vmoe_jax.errors import UserError


def values(steps, **kwargs):
  fn = schedules.create_learning_rate_schedule(**kwargs)
  return [float(fn(s)) for s in steps]


def test_rsqrt_with_warmup_and_cooldown():
  got = values(
    [0, 5, 10, 20, 50, 80, 90, 100],
    peak_value=1.0,
    total_steps=100,
    warmup_steps=10,
    cooldown_steps=20,
    decay='rsqrt',
    timescale=10,
  )
  expected = [
    0.0,
    0.5,
    1.0,
    np.sqrt(10 / 20),  # s = 10
    np.sqrt(10 / 50),  # s = 40
    np.sqrt(10 / 80),  # s = 70, cooldown factor 20/20
    np.sqrt(10 / 90) * 10 / 20,  # s = 80, cooldown factor 10/20
    0.0,
  ]
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_cosine_linear_constant():
  steps = [10, 60, 110]
  kw = dict(peak_value=2.0, total_steps=110, warmup_steps=10)
  np.testing.assert_allclose(values(steps, decay='cosine', **kw), [2.0, 1.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(values(steps, decay='linear', **kw), [2.0, 1.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(
    values(steps, decay='cosine', end_value=0.2, **kw), [2.0, 1.1, 0.2], atol=1e-6
  )
  np.testing.assert_allclose(
    values([3, 50, 109], decay='constant', **kw), [0.6, 2.0, 2.0], atol=1e-6
  )


def test_constant_with_cooldown_reaches_zero():
  got = values(
    [0, 89, 90, 95, 100], peak_value=1.0, total_steps=100, cooldown_steps=10, decay='constant'
  )
  np.testing.assert_allclose(got, [1.0, 1.0, 1.0, 0.5, 0.0], atol=1e-6)


def test_bad_schedules():
  with pytest.raises(UserError, match="decay 'exp' is unknown"):
    schedules.create_learning_rate_schedule(peak_value=1, total_steps=10, decay='exp')
  with pytest.raises(UserError, match='exceed the 10 training steps'):
    schedules.create_learning_rate_schedule(
      peak_value=1, total_steps=10, warmup_steps=8, cooldown_steps=5
    )


def test_epochs_override_steps():
  from vmoe_jax import config_defaults

  config = config_defaults.get_config()
  config.optimizer.learning_rate = 1.0
  config.schedule.decay = 'constant'
  config.train.warmup_epochs = 2.0
  fn = schedules.from_config(config, total_steps=100, steps_per_epoch=10)
  np.testing.assert_allclose([float(fn(10)), float(fn(20))], [0.5, 1.0])
