"""End-to-end training on 8 fake CPU devices: steps, metrics, checkpoints, resume."""

import functools
import json
import os

import jax
import numpy as np
import pytest
from small_configs import tiny_config

from vmoe_jax import steps
from vmoe_jax import train
from vmoe_jax.data import input_pipeline
from vmoe_jax.errors import UserError
from vmoe_jax.models import factory
from vmoe_jax.optim import optimizers
from vmoe_jax.optim import schedules
from vmoe_jax.runtime import sharding
from vmoe_jax.storage import metrics


def test_two_steps_end_to_end_on_8_devices(tmp_path):
  assert jax.device_count() == 8
  config = tiny_config()
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results['step'] == 2
  assert 0.0 <= results['test/accuracy'] <= 1.0
  records = metrics.read_metrics(str(tmp_path))
  steps = [r['step'] for r in records if 'train/loss' in r]
  assert steps == [1, 2]
  first = records[0]
  assert np.isfinite(first['train/loss'])
  assert 'train/moe/block_01/dropped' in first
  assert len(first['train/moe/block_01/expert_load']) == 8
  np.testing.assert_allclose(sum(first['train/moe/block_01/expert_load']), 1.0, rtol=1e-5)
  assert os.path.isdir(tmp_path / 'checkpoints' / '2')
  assert os.listdir(tmp_path / 'tensorboard')
  with open(tmp_path / 'results.json') as f:
    assert json.load(f)['test/accuracy'] == results['test/accuracy']
  table = (tmp_path / 'results.md').read_text().splitlines()
  assert table[0].startswith('| model | experts | parameters | test accuracy')
  assert table[2].startswith('| Switch-ViT 16/2x2/32 p4, K=1 every_2 | 8 |')


def test_resume_continues_from_the_checkpoint(tmp_path):
  config = tiny_config(steps=2)
  train.train_and_evaluate(config, str(tmp_path))
  config = tiny_config(steps=3)
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results['step'] == 3 and results['train_steps_run'] == 1


def test_rerunning_a_finished_run_keeps_its_results(tmp_path):
  first = train.train_and_evaluate(tiny_config(steps=2), str(tmp_path))
  before = (tmp_path / 'results.json').read_text()
  again = train.train_and_evaluate(tiny_config(steps=2), str(tmp_path))
  assert (tmp_path / 'results.json').read_text() == before
  assert again['test/accuracy'] == first['test/accuracy']


def test_resume_with_another_model_is_refused(tmp_path):
  train.train_and_evaluate(tiny_config(steps=1), str(tmp_path))
  before = sorted(os.listdir(tmp_path / 'checkpoints'))
  with pytest.raises(UserError, match='holds checkpoints of another model'):
    train.train_and_evaluate(tiny_config(num_experts=16, steps=2), str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == before


def test_batch_not_divisible_by_devices(tmp_path):
  config = tiny_config()
  config.input.batch_size = 12
  with pytest.raises(UserError, match='batch_size=12 does not split over the 8 devices'):
    train.train_and_evaluate(config, str(tmp_path))


def test_gradient_accumulation_matches_one_big_batch():
  """Dense model, no dropout: 2 micro-batches give the gradient of the whole batch."""
  config = tiny_config(num_experts=0)
  config.optimizer.name = 'sgd'
  config.optimizer.beta1 = 0.0
  config.optimizer.grad_clip_norm = 0.0
  mesh = sharding.create_mesh(1, 0)
  data = input_pipeline.create_dataset(config)
  model = factory.create_model(config, data.num_classes, mesh)
  schedule = schedules.create_learning_rate_schedule(peak_value=0.5, total_steps=10)
  tx, init_fn, _, _ = steps.create_train_state(
    model,
    lambda p, m: optimizers.create_optimizer(config, schedule, p, m),
    mesh,
    data.image_shape,
  )
  batch = sharding.global_batch(next(data.train_batches(0)), mesh)
  states = {}
  for accum in (1, 2):
    step = jax.jit(
      functools.partial(steps.train_step, model=model, tx=tx, schedule=schedule, accum_steps=accum)
    )
    states[accum], metrics = step(init_fn(0), batch)
    assert np.isfinite(float(metrics['train/loss']))
  for a, b in zip(jax.tree.leaves(states[1].params), jax.tree.leaves(states[2].params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_profile_from_training_and_keep_last_checkpoints(tmp_path):
  config = tiny_config(num_experts=8, steps=6)
  config.profile.start_step = 2
  config.profile.num_steps = 2
  config.train.checkpoint_every = 1
  config.train.keep_checkpoints = 2
  train.train_and_evaluate(config, str(tmp_path))
  traces = [f for _, _, files in os.walk(tmp_path / 'profile') for f in files]
  assert any(f.endswith('.xplane.pb') for f in traces)
  assert sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit()) == [5, 6]
