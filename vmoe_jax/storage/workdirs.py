"""A run's workdir: who may use it, whether a run may start there, and its JSON files.

`lock` holds an exclusive lock on `workdir/.lock` for the life of a run, so
that a second run on the same workdir is refused in one line instead of
mixing its files with the first's. `check_workdir` decides, before a run
writes anything, whether it repeats a finished run (its results are
returned), continues one for longer, or starts or resumes; a run is finished
when its newest checkpoint is the step of its `results.json` (a fact of the
checkpoints, not of `config.json`). `check_config` refuses to resume
checkpoints of another model. The JSON files beside the checkpoints
(`workdir/config.json`, `dataset.json`, `results.json`) are written
atomically and read as one-line UserErrors when missing or unreadable.
`check_free_space` and `disk_full_error` turn a full disk into one line
(see `remove_partial_files` for what is cleaned up). The checkpoints
themselves are in `vmoe_jax.storage.checkpointing`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from typing import Any

import jax
import numpy as np

from vmoe_jax.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = 'checkpoints'
LOCK_FILE = '.lock'
# Left by a write that did not finish: orbax's unfinalised checkpoints and our atomic writes.
PARTIAL_PATTERNS = (os.path.join(CHECKPOINT_DIR, '*.orbax-checkpoint-tmp*'), '*.tmp')
CONFIG_FILE = 'config.json'
DATASET_FILE = 'dataset.json'
RESULTS_FILE = 'results.json'
# Settings whose change continues a finished run instead of repeating it.
LENGTH_KEYS = ('train.num_steps', 'train.num_epochs')
# Settings of how a run is carried out, not of what it computes: a finished
# run continued for longer may change them too.
OPERATIONAL_KEYS = (
  'mesh.expert',
  'train.log_every',
  'train.eval_every',
  'train.checkpoint_every',
  'train.keep_checkpoints',
  'train.on_corrupt',
  'profile.start_step',
  'profile.num_steps',
)
# Settings of how to resume: a finished run rerun with another value is the same run.
RESUME_KEYS = ('train.on_corrupt',)


# --------------------------------------------------------------------------- the lock


def _check_not_a_file(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir} is a file, not a directory; pass a directory.')


def _cannot_write(workdir: str, error: OSError) -> UserError:
  if is_disk_full(error):
    return disk_full_error(f'writing to {workdir}', resume=False)
  return UserError(
    f'--workdir={workdir} cannot be written ({type(error).__name__}: {error.strerror or error}); '
    'pass a directory you can write to.'
  )


def _holder(path: str) -> str:
  """'pid 123 on host h since ...' from the lock file (its holder writes it just after locking)."""
  for _ in range(10):
    try:
      with open(path) as f:
        fields = f.read().split()
    except OSError:
      fields = []
    if len(fields) >= 2:
      since = f' since {fields[2]}' if len(fields) > 2 else ''
      return f'pid {fields[0]} on host {fields[1]}{since}'
    time.sleep(0.1)
  return 'a process that has not said which'


# flock's errors on a filesystem that does not support it.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)


def _open_locked(path: str) -> int | None:
  """An fd of `path` holding its exclusive flock.

  None when the file cannot be created (a read-only workdir) or the
  filesystem has no locks (a warning).
  """
  while True:
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
        raise
      try:  # A read-only workdir: lock the file if a run left one, else nothing to lock.
        fd = os.open(path, os.O_RDONLY)
      except FileNotFoundError:
        return None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise
    except OSError as e:  # A filesystem without locks (some network or FUSE mounts).
      os.close(fd)
      if e.errno not in _NO_LOCKS:
        raise
      log.warning('%s cannot be locked (%s); two runs on it would not be refused.', path, e)
      return None
    # The holder before us may have unlinked the file between our open and our
    # flock: then we hold a lock on a file nobody else sees, so try again.
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      return fd
    os.close(fd)


def _write_holder(fd: int) -> None:
  started = time.strftime('%Y-%m-%dT%H:%M:%S')
  with contextlib.suppress(OSError):  # Read-only (a finished run rerun), or a full disk.
    os.ftruncate(fd, 0)
    os.write(fd, f'{os.getpid()} {socket.gethostname()} {started}\n'.encode())


@contextlib.contextmanager
def lock(workdir: str):
  """Holds an exclusive lock on `workdir` (created if needed) for the life of a run.

  `workdir/.lock` is flock'ed and holds 'PID HOST START' of the holder. The
  OS releases the lock when the process ends however it ends (`kill -9`
  included), so a lock is never left stuck; the file is removed when the
  block exits. A second run on the same workdir gets a one-line UserError
  naming the holder's PID and host, having written nothing. In a
  multi-process run process 0 takes the lock (the workdir is shared) and
  every process learns whether it got it. A workdir that cannot be written
  and holds no lock file is not locked (nothing can be written there; a run
  that would write is refused by `check_workdir`), nor is one on a
  filesystem without flock (a warning). The workdir is removed again if this
  run created it and left it empty.
  """
  _check_not_a_file(workdir)
  created = not os.path.exists(workdir)
  path = os.path.join(workdir, LOCK_FILE)
  fd, busy, error = None, False, None
  if jax.process_index() == 0:
    try:
      os.makedirs(workdir, exist_ok=True)
      fd = _open_locked(path)
      if fd is not None:
        _write_holder(fd)
    except BlockingIOError:
      busy = True
    except OSError as e:
      error = _cannot_write(workdir, e)
  if jax.process_count() > 1:  # Every process stops if process 0 could not lock.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    failed = multihost_utils.broadcast_one_to_all(np.int32(busy or error is not None))
    if failed and jax.process_index() > 0:
      error = UserError(f'process 0 could not lock {workdir}; see its error line.')
  if error is not None:
    if fd is not None:
      os.close(fd)
    raise error
  if busy:
    raise UserError(
      f'{workdir} is in use by another run ({_holder(path)}); wait for it to finish or stop it, '
      'or pass another --workdir.'
    )
  try:
    yield
  finally:
    if fd is not None:
      with contextlib.suppress(OSError):
        os.unlink(path)  # Before unlocking: a run that opened it meanwhile will retry.
      os.close(fd)
    if created and jax.process_index() == 0:
      with contextlib.suppress(OSError):
        os.rmdir(workdir)  # Only if empty.


# --------------------------------------------------------------------------- a full disk


def is_disk_full(error: BaseException | None) -> bool:
  """Whether `error` (or an error it was raised from) says the disk is full."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(error)
    if 'No space left on device' in text or "os_error_code='28'" in text:
      return True  # TensorStore's errors, as orbax re-raises them.
    error = error.__cause__ or error.__context__
  return False


