"""The evaluate command end to end (top-k, Expert Choice, Soft MoE, dense), and few-shot."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from small_configs import tiny_config

from vmoe_jax import inference
from vmoe_jax import train
from vmoe_jax.evaluation import capacity_sweep
from vmoe_jax.models import flops
from vmoe_jax.storage import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNGS = ('accuracy_vs_compute.png', 'expert_load.png', 'class_expert.png', 'examples.png')


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  """A tiny digits Switch-ViT, 4 steps on 8 devices, few-shot at step 2 and at the end."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  config = tiny_config(steps=4)
  config.fewshot.every = 2
  config.fewshot.shots = (1, 2)
  config.fewshot.num_trials = 2
  results = train.train_and_evaluate(config, workdir)
  return workdir, results


def test_fewshot_runs_during_training_and_at_the_end(trained_workdir):
  workdir, results = trained_workdir
  records = [r for r in metrics.read_metrics(workdir) if 'fewshot/1shot' in r]
  assert [r['step'] for r in records] == [2, 4]
  assert all(0.0 <= r['fewshot/2shot'] <= 1.0 for r in records)
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['fewshot/1shot'] == results['fewshot/1shot'] == records[-1]['fewshot/1shot']


def test_evaluate_writes_the_sweep_maps_and_fewshot(trained_workdir, tmp_path):
  workdir, results = trained_workdir
  report = capacity_sweep.run(
    workdir, (0.25, 1.0), output_dir=str(tmp_path), num_examples=3, timing_seconds=0.01
  )
  for name in ('eval.json', 'eval.md', *PNGS):
    assert (tmp_path / name).stat().st_size > 0, name
  assert (tmp_path / 'accuracy_vs_compute.png').read_bytes()[:4] == b'\x89PNG'
  with open(tmp_path / 'eval.json') as f:
    assert json.load(f) == json.loads(json.dumps(report))
  # 8 devices, eval batch 128: 16 images per device, routing groups of group_size=2.
  assert report['devices'] == 8 and report['images_per_group'] == 2
  rows = {(r['capacity_factor'], r['batch_priority']): r for r in report['settings']}
  # The sweep, the examples' low capacity (0.5), the training capacity (1.25) and the
  # training evaluation's (2.0), these two with the run's routing (vanilla).
  sweep = [(c, b) for c in (0.25, 0.5, 1.0) for b in (False, True)]
  assert sorted(rows) == [*sweep, (1.25, False), (2.0, False)]
  # The training evaluation used the same batches and groups: the same accuracy.
  assert rows[2.0, False]['accuracy'] == pytest.approx(results['test/accuracy'], abs=1e-9)
  assert rows[2.0, False]['loss'] == pytest.approx(results['test/loss'], rel=1e-4)
  model = inference.load(workdir).model
  for (capacity, _), row in rows.items():
    # 5 tokens x K=1 in the one MoE layer: C = ceil(2 * 5 * c / 8) slots of 8 experts per group.
    slots = 8 * int(np.ceil(10 * capacity / 8)) / 2
    assert row['kept_assignments_per_image'] <= min(slots, 5) + 1e-9
    assert row['kept_share'] == pytest.approx(row['kept_assignments_per_image'] / 5)
    assert row['expert_flops_per_image'] == pytest.approx(
      flops.expert_flops_per_image(model, row['kept_assignments_per_image'])
    )
    assert row['buffer_expert_flops_per_image'] == pytest.approx(slots * 4 * 16 * 32)
    assert set(row['layers']) == {'block_01'}
  assert rows[0.25, False]['kept_share'] < rows[1.0, False]['kept_share']
  assert rows[0.25, True]['kept_share'] < rows[1.0, True]['kept_share']
  shares = np.array(report['class_expert_share']['block_01'])
  assert shares.shape == (10, 8)
  np.testing.assert_allclose(shares.sum(axis=1), 1.0, atol=1e-3)  # Every class has test images.
  assert set(report['fewshot']['shots']) == {'1', '2'}
  assert 0.0 <= report['fewshot']['shots']['1']['accuracy'] <= 1.0


