"""inference.load and predict from user code: the README's snippet, and every misuse in one line."""

import os
import re

import numpy as np
import pytest
from small_configs import tiny_config

from vmoe_jax import inference
from vmoe_jax import train
from vmoe_jax.data import input_pipeline
from vmoe_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
  """A tiny Switch-ViT trained for 2 steps on digits (8x8x1 images)."""
  workdir = str(tmp_path_factory.mktemp('digits'))
  train.train_and_evaluate(tiny_config(num_experts=8, steps=2), workdir)
  return workdir


def readme_snippet() -> str:
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  block = readme.split('<!-- inference-snippet -->')[1].split('<!-- /inference-snippet -->')[0]
  return block.strip().removeprefix('```python').removesuffix('```')


def test_the_readme_snippet_runs_as_written(digits_run, capsys):
  code = readme_snippet()
  assert code.count("'/tmp/digits_switch'") == 2
  namespace = {}
  exec(code.replace("'/tmp/digits_switch'", repr(digits_run)), namespace)  # pylint: disable=exec-used
  assert re.fullmatch(r'test accuracy \d+\.\d\d%\n', capsys.readouterr().out)
  labels, features = namespace['labels'], namespace['features']
  assert labels.shape == (359,) and features.shape == (359, 16)


def test_predict_misuse_is_one_clear_error(digits_run):
  model = inference.load(digits_run)
  (_, _), (raw, _) = input_pipeline.digits_split()  # 0-16 floats, (359, 8, 8, 1).
  images = input_pipeline.normalize_digits(raw)
  takes = 'the model takes a batch (N, 8, 8, 1) of floats in [-1, 1]'
  scaling = (
    "pass scikit-learn's 0-16 digits as x / 8 - 1 or 0-255 pixels as "
    'x.astype(np.float32) / 127.5 - 1.'
  )
  shape = 'images have shape'
  channel = 'add the channel, images[..., None].'
  cases = [
    (
      (raw * 255 / 16).astype(np.uint8),
      f'images have dtype uint8; {takes}, scaled as in training: {scaling}',
    ),
    (raw, f'images range from 0 to 16; {takes}, scaled as in training: {scaling}'),
    (
      np.zeros((2, 28, 28, 1), np.float32),
      f'images have shape (2, 28, 28, 1); {takes} (trained on digits).',
    ),
    (np.zeros((2, 8, 8, 3), np.float32), f'{shape} (2, 8, 8, 3); {takes} (trained on digits).'),
    (images[..., 0], f'{shape} (359, 8, 8); {takes}: {channel}'),
    (images[0], f'images have shape (8, 8, 1), one image; {takes}: pass images[None].'),
    (images[:0], 'images have shape (0, 8, 8, 1), no image; pass at least one.'),
    (np.full((1, 8, 8, 1), np.nan, np.float32), 'images hold NaN or infinite values;'),
  ]
  for bad, message in cases:
    for method in (model.predict, model.features):
      with pytest.raises(UserError) as info:
        method(bad)
      assert str(info.value).startswith(message), str(info.value)
  assert model.predict(images[:1]).shape == (1,)  # A batch of one, float64: fine.
  assert model.predict(images[0][None]).shape == (1,)


def test_load_of_what_is_not_a_run_names_it_without_chained_errors(digits_run, tmp_path):
  missing = str(tmp_path / 'nothing')
  for path, message in [
    (missing, f"workdir='{missing}' does not exist; pass the --workdir of a training run."),
    (
      str(tmp_path),
      f"workdir='{tmp_path}' is not the workdir of a training run ({tmp_path}/config.json does "
      'not exist); pass the --workdir of a training run.',
    ),
  ]:
    with pytest.raises(UserError) as info:
      inference.load(path)
    assert str(info.value) == message
    assert info.value.__cause__ is None and info.value.__context__ is None
  with pytest.raises(UserError, match=r"^init_from='/x' does not exist"):
    inference.load('/x', key='init_from')


# --------------------------------------------------------------------------- other runs as sources


def _fake_fashion(directory):
  """Fashion-MNIST's four IDX files with 40 + 20 random 28x28 images."""
  from vmoe_jax.data import idx_files

  rng = np.random.default_rng(0)
  for split, count in (('train', 40), ('test', 20)):
    images, labels = input_pipeline.FASHION_MNIST_FILES[split]
    idx_files.write(
      os.path.join(directory, images), rng.integers(0, 256, (count, 28, 28), np.uint8)
    )
    idx_files.write(os.path.join(directory, labels), (np.arange(count) % 10).astype(np.uint8))


def test_a_teacher_of_another_image_size_is_one_line(digits_run, tmp_path):
  _fake_fashion(tmp_path)
  config = tiny_config(num_experts=0, steps=1)
  config.input.dataset = 'fashion_mnist'
  config.input.data_dir = str(tmp_path)
  config.distill.teacher = digits_run
  student = tmp_path / 'student'
  with pytest.raises(UserError) as info:
    train.train_and_evaluate(config, str(student))
  assert str(info.value) == (
    f"distill.teacher='{digits_run}' was trained on 8x8x1 images of digits, this run trains on "
    '28x28x1 images of fashion_mnist; distil from a teacher trained on images of the same size.'
  )
  assert not student.exists()  # Refused before anything was written.


def test_sources_that_are_not_runs_name_their_key_and_leave_nothing(digits_run, tmp_path):
  not_a_run = tmp_path / 'empty'
  not_a_run.mkdir()
  for key in ('init_from', 'distill.teacher'):
    config = tiny_config(num_experts=0, steps=1)
    section, _, name = key.rpartition('.')
    (config[section] if section else config)[name] = str(not_a_run)
    with pytest.raises(UserError) as info:
      train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert str(info.value) == (
      f"{key}='{not_a_run}' is not the workdir of a training run ({not_a_run}/config.json does "
      'not exist); pass the --workdir of a training run.'
    )
  config = tiny_config(num_experts=8, steps=1)
  config.model.mlp_dim = 48  # The source's experts are 32 wide: it cannot be mapped.
  config.init_from = digits_run
  with pytest.raises(UserError, match='mlp|moe'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()  # No empty checkpoints/ folder left behind.
