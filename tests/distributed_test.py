"""How a process decides to join a multi-process run, and the errors it gives (no JAX init)."""

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from vmoe_jax.errors import UserError
from vmoe_jax.runtime import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SLURM_STEP = {
  'SLURM_JOB_ID': '4242',
  'SLURM_STEP_NODELIST': 'gpu[001-002]',
  'SLURM_PROCID': '3',
  'SLURM_LOCALID': '3',
  'SLURM_NTASKS': '16',
}


def test_one_process_when_nothing_says_otherwise():
  settings = distributed.resolve(env={})
  assert settings == distributed.Settings()
  assert distributed.plan(settings, env={}) is None


def test_flags_take_precedence_over_the_environment():
  env = {
    'VMOE_COORDINATOR_ADDRESS': 'envhost:1000',
    'VMOE_NUM_PROCESSES': '4',
    'VMOE_PROCESS_ID': '3',
    'VMOE_DISTRIBUTED_TIMEOUT': '60',
  }
  from_env = distributed.resolve(env=env)
  assert from_env == distributed.Settings('auto', 'envhost:1000', 4, 3, 60)
  from_flags = distributed.resolve('auto', 'flaghost:2000', 2, 1, 30, env=env)
  assert from_flags == distributed.Settings('auto', 'flaghost:2000', 2, 1, 30)
  # Field by field: a flag for the id, the rest from the environment.
  mixed = distributed.resolve(process_id=0, env=env)
  assert (mixed.coordinator_address, mixed.num_processes, mixed.process_id) == (
    'envhost:1000',
    4,
    0,
  )
  assert distributed.plan(from_flags, env={}) == dict(
    coordinator_address='flaghost:2000',
    num_processes=2,
    process_id=1,
    initialization_timeout=30,
  )


def test_explicit_settings_must_be_complete():
  settings = distributed.resolve(coordinator_address='localhost:1234', num_processes=2, env={})
  with pytest.raises(UserError, match='--process_id missing, and no SLURM/TPU cluster'):
    distributed.plan(settings, env={})


@pytest.mark.parametrize(
  'kwargs, message',
  [
    (dict(mode='sometimes'), "--distributed='sometimes' is unknown; use one of auto, on, off."),
    (dict(coordinator_address='localhost'), "--coordinator_address='localhost' is not host:port"),
    (dict(coordinator_address='host:99999'), "--coordinator_address='host:99999' is not host:port"),
    (dict(num_processes=2, process_id=2), '--process_id=2 is outside 0..1 for --num_processes=2'),
    (dict(num_processes=0), '--num_processes=0; a run needs at least 1 process.'),
    (dict(timeout_seconds=0), '--distributed_timeout=0; give a number of seconds > 0.'),
  ],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
  with pytest.raises(UserError) as info:
    distributed.resolve(env={}, **kwargs)
  assert str(info.value).startswith(message)
  assert '\n' not in str(info.value)


def test_bad_environment_values():
  with pytest.raises(UserError, match="VMOE_NUM_PROCESSES='two' is not an integer"):
    distributed.resolve(env={'VMOE_NUM_PROCESSES': 'two'})


def test_slurm_steps_with_several_tasks_are_detected():
  assert distributed.detect_cluster(SLURM_STEP) == 'slurm'
  settings = distributed.resolve(env=SLURM_STEP)
  # JAX's own SLURM detection fills in the coordinator, count and id.
  assert distributed.plan(settings, env=SLURM_STEP) == dict(
    coordinator_address=None,
    num_processes=None,
    process_id=None,
    initialization_timeout=distributed.DEFAULT_TIMEOUT_SECONDS,
  )
  one_task = {**SLURM_STEP, 'SLURM_NTASKS': '1', 'SLURM_PROCID': '0'}
  assert distributed.detect_cluster(one_task) is None
  batch_shell = {k: v for k, v in SLURM_STEP.items() if k != 'SLURM_STEP_NODELIST'}
  assert distributed.detect_cluster(batch_shell) is None  # Not inside srun.
  # --distributed=off wins over the cluster.
  assert distributed.plan(distributed.resolve('off', env=SLURM_STEP), env=SLURM_STEP) is None


def test_tpu_and_mpi_clusters_are_detected():
  assert distributed.detect_cluster({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}) == 'tpu'
  assert distributed.detect_cluster({'TPU_WORKER_HOSTNAMES': 'w0'}) is None
  assert distributed.detect_cluster({'MEGASCALE_COORDINATOR_ADDRESS': 'w0:8080'}) == 'tpu'
  mpirun = {'OMPI_MCA_orte_hnp_uri': '1531576320.0;tcp://10.96.0.1:34911'}
  assert distributed.detect_cluster({**mpirun, 'OMPI_COMM_WORLD_SIZE': '8'}) == 'ompi'
  assert distributed.detect_cluster({**mpirun, 'OMPI_COMM_WORLD_SIZE': '1'}) is None


def test_on_always_joins_and_leaves_the_rest_to_jax():
  settings = distributed.resolve('on', env={})
  assert distributed.plan(settings, env={})['coordinator_address'] is None


def test_wait_for_coordinator():
  with socket.socket() as server:
    server.bind(('localhost', 0))
    server.listen()
    distributed.wait_for_coordinator(f'localhost:{server.getsockname()[1]}', 5)
    port = server.getsockname()[1]
  start = time.monotonic()
  with pytest.raises(UserError, match=f'the coordinator at localhost:{port} could not be reached'):
    distributed.wait_for_coordinator(f'localhost:{port}', 1)
  assert time.monotonic() - start < 10


def test_port_in_use_is_found_before_jax_tries_it():
  with socket.socket() as taken:
    taken.bind(('', 0))
    taken.listen()
    port = taken.getsockname()[1]
    with pytest.raises(UserError, match=f'cannot serve the coordinator on port {port} of this'):
      distributed.check_port_free(f'localhost:{port}')
  distributed.check_port_free(f'localhost:{port}')  # Free again.


def test_coordinator_that_comes_up_late_is_waited_for():
  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    port = probe.getsockname()[1]
  server = socket.socket()

  def listen_later():
    time.sleep(1.0)
    server.bind(('localhost', port))
    server.listen()

  thread = threading.Thread(target=listen_later)
  thread.start()
  try:
    distributed.wait_for_coordinator(f'localhost:{port}', 20)
  finally:
    thread.join()
    server.close()


def test_check_devices_accepts_one_process():
  distributed.check_devices()  # 8 local devices, one process.


def test_main_flag_errors_are_one_line(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'vmoe_jax.main',
      '--config=configs/digits_switch.py',
      f'--workdir={tmp_path}',
      '--coordinator_address=localhost:1234',
      '--num_processes=2',
      '--process_id=5',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
    'error: --process_id=5 is outside 0..1 for --num_processes=2; number the processes from 0.'
  )
  assert not os.listdir(tmp_path)
