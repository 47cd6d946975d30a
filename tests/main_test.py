"""The command line: config files, overrides and one-line errors."""

import os
import subprocess
import sys

import ml_collections
import pytest

from vmoe_jax.errors import UserError
from vmoe_jax.schema import defaults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, env=None):
  return subprocess.run(
    [sys.executable, '-m', 'vmoe_jax.main', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, **(env or {})},
  )


def test_override_typo_fails_with_one_line(tmp_path):
  result = run_main(
    '--config=configs/digits_vit.py', f'--workdir={tmp_path}', '--config.model.widht=3'
  )
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert lines[-1] == (
    "error: unknown config key 'model.widht' (did you mean 'model.width'?); "
    'see vmoe_jax/schema/defaults.py for all keys.'
  )
  assert not os.listdir(tmp_path)  # Nothing was written.


def test_unknown_section_and_bad_value(tmp_path):
  result = run_main(
    '--config=configs/digits_vit.py', f'--workdir={tmp_path}', '--config.modle.width=3'
  )
  assert result.returncode == 2 and "unknown config key 'modle.width'" in result.stderr
  result = run_main(
    '--config=configs/digits_vit.py', f'--workdir={tmp_path}', '--config.model.width=abc'
  )
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith('error: bad --config flag')


def test_missing_config_file(tmp_path):
  result = run_main('--config=configs/nope.py', f'--workdir={tmp_path}')
  assert result.returncode == 2
  assert "config file 'configs/nope.py' does not exist" in result.stderr


def test_bad_value_is_a_one_line_error(tmp_path):
  result = run_main(
    '--config=configs/digits_vit.py', f'--workdir={tmp_path}', '--config.optimizer.name=adamm'
  )
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
    "error: optimizer.name='adamm' must be one of 'adafactor', 'adamw', 'sgd'; pass e.g. "
    '--config.optimizer.name=adafactor.'
  )
  assert not os.listdir(tmp_path)


def test_bad_values_fail_before_joining_a_multiprocess_run(tmp_path):
  # Process 1 would wait for a coordinator that never comes; the value fails first.
  result = run_main(
    '--config=configs/digits_switch.py',
    f'--workdir={tmp_path}',
    '--num_processes=2',
    '--process_id=1',
    '--coordinator_address=localhost:9',
    '--distributed_timeout=120',
    '--config.model.moe.num_selected=9',
  )
  assert result.returncode == 2
  assert (
    result.stderr.strip()
    .splitlines()[-1]
    .startswith('error: model.moe.num_selected=9 exceeds model.moe.num_experts=8;')
  )
  assert not os.listdir(tmp_path)


def test_config_file_errors_are_one_line():
  from vmoe_jax import main

  inner = UserError("--config=configs/a.py:x: 'x' is not an argument of this config file")
  try:
    try:
      raise inner
    except UserError as e:
      raise UserError('Error whilst parsing config file:\n\nTraceback ...') from e
  except UserError as e:
    wrapped = ValueError('flag --config=configs/a.py:x: ...')
    wrapped.__context__ = e
  assert main._config_error(['prog'], wrapped) == str(inner)


def test_validate_rejects_keys_outside_the_schema():
  config = defaults.get_config()
  config.unlock()
  config.model.moe.num_expert = 4
  with pytest.raises(
    UserError,
    match="unknown config key 'model.moe.num_expert' \\(did you mean 'model.moe.num_experts'\\?\\)",
  ):
    defaults.check_keys(config)


def test_defaults_are_locked():
  config = defaults.get_config()
  with pytest.raises(AttributeError):
    config.model.widht = 3
  assert isinstance(config, ml_collections.ConfigDict)


@pytest.mark.parametrize('name', sorted(os.listdir(os.path.join(REPO, 'configs'))))
def test_every_config_loads_and_validates(name):
  if not name.endswith('.py'):
    return
  import importlib.util

  from vmoe_jax.schema import validation

  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(REPO, 'configs', name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  validation.validate(config, num_devices=1)
  assert 'python -m vmoe_jax.main' in module.__doc__
  if ':local' in module.__doc__:
    local = module.get_config('local')
    validation.validate(local, num_devices=1)
    assert local.model.width == 64 and local.train.num_steps == 20
  with pytest.raises(UserError, match="'lcoal' is not an argument of this config file"):
    module.get_config('lcoal')