def disk_full_error(doing: str, resume: bool = True) -> UserError:
  fix = 'free space and run the same command to resume' if resume else 'free space and try again'
  return UserError(f'no space left on device while {doing}; {fix}.')


def remove_partial_files(workdir: str) -> list[str]:
  """Removes what unfinished writes left in `workdir` (`PARTIAL_PATTERNS`); the paths removed.

  Only for the holder of the workdir's lock (process 0): the unfinalised
  checkpoint directories of orbax and the `*.tmp` files of atomic writes
  are then this run's. Finished checkpoints are not touched.
  """
  removed = []
  if jax.process_index() != 0:
    return removed
  for pattern in PARTIAL_PATTERNS:
    for path in glob.glob(os.path.join(glob.escape(workdir), pattern)):
      for _ in range(5):  # A writer thread may still be closing files in it.
        if os.path.isdir(path):
          shutil.rmtree(path, ignore_errors=True)
        else:
          with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        if not os.path.lexists(path):
          removed.append(path)
          break
        time.sleep(0.2)
  return removed


def free_bytes(path: str) -> int:
  """Bytes free to this user on the filesystem of `path` (or of its nearest parent)."""
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def check_free_space(workdir: str, needed: int, doing: str, resume: bool = True) -> None:
  """A one-line UserError when `workdir`'s filesystem has less than `needed` bytes free."""
  free = free_bytes(workdir)
  if free < needed:
    raise disk_full_error(
      f'{doing} ({_megabytes(free)} free, a checkpoint needs about {_megabytes(needed)})', resume
    )


def _megabytes(count: int) -> str:
  return f'{count / 2**20:.1f} MiB' if count < 2**30 else f'{count / 2**30:.2f} GiB'


# --------------------------------------------------------------------------- starting a run


def check_workdir(workdir: str, config_json: dict) -> dict | None:
  """Before a run touches `workdir`: the saved results when it would only repeat them.

  A finished run (results.json and a checkpoint at its step) rerun with the
  same config (`RESUME_KEYS` aside) returns its results and writes nothing;
  with another config it is a UserError naming what differs, unless the
  training length (`LENGTH_KEYS`) changed, and nothing else but how the run
  is carried out (`OPERATIONAL_KEYS`): the run then continues. Otherwise
  `workdir` must be a directory that can be created and written (UserError),
  and None says go ahead.
  """
  _check_not_a_file(workdir)
  results = finished_results(workdir)
  if results is not None:
    saved = read_config(workdir)
    diffs = [d for d in _dict_diff(saved, config_json, '') if d[0] not in RESUME_KEYS]
    if not diffs:
      log.info(
        '%s already holds a run finished at step %s; nothing to do.', workdir, results['step']
      )
      return results
    _refuse_another_model(workdir, diffs)
    names = [name for name, _, _ in diffs]
    longer = any(name in LENGTH_KEYS for name in names)
    if not longer or any(name not in LENGTH_KEYS + OPERATIONAL_KEYS for name in names):
      raise UserError(
        f'{workdir} already holds a finished run; it differs from this command in '
        f'{_format_diffs(diffs)}; use a new --workdir.'
      )
    log.info('Continuing the finished run in %s: %s.', workdir, _format_diffs(diffs))
  check_workdir_writable(workdir)
  return None


