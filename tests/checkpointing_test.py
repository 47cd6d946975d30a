"""Checkpoints: restore on other meshes, resume after kill -9 / SIGTERM, bad checkpoints."""

import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from small_configs import tiny_config

from vmoe_jax import inference
from vmoe_jax import train
from vmoe_jax.data import input_pipeline
from vmoe_jax.errors import UserError
from vmoe_jax.storage import checkpointing
from vmoe_jax.storage import metrics
from vmoe_jax.storage import workdirs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small digits Switch-ViT that trains in seconds on 8 fake devices.
SMALL = [
  '--config.model.width=32',
  '--config.model.depth=2',
  '--config.model.num_heads=2',
  '--config.model.mlp_dim=64',
  '--config.model.moe.group_size=4',
  '--config.input.batch_size=64',
  '--config.input.eval_batch_size=128',
  '--config.schedule.warmup_steps=5',
  '--config.schedule.cooldown_steps=5',
  '--config.train.log_every=5',
  '--config.train.eval_every=0',
]


def main_command(workdir, steps, *extra):
  return [
    sys.executable,
    '-m',
    'vmoe_jax.main',
    '--config=configs/digits_switch.py',
    f'--workdir={workdir}',
    f'--config.train.num_steps={steps}',
    *SMALL,
    *extra,
  ]


