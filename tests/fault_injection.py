"""`python -m vmoe_jax.main` with a fault injected, for the tests of crashes and full disks.

  VMOE_TEST_FAULT=enospc_at_checkpoint:30 python tests/fault_injection.py --config=... --workdir=...

The arguments are those of `vmoe_jax.main`; `VMOE_TEST_FAULT` names the fault:

  enospc_at_checkpoint:N  writing checkpoint N fails with ENOSPC ('No space left on
                          device') in orbax's background thread, after part of it
                          is on disk, as a full disk does;
  kill_at_step:N          the process kills itself (SIGKILL) once step N is logged;
  pause_at_step:N:PATH    after step N it prints 'fault: paused at N' to stderr and
                          waits until the file PATH exists (a test changes the
                          world meanwhile: fills the disk);
  slow_save:SECONDS       every checkpoint save prints 'fault: saving N' to stderr,
                          then sleeps SECONDS before writing (a test signals then).

Nothing here is imported by the library; tests/ is not a package.
"""

import errno
import os
import re
import signal
import sys
import time


def _enospc_at_checkpoint(step: int) -> None:
  from orbax.checkpoint._src.handlers import json_checkpoint_handler

  handler = json_checkpoint_handler.JsonCheckpointHandler
  original = handler._save_fn

  async def save_fn(self, x, directory):
    match = re.search(r'/(\d+)(\.orbax-checkpoint-tmp[^/]*)?/', str(directory) + '/')
    if match and int(match.group(1)) == step:
      (directory / 'partial').write_bytes(b'\0' * 4096)
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / self._filename))
    return await original(self, x, directory)

  handler._save_fn = save_fn


def _kill_at_step(step: int) -> None:
  from vmoe_jax import train

  original = train.Loop.run_step

  def run_step(self, batch, stop):
    original(self, batch, stop)
    if self.step == step:
      os.kill(os.getpid(), signal.SIGKILL)

  train.Loop.run_step = run_step


def _pause_at_step(value: str) -> None:
  from vmoe_jax import train

  step, _, path = value.partition(':')
  original = train.Loop.run_step

  def run_step(self, batch, stop):
    original(self, batch, stop)
    if self.step == int(step):
      print(f'fault: paused at {step}', file=sys.stderr, flush=True)
      while not os.path.exists(path):
        time.sleep(0.05)

  train.Loop.run_step = run_step


def _slow_save(seconds: float) -> None:
  from vmoe_jax.storage import checkpointing

  original = checkpointing.save

  def save(manager, step, state, meta):
    print(f'fault: saving {step}', file=sys.stderr, flush=True)
    time.sleep(seconds)
    return original(manager, step, state, meta)

  checkpointing.save = save


FAULTS = {
  'enospc_at_checkpoint': lambda v: _enospc_at_checkpoint(int(v)),
  'kill_at_step': lambda v: _kill_at_step(int(v)),
  'pause_at_step': _pause_at_step,
  'slow_save': lambda v: _slow_save(float(v)),
}


if __name__ == '__main__':
  name, _, value = os.environ['VMOE_TEST_FAULT'].partition(':')
  FAULTS[name](value)
  from absl import app

  from vmoe_jax import main

  app.run(main.main, flags_parser=main._parse_flags)
