"""Learning rate schedules pinned at chosen steps (values worked out by hand)."""

import numpy as np
import pytest

from vmoe_jax.errors import UserError
from vmoe_jax.optim import schedules


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
  from vmoe_jax.schema import defaults

  config = defaults.get_config()
  config.optimizer.learning_rate = 1.0
  config.schedule.decay = 'constant'
  config.train.warmup_epochs = 2.0
  fn = schedules.from_config(config, total_steps=100, steps_per_epoch=10)
  np.testing.assert_allclose([float(fn(10)), float(fn(20))], [0.5, 1.0])


# --------------------------------------------------------------------------- short runs


@pytest.mark.parametrize(
  'warmup, cooldown, total, expected',
  [
    (100, 300, 100, (12, 38)),  # The digits configs at num_steps=100: ratio 1:3, half the run.
    (100, 300, 400, (100, 300)),  # They fit: unchanged.
    (200, 0, 100, (50, 0)),
    (0, 300, 100, (0, 50)),
    (1, 1000, 100, (1, 49)),  # A warmup that was set keeps a step.
    (100, 300, 1, (0, 0)),
    (977, 3906, 100, (10, 40)),  # cifar10 epochs (5 + 20 of 195 steps) at 100 steps.
  ],
)
def test_warmup_and_cooldown_that_do_not_fit_take_half_of_the_run(
  warmup, cooldown, total, expected
):
  assert schedules.fit_to_run(warmup, cooldown, total) == expected


def test_from_config_scales_a_too_long_schedule_and_says_so(caplog):
  from vmoe_jax.schema import defaults

  config = defaults.get_config()
  config.optimizer.learning_rate = 1.0
  config.schedule.update(dict(decay='constant', warmup_steps=100, cooldown_steps=300))
  with caplog.at_level('INFO', logger='vmoe_jax.optim.schedules'):
    fn = schedules.from_config(config, total_steps=100, steps_per_epoch=10)
  assert [r.getMessage() for r in caplog.records] == [
    'Schedule: warmup 100 + cooldown 300 steps exceed the 100 training steps; scaled to 12 + 38 '
    '(half of the run, same ratio).'
  ]
  np.testing.assert_allclose(
    [float(fn(s)) for s in (6, 12, 62, 81, 100)], [0.5, 1.0, 1.0, 0.5, 0.0], atol=1e-6
  )
  caplog.clear()
  schedules.from_config(config, total_steps=400, steps_per_epoch=10)  # Fits: nothing logged.
  assert not caplog.records


CONFIG_ARGS = {
  'cifar10_switch.py': (None, 'local'),
  'cifar10_vit.py': (None, 'local'),
  'cifar10_vmoe.py': (None, 'local'),
  'digits_switch.py': (None,),
  'digits_vit.py': (None,),
  'fashion_vit.py': (None, 'val'),
}
# Training examples of the configs' datasets (for the steps per epoch).
NUM_TRAIN = {'digits': 1438, 'fashion_mnist': 60_000, 'cifar10': 50_000}


@pytest.mark.parametrize(
  'name, arg', [(name, arg) for name, args in CONFIG_ARGS.items() for arg in args]
)
def test_every_shipped_config_trains_100_steps(name, arg):
  """--config.train.num_steps=100 (and num_epochs=0 where the config counts epochs)."""
  import importlib.util
  import os

  from vmoe_jax.schema import validation

  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs', name)
  spec = importlib.util.spec_from_file_location(name[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.train.num_steps = 100
  config.train.num_epochs = 0.0
  validation.validate(config, num_devices=1)
  steps_per_epoch = NUM_TRAIN[config.input.dataset] / config.input.batch_size
  warmup, cooldown = schedules.warmup_cooldown_steps(config, 100, steps_per_epoch)
  assert warmup + cooldown <= 100
  fn = schedules.from_config(config, 100, steps_per_epoch)
  lrs = np.asarray([float(fn(s)) for s in range(101)])
  assert np.all(np.isfinite(lrs)) and lrs.max() <= config.optimizer.learning_rate * (1 + 1e-6)
  assert lrs.max() > 0 and lrs[-1] <= lrs.max()