# Bytes the writability check writes (and syncs): a full disk refuses them, a 0-byte file not.
_WRITE_TEST_BYTES = 64 * 1024


def check_workdir_writable(workdir: str) -> None:
  """Creates `workdir` if needed and checks that bytes can be written there (UserError)."""
  _check_not_a_file(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir, prefix='.write_test') as f:
      f.write(b'\0' * _WRITE_TEST_BYTES)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    raise _cannot_write(workdir, e) from None


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the finished checkpoints in `workdir/checkpoints`, ascending."""
  try:
    names = os.listdir(os.path.join(workdir, CHECKPOINT_DIR))
  except OSError:
    return []
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def finished_results(workdir: str) -> dict | None:
  """results.json of `workdir` if the newest checkpoint is at its step, else None.

  A run extended for longer and interrupted before its first new checkpoint
  is still finished (at the old step); one interrupted after it is not (its
  newest checkpoint is past the results), nor is one whose results were not
  written after its last checkpoint.
  """
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    return None
  results = read_json(workdir, RESULTS_FILE)
  step = results.get('step')
  steps = checkpoint_steps(workdir)
  if not isinstance(step, int) or not steps or steps[-1] != step:
    return None
  return results


def check_config(workdir: str, config_json: dict, has_checkpoint: bool) -> None:
  """Refuses to resume a workdir whose checkpoints belong to another model config.

  Other changed settings are logged (one line) and the run resumes with them.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not (has_checkpoint and os.path.exists(path)):
    return
  diffs = _dict_diff(read_json(workdir, CONFIG_FILE), config_json, '')
  _refuse_another_model(workdir, diffs)
  if diffs:
    log.info('Resuming %s with changed settings: %s.', workdir, _format_diffs(diffs))


def _refuse_another_model(workdir: str, diffs: list[tuple[str, Any, Any]]) -> None:
  model = [d for d in diffs if d[0].split('.')[0] == 'model']
  if model:
    raise UserError(
      f'{workdir} holds checkpoints of another model ({_format_diffs(model, 3)}); use a new '
      '--workdir or the same model config.'
    )


def _dict_diff(old: dict, new: dict, prefix: str) -> list[tuple[str, Any, Any]]:
  """(dotted name, old value, new value) of every leaf that differs."""
  diffs = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    name = f'{prefix}.{key}' if prefix else key
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += _dict_diff(a, b, name)
    elif a != b and not _same_count(a, b):
      diffs.append((name, a, b))
  return diffs


def _same_count(a: Any, b: Any) -> bool:
  """1 and '1': a key saved as an int before it became a string (model.stem_extra_convs)."""
  pair = sorted((a, b), key=lambda x: isinstance(x, str))
  return isinstance(pair[0], int) and isinstance(pair[1], str) and str(pair[0]) == pair[1]


def _format_diffs(diffs: list[tuple[str, Any, Any]], limit: int = 6) -> str:
  shown = ', '.join(f'{name} (was {a!r}, now {b!r})' for name, a, b in diffs[:limit])
  more = len(diffs) - limit
  return shown + (f' and {more} more' if more > 0 else '')


# --------------------------------------------------------------------------- JSON files


def write_json(path: str, value: Any, sort_keys: bool = True) -> None:
  """Writes `value` to `path` atomically: a reader sees the old file or the new one.

  A write that fails (a full disk) leaves no `.tmp` file behind.
  """
  write_text(path, json.dumps(value, indent=2, sort_keys=sort_keys))


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (see `write_json`)."""
  tmp = path + '.tmp'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def read_json(workdir: str, name: str) -> dict:
  """`workdir/name` (config.json, dataset.json, results.json), or a one-line UserError."""
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    raise UserError(f'{path} does not exist; point --workdir at the directory of a training run.')
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(
      f'{path} cannot be read ({type(e).__name__}: {e}); restore it or use a new --workdir.'
    ) from None


def write_config(workdir: str, config_json: dict) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, CONFIG_FILE), config_json)


def read_config(workdir: str) -> dict:
  return read_json(workdir, CONFIG_FILE)


def write_dataset_info(workdir: str, dataset) -> None:
  """What a reader of the workdir needs to rebuild the model: classes, image shape."""
  if jax.process_index() != 0:
    return
  info = {
    'name': dataset.name,
    'num_classes': dataset.num_classes,
    'image_shape': list(dataset.image_shape),
    'num_train': dataset.num_train,
    'num_test': dataset.num_test,
  }
  write_json(os.path.join(workdir, DATASET_FILE), info)


def read_dataset_info(workdir: str) -> dict:
  return read_json(workdir, DATASET_FILE)
