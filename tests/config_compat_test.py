"""Workdirs written before model.stem_extra_convs became a string still load and resume."""

import pytest
from validation_test import load_config

from vmoe_jax import inference
from vmoe_jax.errors import UserError
from vmoe_jax.storage import workdirs
from vmoe_jax.train import config_to_json


def _old_workdir(tmp_path, extra_convs):
  """A workdir whose config.json holds stem_extra_convs as the int it used to be."""
  saved = config_to_json(load_config('fashion_vit.py'))
  saved['model']['stem_extra_convs'] = extra_convs
  workdirs.write_config(str(tmp_path), saved)
  return str(tmp_path)


def test_run_config_reads_the_old_int(tmp_path):
  config = inference.run_config(_old_workdir(tmp_path, 1))
  assert config.model.stem_extra_convs == '1'


def test_resume_accepts_the_old_int_and_refuses_another_count(tmp_path):
  workdir = _old_workdir(tmp_path, 1)
  today = config_to_json(load_config('fashion_vit.py'))
  today['model']['stem_extra_convs'] = '1'  # The same model, in today's form.
  workdirs.check_config(workdir, today, has_checkpoint=True)  # The same model: no error.
  today['model']['stem_extra_convs'] = '0,2'
  with pytest.raises(
    UserError, match=r"another model \(model.stem_extra_convs \(was 1, now '0,2'\)"
  ):
    workdirs.check_config(workdir, today, has_checkpoint=True)
