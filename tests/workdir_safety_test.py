"""What a workdir survives: a second run on it, a crash while extending, a full disk, Ctrl-C twice.

Every test runs `python -m vmoe_jax.main` (or `tests/fault_injection.py`, the
same command with a fault injected) as a subprocess with real signals.
"""

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from checkpoint_surgery import digests

from vmoe_jax.errors import UserError
from vmoe_jax.storage import metrics
from vmoe_jax.storage import workdirs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULT_INJECTION = os.path.join(REPO, 'tests', 'fault_injection.py')

# A small digits Switch-ViT that trains in seconds on 8 fake devices.
SMALL = [
  '--config=configs/digits_switch.py',
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


def command(workdir, steps, *extra, fault=None):
  program = [FAULT_INJECTION] if fault else ['-m', 'vmoe_jax.main']
  return [
    sys.executable,
    *program,
    *SMALL,
    f'--workdir={workdir}',
    f'--config.train.num_steps={steps}',
    *extra,
  ]


def environment(fault=None):
  env = {**os.environ, 'PYTHONPATH': REPO}
  if fault:
    env['VMOE_TEST_FAULT'] = fault
  return env


def run(workdir, steps, *extra, fault=None, check=True):
  result = subprocess.run(
    command(workdir, steps, *extra, fault=fault),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=environment(fault),
  )
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


_LOG_LINE = re.compile(r'[IW]\d{4} \d\d:\d\d:\d\d')  # absl's info and warning lines.


def error_lines(result):
  """The stderr lines other than logs (absl's info and warning lines: progress, and
  notices such as orbax's on slow saves, which a loaded machine adds)."""
  return [line for line in result.stderr.strip().splitlines() if not _LOG_LINE.match(line)]


def steps_logged(workdir):
  return [r['step'] for r in metrics.read_metrics(str(workdir)) if 'train/loss' in r]


def start(workdir, steps, *extra, fault=None):
  """A run in the background; its stderr lines arrive in `process.lines` (a queue)."""
  process = subprocess.Popen(
    command(workdir, steps, *extra, fault=fault),
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    env=environment(fault),
  )
  process.lines = queue.Queue()
  process.stderr_lines = []

  def read():
    for line in process.stderr:
      process.stderr_lines.append(line)
      process.lines.put(line)

  threading.Thread(target=read, daemon=True).start()
  return process


def finish(process, timeout=300) -> str:
  """Waits for a `start`ed run (killing it if it hangs); its whole stderr."""
  try:
    process.wait(timeout=timeout)
  finally:
    if process.poll() is None:
      process.kill()
  time.sleep(0.5)  # The reader thread takes the last lines.
  return ''.join(process.stderr_lines)


def wait_for(condition, process, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert process.poll() is None, ''.join(process.stderr_lines)[-3000:]
    assert time.time() < deadline
    time.sleep(0.1)


def wait_for_line(process, text, timeout=300):
  deadline = time.time() + timeout
  while True:
    try:
      line = process.lines.get(timeout=max(0.1, deadline - time.time()))
    except queue.Empty:
      pytest.fail(f'no line with {text!r}: {"".join(process.stderr_lines)[-3000:]}')
    if text in line:
      return line


# --------------------------------------------------------------------------- one run per workdir


def test_the_workdir_lock_names_its_holder_and_is_released(tmp_path):
  workdir = str(tmp_path / 'run')
  with workdirs.lock(workdir):
    assert os.path.exists(os.path.join(workdir, workdirs.LOCK_FILE))
    with pytest.raises(UserError) as info:
      with workdirs.lock(workdir):
        pass
    assert re.fullmatch(
      f'{re.escape(workdir)} is in use by another run \\(pid {os.getpid()} on host '
      f'{re.escape(socket.gethostname())} since [0-9T:-]+\\); wait for it to finish or stop it, '
      'or pass another --workdir.',
      str(info.value),
    ), str(info.value)
  assert not os.path.exists(workdir)  # Created by the lock, left empty: removed.
  os.makedirs(workdir)
  with open(os.path.join(workdir, workdirs.LOCK_FILE), 'w') as f:
    f.write('999999 elsewhere 2000-01-01T00:00:00\n')  # Left by a run killed with -9.
  with workdirs.lock(workdir):
    pass
  assert os.listdir(workdir) == []


def test_a_second_run_on_a_workdir_is_refused_and_touches_nothing(tmp_path):
  first = start(tmp_path, 100_000, '--config.train.checkpoint_every=20')
  try:
    wait_for(lambda: 20 in workdirs.checkpoint_steps(str(tmp_path)), first)
    first.send_signal(signal.SIGSTOP)  # Holds the lock, writes nothing meanwhile.
    before = digests(tmp_path)
    # Another seed, as a sweep that reuses a workdir by mistake would start it.
    second = run(tmp_path, 40, '--config.seed=1', check=False)
    assert second.returncode == 2, second.stderr[-3000:]
    assert 'Traceback' not in second.stderr
    [line] = error_lines(second)
    assert re.fullmatch(
      f'error: {re.escape(str(tmp_path))} is in use by another run \\(pid {first.pid} on host '
      f'{re.escape(socket.gethostname())} since [0-9T:-]+\\); wait for it to finish or stop '
      'it, or pass another --workdir.',
      line,
    ), line
    assert digests(tmp_path) == before  # The first run's files, byte for byte.
  finally:
    first.send_signal(signal.SIGCONT)
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=300)
  assert first.returncode == 2  # Stopped by SIGTERM with a checkpoint, as usual.
  assert not os.path.exists(tmp_path / workdirs.LOCK_FILE)
  step = max(workdirs.checkpoint_steps(str(tmp_path)))
  resumed = run(tmp_path, step + 10)  # The lock is free again.
  assert f'from step {step}' in resumed.stderr
  logged = steps_logged(tmp_path)
  assert logged == sorted(set(logged))


# --------------------------------------------------------------------------- extending a run


def test_a_crash_while_extending_a_finished_run_is_resumed(tmp_path):
  run(tmp_path, 20, '--config.train.checkpoint_every=10')
  config = (tmp_path / 'config.json').read_text()
  # Continued for longer, killed at step 25, before its first new checkpoint (30).
  killed = run(
    tmp_path, 40, '--config.train.checkpoint_every=10', fault='kill_at_step:25', check=False
  )
  assert killed.returncode == -signal.SIGKILL
  assert workdirs.checkpoint_steps(str(tmp_path)) == [10, 20]
  assert (tmp_path / 'config.json').read_text() == config  # Not yet backed by a checkpoint.
  assert 25 in steps_logged(tmp_path)
  again = run(tmp_path, 40, '--config.train.checkpoint_every=10')
  assert 'nothing to do' not in again.stderr
  assert 'from step 20' in again.stderr
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['step'] == 40
  assert json.loads((tmp_path / 'config.json').read_text())['train']['num_steps'] == 40
  assert steps_logged(tmp_path) == list(range(5, 45, 5))  # Unique, increasing, no gap.
  rerun = run(tmp_path, 40, '--config.train.checkpoint_every=10')
  assert 'already holds a run finished at step 40; nothing to do' in rerun.stderr


# --------------------------------------------------------------------------- a full disk


def test_a_full_disk_while_saving_is_one_line_and_the_run_resumes(tmp_path):
  extra = ('--config.train.checkpoint_every=10',)
  result = run(tmp_path, 30, *extra, fault='enospc_at_checkpoint:20', check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  assert error_lines(result) == [
    f'error: no space left on device while saving checkpoint 20 to {tmp_path}/checkpoints; '
    'free space and run the same command to resume.'
  ]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['10']  # No orbax temp folder.
  assert not [n for n in os.listdir(tmp_path) if n.endswith('.tmp') or n == workdirs.LOCK_FILE]
  again = run(tmp_path, 30, *extra)
  assert 'from step 10' in again.stderr
  assert json.loads((tmp_path / 'results.json').read_text())['step'] == 30
  assert steps_logged(tmp_path) == list(range(5, 35, 5))


def test_the_writability_check_writes_bytes(tmp_path, monkeypatch):
  import errno
  import io
  import tempfile

  class FullDisk(io.BytesIO):  # What a full disk does: a 0-byte file passes, bytes do not.
    def write(self, data):
      if data:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      return 0

  monkeypatch.setattr(tempfile, 'TemporaryFile', lambda **kwargs: FullDisk())
  with pytest.raises(UserError) as info:
    workdirs.check_workdir_writable(str(tmp_path))
  assert str(info.value) == (
    f'no space left on device while writing to {tmp_path}; free space and try again.'
  )


def estimated_checkpoint_bytes(workdir) -> int:
  """The run's own estimate of one checkpoint (`checkpointing.estimate_bytes`)."""
  from vmoe_jax import inference
  from vmoe_jax import train
  from vmoe_jax.storage import checkpointing

  return checkpointing.estimate_bytes(
    train.setup(inference.run_config(str(workdir)), '').abstract_state
  )


def _tmpfs(path, size):
  os.makedirs(path, exist_ok=True)
  try:
    mounted = subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
      capture_output=True,
      timeout=30,
    )
  except (OSError, subprocess.TimeoutExpired):
    mounted = None
  if mounted is None or mounted.returncode:
    pytest.skip('cannot mount a tmpfs here (needs root); the injected ENOSPC test covers this')


def test_a_nearly_full_disk_is_refused_before_saving_and_the_run_resumes(tmp_path):
  disk = tmp_path / 'disk'
  _tmpfs(disk, '16m')
  try:
    workdir = disk / 'run'
    go = tmp_path / 'go'  # Outside the small disk.
    extra = ('--config.train.checkpoint_every=10',)
    run(workdir, 10, *extra)
    # The run saves at 20, pauses at 25; then the disk is filled to half of
    # the run's own estimate of a checkpoint (how many bytes orbax writes
    # varies from save to save, the check before each save must not), and the
    # save at 30 is refused before anything of it is written.
    process = start(workdir, 30, *extra, fault=f'pause_at_step:25:{go}')
    try:
      wait_for_line(process, 'fault: paused at 25')
      wait_for(lambda: workdirs.checkpoint_steps(str(workdir)) == [10, 20], process)
      needed = estimated_checkpoint_bytes(workdir)
      with open(disk / 'filler', 'wb') as f:
        f.write(b'\0' * (workdirs.free_bytes(str(disk)) - needed // 2))
      go.touch()
    finally:
      stderr = finish(process)
    assert process.returncode == 2, stderr[-3000:]
    assert 'Traceback' not in stderr
    [line] = [l for l in stderr.strip().splitlines() if l.startswith('error')]
    assert line.startswith(
      f'error: no space left on device while saving checkpoint 30 to {workdir}/checkpoints ('
    ), line
    assert 'free, a checkpoint needs about' in line
    assert line.endswith('; free space and run the same command to resume.')
    assert workdirs.checkpoint_steps(str(workdir)) == [10, 20]
    assert not [n for n in os.listdir(workdir / 'checkpoints') if not n.isdigit()]
    os.remove(disk / 'filler')
    again = run(workdir, 30, *extra)
    assert 'from step 20' in again.stderr
    assert json.loads((workdir / 'results.json').read_text())['step'] == 30
  finally:
    subprocess.run(['umount', '-l', str(disk)], capture_output=True, timeout=30)


# --------------------------------------------------------------------------- Ctrl-C twice


def test_a_second_ctrl_c_during_the_save_does_not_abort_it(tmp_path):
  process = start(tmp_path, 100_000, '--config.train.checkpoint_every=0', fault='slow_save:3')
  try:
    wait_for(lambda: (tmp_path / metrics.METRICS_FILE).exists(), process)
    process.send_signal(signal.SIGINT)
    wait_for_line(process, 'fault: saving')  # In the save: it sleeps 3 s, then writes.
    process.send_signal(signal.SIGINT)
  finally:
    stderr = finish(process)
  assert process.returncode == 2, stderr[-3000:]
  assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr
  assert 'SIGINT received again: saving, please wait' in stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith('error: stopped by SIGINT at step '), last
  step = int(last.split('at step ')[1].split(';')[0])
  assert workdirs.checkpoint_steps(str(tmp_path)) == [step]
  resumed = run(tmp_path, step + 5)
  assert f'from step {step}' in resumed.stderr
