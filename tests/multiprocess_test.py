"""Several local JAX processes (2 x 4 CPU devices) against one process with 8 devices.

The 2-process runs go through `launch/local.py`: each process runs
`python -m vmoe_jax.main` and they meet through `jax.distributed.initialize`
on localhost with gloo collectives.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from vmoe_jax import inference
from vmoe_jax.data import input_pipeline
from vmoe_jax.storage import checkpointing
from vmoe_jax.storage import metrics

pytestmark = pytest.mark.multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6  # The 2-process run; the 1-process reference trains 2 steps further.

# The small digits Switch-ViT of checkpointing_test, 4-way expert parallelism,
# a loss on every step and no cooldown (the schedule does not depend on the
# number of steps, so a run of 6 steps is the beginning of a run of 8).
SMALL = [
  '--config=configs/digits_switch.py',
  '--config.model.width=32',
  '--config.model.depth=2',
  '--config.model.num_heads=2',
  '--config.model.mlp_dim=64',
  '--config.model.moe.group_size=4',
  '--config.input.batch_size=64',
  '--config.input.eval_batch_size=128',
  '--config.schedule.warmup_steps=2',
  '--config.schedule.cooldown_steps=0',
  '--config.train.log_every=1',
  '--config.train.eval_every=0',
  '--config.train.checkpoint_every=0',
  '--config.mesh.expert=4',
]


def cpu_env(num_devices):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
  return env


def run_one_process(workdir, steps):
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'vmoe_jax.main',
      f'--workdir={workdir}',
      *SMALL,
      f'--config.train.num_steps={steps}',
    ],
    cwd=REPO,
    env=cpu_env(8),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def losses(workdir):
  return {r['step']: r['train/loss'] for r in metrics.read_metrics(workdir) if 'train/loss' in r}


def run_two_processes(workdir):
  """STEPS steps as 2 processes x 4 devices, through launch/local.py; returns the output."""
  result = subprocess.run(
    [
      sys.executable,
      'launch/local.py',
      '--num_processes=2',
      '--devices_per_process=4',
      '--timeout=120',
      '--',
      f'--workdir={workdir}',
      *SMALL,
      f'--config.train.num_steps={STEPS}',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stdout[-4000:]
  return result.stdout


# One test, not several sharing fixtures: under pytest-xdist each worker would
# train the runs again.
def test_two_processes_match_one_and_their_checkpoint_restores_in_one(tmp_path):
  two, one = str(tmp_path / 'two_processes'), str(tmp_path / 'one_process')
  output = run_two_processes(two)
  run_one_process(one, STEPS + 2)
  check_loss_curves(two, one, output)
  check_files(two, output)
  check_inference_in_one_process(two)
  check_resume_in_one_process(two, one, str(tmp_path / 'resumed'))


def check_loss_curves(two_workdir, one_workdir, output):
  assert 'Process 0 of 2; 4 local of 8 devices.' in output
  assert "Mesh {'data': 2, 'expert': 4} over 8 devices (2 processes)." in output
  two, one = losses(two_workdir), losses(one_workdir)
  assert sorted(two) == list(range(1, STEPS + 1))  # Each step logged once: process 0 only.
  difference = max(abs(two[s] - one[s]) for s in two)
  print(f'max |loss(2 x 4) - loss(1 x 8)| over {STEPS} steps: {difference:.3g}')
  assert difference <= 1e-5, (two, one)
  assert two[1] != two[STEPS]  # The curve moves.


def check_files(workdir, output):
  """Process 0 writes progress, metrics and results; every process its checkpoint shards."""
  lines = output.splitlines()
  assert any(line.startswith('[0] ') and 'step 1/' in line for line in lines)
  assert not any(line.startswith('[1] ') and 'step 1/' in line for line in lines)
  assert len(os.listdir(os.path.join(workdir, 'tensorboard'))) == 1
  for name in ('config.json', 'dataset.json', 'results.json', 'results.md'):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['step'] == STEPS
  state_dir = os.path.join(workdir, 'checkpoints', str(STEPS), 'state')
  written = set(os.listdir(state_dir))
  assert {'ocdbt.process_0', 'ocdbt.process_1'} <= written, written


def check_inference_in_one_process(workdir):
  (_, _), (test_x, test_y) = input_pipeline.digits_split()
  images = input_pipeline.normalize_digits(test_x)
  eight = inference.load(workdir)  # This pytest process: 1 process, 8 devices.
  one = inference.load(workdir, devices=jax.devices()[:1])
  assert jax.process_count() == 1 and eight.step == one.step == STEPS
  np.testing.assert_allclose(
    one.logits(images, batch_size=360), eight.logits(images, batch_size=360), atol=1e-5
  )
  with open(os.path.join(workdir, 'results.json')) as f:
    final = json.load(f)
  # The final evaluation of the 2-process run, reproduced here.
  accuracy = inference.accuracy(eight, images, test_y, batch_size=360)
  assert accuracy == pytest.approx(final['test/accuracy'], abs=1e-6)


def check_resume_in_one_process(two_workdir, one_workdir, workdir):
  """One process continues the 2-process run as the 1-process run went on."""
  shutil.copytree(two_workdir, workdir)
  result = run_one_process(workdir, STEPS + 2)
  assert f'from step {STEPS}' in result.stderr
  resumed, straight = losses(workdir), losses(one_workdir)
  for step in (STEPS + 1, STEPS + 2):
    assert resumed[step] == pytest.approx(straight[step], abs=1e-5)
  assert STEPS + 2 in checkpointing.create_manager(workdir, create=False).all_steps()


# --------------------------------------------------------------------------- failures


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def start_main(workdir, process_id, num_devices=4, *extra):
  return subprocess.Popen(
    [
      sys.executable,
      '-m',
      'vmoe_jax.main',
      f'--workdir={workdir}',
      *SMALL,
      '--config.train.num_steps=2',
      *extra,
      f'--process_id={process_id}',
    ],
    cwd=REPO,
    env=cpu_env(num_devices),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )


def last_line(process, timeout=180):
  _, stderr = process.communicate(timeout=timeout)
  return process.returncode, stderr.strip().splitlines()[-1]


def test_unreachable_coordinator_is_a_one_line_error(tmp_path):
  address = f'localhost:{free_port()}'  # Nothing listens there.
  process = start_main(
    tmp_path, 1, 4, f'--coordinator_address={address}', '--num_processes=2',
    '--distributed_timeout=3',
  )  # fmt: skip
  code, line = last_line(process)
  assert code == 2
  assert line.startswith(f'error: the coordinator at {address} could not be reached within 3s')
  assert not os.listdir(tmp_path)


def test_processes_that_never_join_are_a_one_line_error(tmp_path):
  address = f'localhost:{free_port()}'
  process = start_main(
    tmp_path, 0, 4, f'--coordinator_address={address}', '--num_processes=2',
    '--distributed_timeout=3',
  )  # fmt: skip
  code, line = last_line(process)
  assert code == 2
  assert line.startswith(f'error: not all 2 processes joined the run at {address} within 3s')


def test_coordinator_port_in_use_is_a_one_line_error(tmp_path):
  with socket.socket() as taken:
    taken.bind(('', 0))
    taken.listen()
    address = f'localhost:{taken.getsockname()[1]}'
    process = start_main(
      tmp_path, 0, 4, f'--coordinator_address={address}', '--num_processes=2',
      '--distributed_timeout=20',
    )  # fmt: skip
    code, line = last_line(process)
  assert code == 2
  port = address.split(':')[1]
  assert line.startswith(f'error: process 0 cannot serve the coordinator on port {port} of this')
  assert line.endswith('pick a free port in --coordinator_address (the same on every process).')


def test_batch_that_does_not_split_over_the_processes_is_refused(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      'launch/local.py',
      '--num_processes=2',
      '--devices_per_process=4',
      '--',
      f'--workdir={tmp_path}',
      *SMALL,
      '--config.input.batch_size=63',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2
  assert (
    '[0] error: input.batch_size=63 does not split over 2 processes; use a multiple of 2 that '
    'is also a multiple of the device count (--config.input.batch_size).'
  ) in result.stdout.splitlines()


def test_processes_with_different_device_counts_are_refused(tmp_path):
  address = f'localhost:{free_port()}'
  flags = (f'--coordinator_address={address}', '--num_processes=2', '--distributed_timeout=120')
  processes = [start_main(tmp_path, 0, 4, *flags), start_main(tmp_path, 1, 2, *flags)]
  for process in processes:
    code, line = last_line(process)
    assert code == 2
    assert line == (
      'error: the 2 processes have different numbers of devices (process 0: 4, process 1: 2); '
      'give every process the same number (one process per host or per accelerator, '
      'XLA_FLAGS=--xla_force_host_platform_device_count=M on CPUs).'
    )


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  """A pre-emption notice to one process: all save the same step and stop, resumable."""
  import re
  import signal
  import time

  address = f'localhost:{free_port()}'
  flags = (
    f'--coordinator_address={address}',
    '--num_processes=2',
    '--distributed_timeout=120',
    '--config.train.num_steps=100000',
  )
  processes = [start_main(tmp_path, i, 4, *flags) for i in (0, 1)]
  deadline = time.time() + 300
  while not (tmp_path / metrics.METRICS_FILE).exists():
    assert all(p.poll() is None for p in processes) and time.time() < deadline
    time.sleep(0.2)
  processes[1].send_signal(signal.SIGTERM)
  steps = []
  for process in processes:
    code, line = last_line(process, timeout=300)
    assert code == 2, line
    match = re.match(r'error: stopped by SIGTERM at step (\d+); checkpoint \d+ saved', line)
    assert match, line
    steps.append(int(match.group(1)))
  assert steps[0] == steps[1]
  assert steps[0] in checkpointing.create_manager(str(tmp_path), create=False).all_steps()
