"""vmoe_jax.evaluation.ablation and launch/ablate.py: removing blocks' MLPs from a trained model."""

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from small_configs import tiny_config

from vmoe_jax import inference
from vmoe_jax import train
from vmoe_jax.data import input_pipeline
from vmoe_jax.errors import UserError
from vmoe_jax.evaluation import ablation
from vmoe_jax.models import vit
from vmoe_jax.moe import layer as moe_layer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'launch'))
import ablate  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  """A tiny digits Switch-ViT (block 0 dense, block 1 MoE), 4 steps."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  results = train.train_and_evaluate(tiny_config(steps=4), workdir)
  return workdir, results


@pytest.fixture(scope='module')
def trained(trained_workdir):
  return inference.load(trained_workdir[0])


def zero_branch_interceptor(blocks):
  """Makes the MLP / MoE module of `blocks` return zeros: the ablation computed another way."""
  names = {f'block_{b:02d}' for b in blocks}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or not module.scope or not module.scope.path:
      return next_fun(*args, **kwargs)
    if module.scope.path[-2:-1] and module.scope.path[-2] in names:
      if isinstance(module, vit.MlpBlock):
        return jnp.zeros_like(next_fun(*args, **kwargs))
      if isinstance(module, moe_layer.MoeMlp):
        y, metrics = next_fun(*args, **kwargs)
        return jnp.zeros_like(y), metrics
    return next_fun(*args, **kwargs)

  return interceptor


def test_kinds_and_default_sets(trained):
  kinds = ablation.mlp_kinds(trained.params)
  assert kinds == {0: 'mlp', 1: 'moe'}
  assert ablation.default_block_sets(kinds) == [(), (0,), (1,)]
  four = {0: 'mlp', 1: 'moe', 2: 'mlp', 3: 'moe'}
  assert ablation.default_block_sets(four) == [(), (0,), (1,), (2,), (3,), (1, 3), (0, 2)]
  dense = {0: 'mlp', 1: 'mlp', 2: 'mlp'}
  assert ablation.default_block_sets(dense) == [(), (0,), (1,), (2,), (0, 1, 2)]


@pytest.mark.parametrize('blocks', [(0,), (1,), (0, 1)])
def test_zeroed_outputs_equal_a_model_whose_mlp_branch_returns_zeros(trained, blocks):
  images = jax.random.uniform(jax.random.PRNGKey(0), (16, 8, 8, 1), minval=-1, maxval=1)

  def apply(params):
    return trained.model.apply({'params': params}, images, train=False)[0]

  def apply_intercepted(params):  # The interceptor acts while this is traced.
    with nn.intercept_methods(zero_branch_interceptor(blocks)):
      return apply(params)

  jitted = jax.jit(apply)
  logits = lambda params: np.asarray(jitted(params))  # noqa: E731
  full = logits(trained.params)
  zeroed = logits(ablation.zero_mlp_outputs(trained.params, blocks))
  intercepted = np.asarray(jax.jit(apply_intercepted)(trained.params))
  assert np.abs(intercepted - full).max() > 1e-4  # The branch being removed is not zero.
  np.testing.assert_allclose(zeroed, intercepted, rtol=0, atol=1e-6)
  # The original params are untouched.
  np.testing.assert_array_equal(logits(trained.params), full)


def test_run_writes_the_table_and_its_none_row_is_the_training_eval(
  trained_workdir, trained, tmp_path
):
  workdir, results = trained_workdir
  report = ablation.run(workdir, output_dir=str(tmp_path), log=lambda _: None)
  rows = {tuple(r['blocks']): r['accuracy'] for r in report['rows']}
  assert set(rows) == {(), (0,), (1,)}
  assert rows[()] == pytest.approx(results['test/accuracy'], abs=1e-6)
  assert report['test_images'] == input_pipeline.create_dataset(trained.config).num_test
  saved = json.loads((tmp_path / 'ablation.json').read_text())
  assert saved['rows'] == report['rows']
  table = (tmp_path / 'ablation.md').read_text()
  assert '| 1 (MoE) |' in table and '| 0 (dense) |' in table


def test_cli_prints_the_table(trained_workdir, tmp_path, capsys):
  assert (
    ablate.main([f'--workdir={trained_workdir[0]}', '--blocks=none;1', f'--output_dir={tmp_path}'])
    == 0
  )
  out = capsys.readouterr().out
  assert '| none |' in out and '| 1 (MoE) |' in out
  assert os.path.exists(tmp_path / 'ablation.md')


def test_errors(trained_workdir, trained, tmp_path, capsys):
  with pytest.raises(UserError, match=r'block\(s\) \[5\].*blocks \[0, 1\]'):
    ablation.zero_mlp_outputs(trained.params, (0, 5))
  with pytest.raises(UserError, match="'x' is not a list of block indices"):
    ablation.parse_block_sets('0;x')
  assert ablation.parse_block_sets('none;0;1,3') == [(), (0,), (1, 3)]
  assert (
    ablate.main([f'--workdir={trained_workdir[0]}', '--blocks=7', f'--output_dir={tmp_path}']) == 2
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: --blocks names block(s) [7]')
  assert not os.path.exists(tmp_path / 'ablation.md')
  assert ablate.main([f'--workdir={tmp_path / "missing"}', f'--output_dir={tmp_path}']) == 2
  assert capsys.readouterr().err.startswith('error: ')


def test_split_evaluates_train_images_and_keeps_the_test_table(trained_workdir, trained, tmp_path):
  workdir, _ = trained_workdir
  (tmp_path / 'ablation.json').write_text('{"kept": true}')  # A test-split table from before.
  report = ablation.run(
    workdir, [()], output_dir=str(tmp_path), log=lambda _: None, split='train[:100]'
  )
  assert report['test_split'] == 'train[:100]' and report['test_images'] == 100
  assert report['files'] == ['ablation_train_100.json', 'ablation_train_100.md']
  assert json.loads((tmp_path / 'ablation.json').read_text()) == {'kept': True}
  assert '| train[:100] accuracy |' in (tmp_path / 'ablation_train_100.md').read_text()
  # Independently: the first 100 training images through the inference API.
  config = inference.run_config(workdir)
  config.input.test_split = 'train[:100]'
  dataset = input_pipeline.create_dataset(config)
  images, labels = [], []
  for batch in dataset.eval_batches():
    keep = np.asarray(batch['mask']) > 0
    images.append(np.asarray(batch['image'], np.float32)[keep])
    labels.append(np.asarray(batch['label'])[keep])
  logits, _ = trained.apply(np.concatenate(images), batch_size=config.input.eval_batch_size)
  expected = float(np.mean(np.argmax(logits, -1) == np.concatenate(labels)))
  assert 0 < expected < 1
  assert report['rows'][0]['accuracy'] == pytest.approx(expected, abs=1e-9)


def test_bad_split_is_one_line(trained_workdir, tmp_path, capsys):
  args = [f'--workdir={trained_workdir[0]}', '--blocks=none', f'--output_dir={tmp_path}']
  assert ablate.main([*args, '--split=train[5000:9000]']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "split 'train[5000:9000]' selects no examples" in err[0]
  assert not list(tmp_path.iterdir())