def run(workdir, steps, *extra):
  result = subprocess.run(
    main_command(workdir, steps, *extra), cwd=REPO, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  """A run on 8 devices with 4 expert shards: 20 steps, checkpoints every 10."""
  workdir = tmp_path_factory.mktemp('trained')
  run(workdir, 20, '--config.train.checkpoint_every=10', '--config.mesh.expert=4')
  return str(workdir)


def test_checkpoint_of_8_devices_restores_on_1_2_4(trained_workdir):
  (_, _), (test_x, test_y) = input_pipeline.digits_split()
  images = input_pipeline.normalize_digits(test_x)[:240]
  labels = test_y[:240]
  reference = inference.load(trained_workdir)
  assert reference.mesh.size == 8 and reference.step == 20
  ref_logits = reference.logits(images, batch_size=240)
  ref_accuracy = np.mean(ref_logits.argmax(-1) == labels)
  final = [r for r in metrics.read_metrics(trained_workdir) if 'test/accuracy' in r][-1]
  for n in (1, 2, 4):
    restored = inference.load(trained_workdir, devices=jax.devices()[:n])
    assert restored.mesh.size == n
    wi = restored.params['block_01']['moe']['wi']
    assert wi.sharding.shard_shape(wi.shape)[0] == 8 // n  # 8 experts over n shards.
    logits = restored.logits(images, batch_size=240)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert np.mean(logits.argmax(-1) == labels) == ref_accuracy
  # The eval of the training run (all 359 test images) is reproduced on 2 devices.
  two = inference.load(trained_workdir, devices=jax.devices()[:2])
  all_images = input_pipeline.normalize_digits(test_x)
  acc = inference.accuracy(two, all_images, test_y, batch_size=360)
  assert acc == pytest.approx(final['test/accuracy'], abs=1e-6)


def test_load_errors(tmp_path, trained_workdir):
  with pytest.raises(UserError, match='does not exist'):
    inference.load(str(tmp_path))
  with pytest.raises(UserError, match='has no checkpoint 7'):
    inference.load(trained_workdir, step=7)


def _params(workdir):
  return jax.device_get(inference.load(workdir).params)


def test_kill_9_and_restart_gives_the_same_final_params(tmp_path):
  steps = 40
  straight = tmp_path / 'straight'
  run(straight, steps, '--config.train.checkpoint_every=10')
  killed = tmp_path / 'killed'
  process = subprocess.Popen(
    main_command(killed, steps, '--config.train.checkpoint_every=10'),
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  # Wait for the first checkpoint, then kill at a random moment.
  deadline = time.time() + 300
  while not (killed / 'checkpoints' / '10').exists():
    assert process.poll() is None and time.time() < deadline
    time.sleep(0.2)
  time.sleep(random.uniform(0.0, 2.0))
  process.send_signal(signal.SIGKILL)
  process.wait()
  saved = checkpointing.create_manager(str(killed), create=False).all_steps()
  assert steps not in saved  # It really was interrupted.
  run(killed, steps, '--config.train.checkpoint_every=10')
  a, b = _params(straight), _params(killed)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
  process = subprocess.Popen(
    main_command(tmp_path, 100_000, '--config.train.checkpoint_every=0'),
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 300
  while not (tmp_path / metrics.METRICS_FILE).exists():
    assert process.poll() is None and time.time() < deadline
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 2
  last = stderr.strip().splitlines()[-1]
  assert last.startswith('error: stopped by SIGTERM at step ') and 'saved' in last
  step = int(last.split('at step ')[1].split(';')[0])
  assert step in checkpointing.create_manager(str(tmp_path), create=False).all_steps()
  # Resuming continues from that step.
  result = run(tmp_path, step + 20)
  assert f'from step {step}' in result.stderr


def test_corrupt_checkpoint_is_a_clear_error_and_is_kept(trained_workdir, tmp_path):
  import shutil

  workdir = tmp_path / 'corrupt'
  shutil.copytree(trained_workdir, workdir)
  state_dir = workdir / 'checkpoints' / '20' / 'state'
  victims = [p for p in state_dir.rglob('*') if p.is_file() and p.stat().st_size > 0]
  for path in victims:
    path.write_bytes(b'\x00garbage' * 8)
  before = {p: p.read_bytes() for p in (workdir / 'checkpoints').rglob('*') if p.is_file()}
  result = subprocess.run(
    main_command(workdir, 30), cwd=REPO, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: checkpoint ') and '/checkpoints/20' in last, last
  assert 'move it away' in last
  after = {p: p.read_bytes() for p in (workdir / 'checkpoints').rglob('*') if p.is_file()}
  assert after == before  # Nothing overwritten, nothing new.


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
  config = tiny_config(num_experts=0)
  config.train.num_steps = 30
  config.train.checkpoint_every = 2
  config.optimizer.learning_rate = 1e35
  config.optimizer.grad_clip_norm = 0.0
  config.schedule.warmup_steps = 0
  with pytest.raises(UserError, match='not finite at step') as info:
    train.train_and_evaluate(config, str(tmp_path))
  assert 'is kept' in str(info.value) or 'no checkpoint' in str(info.value)
  steps = checkpointing.create_manager(str(tmp_path), create=False).all_steps()
  for step in steps:  # Every checkpoint kept holds finite params.
    config_step = inference.load(str(tmp_path), step=step)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(config_step.params))


def test_nonfinite_steps_can_be_skipped(tmp_path):
  config = tiny_config(num_experts=0)
  config.train.num_steps = 6
  config.optimizer.learning_rate = 1e35
  config.optimizer.grad_clip_norm = 0.0
  config.schedule.warmup_steps = 0
  config.train.on_nonfinite = 'skip'
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results['step'] == 6
  records = [r for r in metrics.read_metrics(str(tmp_path)) if 'train/nonfinite' in r]
  assert sum(r['train/nonfinite'] for r in records) >= 1
  params = jax.device_get(inference.load(str(tmp_path)).params)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_inference_reads_only_params(tmp_path):
  """A checkpoint restores for inference whatever optimizer state it holds."""
  import json

  config = tiny_config(num_experts=8, steps=2)
  config.optimizer.name = 'adamw'
  train.train_and_evaluate(config, str(tmp_path))
  saved = jax.device_get(inference.load(str(tmp_path)).params)
  # Pretend another optimizer wrote it: the optimizer state no longer matches.
  path = tmp_path / workdirs.CONFIG_FILE
  written = json.loads(path.read_text())
  written['optimizer']['name'] = 'sgd'
  path.write_text(json.dumps(written))
  again = jax.device_get(inference.load(str(tmp_path)).params)
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
