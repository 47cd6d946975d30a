"""config.init_from end to end: what a transferred run starts from, and what it refuses."""

import os
import shutil

import pytest
from checkpoint_surgery import digests
from checkpoint_surgery import flip_byte
from small_configs import tiny_config

from vmoe_jax import train
from vmoe_jax.errors import UserError
from vmoe_jax.storage import metrics


def dense_config(steps=3):
  config = tiny_config(num_experts=0, steps=steps)
  # MLP kernels of 16 x 256 floats: large enough that orbax stores them out of line,
  # where the corruption test can reach them.
  config.model.mlp_dim = 256
  config.input.eval_batch_size = 384  # All 359 digits test images in one padded batch.
  return config


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A finished dense run (3 steps) and its final test accuracy."""
  workdir = str(tmp_path_factory.mktemp('source'))
  results = train.train_and_evaluate(dense_config(), workdir)
  return workdir, results['test/accuracy']


def step_zero_accuracy(workdir):
  evals = [r for r in metrics.read_metrics(workdir) if 'test/accuracy' in r and r['step'] == 0]
  assert len(evals) == 1, evals
  return evals[0]['test/accuracy']


def test_a_transfer_evaluates_at_step_0_and_leaves_the_source_untouched(source, tmp_path):
  """Same model: the step-0 evaluation is the source's own final evaluation."""
  workdir, accuracy = source
  before = digests(workdir)
  config = dense_config(steps=2)
  config.init_from = workdir
  config.optimizer.learning_rate = 1e-9  # Whatever it learns: the start is what is checked.
  train.train_and_evaluate(config, str(tmp_path))
  assert step_zero_accuracy(str(tmp_path)) == accuracy
  assert digests(workdir) == before


def test_upcycling_starts_from_the_dense_model(source, tmp_path):
  """K=1, renormalised weights, no drops: every token gets its dense MLP (logits to ~1e-6)."""
  workdir, accuracy = source
  config = tiny_config(num_experts=4, steps=1)
  config.model.mlp_dim = 256
  config.input.eval_batch_size = 384
  moe = config.model.moe
  moe.num_selected, moe.renormalize = 1, True
  moe.capacity_factor = moe.eval_capacity_factor = 4.0
  config.init_from = workdir
  train.train_and_evaluate(config, str(tmp_path))
  assert step_zero_accuracy(str(tmp_path)) == accuracy


def test_missing_unmappable_and_corrupt_sources_are_one_line(source, tmp_path):
  workdir, _ = source
  before = digests(workdir)
  config = dense_config(steps=1)
  config.init_from = str(tmp_path / 'nowhere')
  with pytest.raises(UserError, match=r"^init_from='.*nowhere' does not exist; pass the --workdir"):
    train.train_and_evaluate(config, str(tmp_path / 'a'))

  config = dense_config(steps=1)
  config.model.mlp_dim = 48  # The source's MLPs are 256 wide.
  config.init_from = workdir
  with pytest.raises(UserError) as info:
    train.train_and_evaluate(config, str(tmp_path / 'b'))
  assert '\n' not in str(info.value) and 'mlp' in str(info.value), str(info.value)
  assert not os.path.exists(tmp_path / 'b' / 'checkpoints' / '1')

  corrupt = tmp_path / 'corrupt'
  shutil.copytree(workdir, corrupt)
  flip_byte(corrupt / 'checkpoints' / '3' / 'state', 'params.block_01.mlp.Dense_0.kernel')
  copied = digests(corrupt)
  config = dense_config(steps=1)
  config.init_from = str(corrupt)
  with pytest.raises(UserError) as info:
    train.train_and_evaluate(config, str(tmp_path / 'c'))
  assert '\n' not in str(info.value), str(info.value)
  assert f'checkpoint {corrupt}/checkpoints/3 is corrupt: params/block_01/' in str(info.value)
  assert digests(corrupt) == copied  # Refused, and left as it was.
  assert digests(workdir) == before
