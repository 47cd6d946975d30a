"""Runs with their output in a log: the progress echoed, and why a run failed."""

import sys

from vmoe_jax.tools import run_logs


def test_failure_line_is_the_last_error_of_this_attempt(tmp_path):
  log = tmp_path / 'train.log'
  log.write_text('error: an old attempt failed\n')
  start = log.stat().st_size
  with open(log, 'a') as f:
    f.write('I1123 12:00:00.0 1 main.py:1] Mesh ...\nerror: first\n[0] error: second\nbye\n')
  assert run_logs.failure_line(str(log), start) == '[0] error: second'
  with open(log, 'a') as f:
    start = f.tell()
    f.write('Traceback (most recent call last):\n  ...\nKeyError: 3\n--------\nFor simplicity\n')
  assert run_logs.failure_line(str(log), start) == 'KeyError: 3'  # No error line: the exception.
  with open(log, 'a') as f:
    start = f.tell()
    f.write('Killed\n\n')
  assert run_logs.failure_line(str(log), start) == 'Killed'  # Else the last line.
  assert run_logs.failure_line(str(tmp_path / 'missing.log')) == ''


def test_run_logged_appends_the_output_and_echoes_progress(tmp_path, capsys):
  log = tmp_path / 'train.log'
  log.write_text('before\n')
  script = "print('I1123 12:00:00.0 1 train.py:1] step 5/10  loss 1.0'); print('noise'); exit(3)"
  code = run_logs.run_logged([sys.executable, '-c', script], str(log), '[run]', str(tmp_path))
  assert code == 3
  assert log.read_text().splitlines() == [
    'before',
    'I1123 12:00:00.0 1 train.py:1] step 5/10  loss 1.0',
    'noise',
  ]
  assert capsys.readouterr().out == '[run] step 5/10  loss 1.0\n'
