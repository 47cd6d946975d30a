"""The results ledger: run ids, records of finished runs, reading a folder back."""

import json
import os
import subprocess
import sys

import pytest

from vmoe_jax.errors import UserError
from vmoe_jax.evaluation import ledger

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_id_is_stable_readable_and_distinct():
  a = ledger.run_id('configs/fashion_vit.py:w32,val', {'train.num_steps': 100}, 0)
  assert a == ledger.run_id('configs/fashion_vit.py:w32,val', {'train.num_steps': 100}, 0)
  assert a.startswith('fashion_vit_w32-val_scratch_s0_')
  others = {
    ledger.run_id('configs/fashion_vit.py:w32,val', {'train.num_steps': 100}, 1),
    ledger.run_id('configs/fashion_vit.py:w32,val', {'train.num_steps': 200}, 0),
    ledger.run_id('configs/fashion_vit.py:w32', {'train.num_steps': 100}, 0),
    ledger.run_id('configs/fashion_vit.py:w32,val', {'train.num_steps': 100}, 0, 'continued'),
  }
  assert a not in others and len(others) == 4
  with pytest.raises(UserError, match="kind='pretrained' is unknown"):
    ledger.run_id('configs/fashion_vit.py', {}, 0, 'pretrained')


def test_records_round_trip_and_incomplete_ones_are_refused(tmp_path):
  record = {key: None for key in ledger.RECORD_KEYS}
  record.update(run_id='x_s0', test_accuracy=0.9, seed=0)
  ledger.write_record(str(tmp_path), record)
  assert ledger.has_record(str(tmp_path), 'x_s0')
  assert ledger.load_records(str(tmp_path)) == [record]
  with pytest.raises(UserError, match='lacks'):
    ledger.write_record(str(tmp_path), {'run_id': 'y'})
  (tmp_path / 'broken.json').write_text('{"run_id": ')
  with pytest.raises(UserError, match='broken.json is unreadable'):
    ledger.load_records(str(tmp_path))


@pytest.mark.slow
def test_a_finished_run_gives_a_complete_record(tmp_path):
  workdir = tmp_path / 'run'
  overrides = {'train.num_steps': 4, 'train.log_every': 2, 'train.checkpoint_every': 0}
  cmd = [
    sys.executable,
    '-m',
    'vmoe_jax.main',
    '--config=configs/digits_switch.py',
    f'--workdir={workdir}',
    '--config.seed=1',
    *(f'--config.{k}={v}' for k, v in overrides.items()),
  ]
  subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
  record = ledger.make_record(
    str(workdir), config='configs/digits_switch.py', overrides=overrides, seed=1
  )
  results = json.loads((workdir / 'results.json').read_text())
  assert record['test_accuracy'] == results['test/accuracy']
  assert record['params'] == results['num_params']
  assert record['split'] == 'test' and record['kind'] == 'scratch' and record['num_steps'] == 4
  assert record['num_experts'] == 8 and record['router'] == 'topk' and record['num_selected'] == 1
  assert record['moe_layers'] == [1, 3] and record['width'] > 0
  assert 0 <= record['train_accuracy'] <= 1 and record['gflops_per_image'] > 0
  assert record['cpu'] and record['jax_version'] and record['threads'] >= 1
  ledger.write_record(str(tmp_path / 'ledger'), record)
  assert ledger.load_records(str(tmp_path / 'ledger'))[0]['run_id'] == record['run_id']