def test_evaluate_a_dense_model(tmp_path):
  workdir = str(tmp_path / 'dense')
  train.train_and_evaluate(tiny_config(num_experts=0, steps=1), workdir)
  report = capacity_sweep.run(workdir, output_dir=str(tmp_path / 'eval'), fewshot=False)
  assert [r['capacity_factor'] for r in report['settings']] == [None]
  assert 'dense' in (tmp_path / 'eval' / 'eval.md').read_text()
  assert not any((tmp_path / 'eval' / name).exists() for name in PNGS)


def _command(*args):
  return subprocess.run(
    [sys.executable, '-m', 'vmoe_jax.evaluate', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_command_line(trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  out = tmp_path / 'cli'
  result = _command(
    f'--workdir={workdir}', '--capacity_factors=0.5', f'--output_dir={out}', '--nofewshot'
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert '| 0.5 | BPR |' in result.stdout and (out / 'examples.png').exists()
  result = _command(f'--workdir={workdir}', '--capacity_factors=0.5,big')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith('error: --capacity_factors=0.5,big')
  result = _command(f'--workdir={tmp_path}/nothing')
  assert result.returncode == 2 and 'does not exist' in result.stderr.strip().splitlines()[-1]


def _train_router(tmp_path, router: str, **moe) -> str:
  workdir = str(tmp_path / router)
  config = tiny_config(steps=1)
  config.model.moe.router = router
  config.model.moe.update(moe)
  train.train_and_evaluate(config, workdir)
  return workdir


def test_evaluate_expert_choice_sweeps_capacity_without_bpr(tmp_path):
  # eval_capacity_factor = capacity_factor: the maps' two settings are one.
  workdir = _train_router(tmp_path, 'expert_choice', eval_capacity_factor=1.25)
  out = tmp_path / 'eval'
  report = capacity_sweep.run(
    workdir, (0.5,), output_dir=str(out), num_examples=2, fewshot=False, timing_seconds=0.01
  )
  for name in ('eval.json', 'eval.md', *PNGS):
    assert (out / name).stat().st_size > 0, name
  rows = {(r['capacity_factor'], r['batch_priority']): r for r in report['settings']}
  assert sorted(rows) == [(0.5, None), (1.25, None)]  # Experts choose: no BPR rows.
  model = inference.load(workdir).model
  for row in rows.values():
    # K = 1: the kept share is the mean number of experts per token (T = 5).
    assert row['kept_share'] == pytest.approx(row['kept_assignments_per_image'] / 5)
    layer = row['layers']['block_01']
    assert sum(layer['expert_kept_share']) == pytest.approx(row['kept_share'])
    assert sum(layer['expert_chosen_share']) == pytest.approx(1.0)  # One first choice per token.
    assert row['expert_flops_per_image'] == pytest.approx(
      flops.expert_flops_per_image(model, row['kept_assignments_per_image'])
    )
  assert rows[0.5, None]['kept_share'] < rows[1.25, None]['kept_share']
  text = (out / 'eval.md').read_text()
  assert 'BPR does not apply' in text and '| 0.5 | experts choose |' in text
  assert 'mean number of experts per token' in text


def test_evaluate_soft_moe_has_one_row_at_the_trained_setting(tmp_path):
  workdir = _train_router(tmp_path, 'soft')
  out = tmp_path / 'eval'
  report = capacity_sweep.run(
    workdir, (0.5, 1.0), output_dir=str(out), num_examples=2, fewshot=False, timing_seconds=0.01
  )
  for name in ('eval.json', 'eval.md', *PNGS[1:]):
    assert (out / name).stat().st_size > 0, name
  assert not (out / 'accuracy_vs_compute.png').exists()  # No sweep, no curve.
  assert report['sweep']['capacity'] is False and 'Soft MoE' in report['sweep']['note']
  [row] = report['settings']
  assert row['capacity_factor'] is None and row['batch_priority'] is None
  assert np.isfinite(row['loss'])  # Padding-only routing groups stay finite.
  assert row['kept_share'] == pytest.approx(1.0)
  # 2 images per group of 10 tokens, 8 experts: round(1.25 * 10 / 8) = 2 slots each.
  model = inference.load(workdir).model
  slots = flops.forward_flops(model, (8, 8, 1), images_per_group=2)['experts']
  assert row['expert_flops_per_image'] == pytest.approx(slots)
  assert slots == pytest.approx(8 * 2 / 2 * 4 * 16 * 32)
  assert '| - | as trained |' in (out / 'eval.md').read_text()
