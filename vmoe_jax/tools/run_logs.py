"""Training commands run as subprocesses with their output in a log, for the launch scripts.

`run_logged` runs a command (a `python -m vmoe_jax.main ...` run) with its
output appended to a log file, echoing its progress lines; `failure_line`
reads back why a run failed. `launch/sweep.py`, `launch/fashion_table.py`
and `launch/transfer_table.py` share them.
"""

from __future__ import annotations

import re
import subprocess

_EXCEPTION_LINE = re.compile(r'[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b')


def failure_line(log_path: str, start: int = 0) -> str:
  """Why a run failed, from what its log got after byte `start` (the log before this attempt).

  The last `error:` line (a problem the user can fix); else the last line of
  a traceback that names an exception ('TypeError: ...'); else the last line.
  """
  try:
    with open(log_path, 'rb') as f:
      f.seek(start)
      lines = f.read().decode('utf-8', errors='replace').splitlines()
  except OSError:
    return ''
  lines = [line.strip() for line in lines if line.strip()]
  errors = [line for line in lines if line.split('] ', 1)[-1].startswith('error: ')]
  exceptions = [line for line in lines if _EXCEPTION_LINE.match(line)]
  return (errors or exceptions or lines or [''])[-1]


def run_logged(cmd: list[str], log_path: str, prefix: str, cwd: str | None = None) -> int:
  """Runs `cmd` (in `cwd`) with its output in `log_path`, echoing its progress lines.

  Returns the exit status. Progress lines are the trainer's 'step ...' and
  'Final: ...' lines, printed after `prefix`.
  """
  with open(log_path, 'a') as log:
    proc = subprocess.Popen(
      cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd
    )
    for line in proc.stdout:
      log.write(line)
      message = line.split('] ', 1)[-1].strip()  # Without absl's 'I1123 12:00:00 ... file:N] '.
      if message.startswith('step ') or message.startswith('Final:'):
        print(f'{prefix} {message}', flush=True)
    return proc.wait()
