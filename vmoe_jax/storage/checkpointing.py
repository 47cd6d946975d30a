"""Orbax checkpoints in `workdir/checkpoints`: save, verify, resume, restore elsewhere.

A checkpoint holds two items:
  'state': the TrainState (params, optimizer state, step, rng), saved from
    every process, each writing its shards (async where orbax allows);
  'meta': JSON, the input position (the step: training batches are a pure
    function of it, see `input_pipeline`), what the run was, and a checksum
    of every array of the state ('checksums', keyed by the array's
    '/'-joined path, e.g. 'params/block_01/moe/wi').
The config of the run is kept beside them in `workdir/config.json`.

Every restore verifies (`vmoe_jax.storage.integrity`): `restore`
(resume), `restore_params` and `load_params` (inference, evaluation,
transfer from another run) recompute the checksums of the arrays they read
and refuse, as a one-line `CorruptCheckpointError` naming the checkpoint and
the array, an array that does not match or holds non-finite values, and a
checkpoint whose bytes cannot be decoded. Checkpoints written before
checksums existed restore with a warning that they cannot be verified.
`save` refuses to write a state with non-finite values (it would not
restore). The workdir checks and JSON files beside the checkpoints are in
`vmoe_jax.storage.workdirs`.


Restoring takes an abstract target (shapes, dtypes and the *current*
shardings), so a checkpoint written on one mesh restores on another. A
checkpoint that cannot be read, or that was saved for another model, is a
`UserError` and is never overwritten; `restore_for_resume` documents what
`train.on_corrupt='previous'` does with one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from vmoe_jax.errors import UserError
from vmoe_jax.storage import workdirs
from vmoe_jax.storage.integrity import CHECKSUM_VERSION
from vmoe_jax.storage.integrity import CHECKSUM_VERSION_KEY
from vmoe_jax.storage.integrity import CHECKSUMS_KEY
from vmoe_jax.storage.integrity import CorruptCheckpointError
from vmoe_jax.storage.integrity import array_checksums
from vmoe_jax.storage.integrity import first_and_more
from vmoe_jax.storage.integrity import itemsize
from vmoe_jax.storage.integrity import path_names
from vmoe_jax.storage.integrity import verify
from vmoe_jax.storage.workdirs import CHECKPOINT_DIR

log = logging.getLogger(__name__)

CORRUPT_SUFFIX = '.corrupt'
ON_CORRUPT = ('fail', 'previous')

_RESUME_FIX = (
  'move it away to resume from an earlier one, or set --config.train.on_corrupt=previous'
)


# --------------------------------------------------------------------------- managers


class _DropReadOnlyNotice(logging.Filter):
  """Orbax says 'Given directory is read only' for every read-only manager."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Given directory is read only')


def create_manager(
  workdir: str, keep: int = 3, async_save: bool = True, create: bool = True
) -> ocp.CheckpointManager:
  """The manager of `workdir/checkpoints`; `create=False` for read-only use."""
  directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
  if not create and not os.path.isdir(directory):
    raise UserError(f'{directory} does not exist; point --workdir at a training run.')
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep if keep > 0 and create else None,
    enable_async_checkpointing=async_save,
    create=create,
    read_only=not create,
    save_interval_steps=1 if create else 0,
  )
  notice = _DropReadOnlyNotice()
  logging.getLogger('absl').addFilter(notice)
  try:
    return ocp.CheckpointManager(
      directory,
      options=options,
      item_handlers={
        # Read-only managers (inference) restore subtrees: the PyTree handler
        # reads what the standard one wrote and supports partial restores.
        'state': ocp.StandardCheckpointHandler() if create else ocp.PyTreeCheckpointHandler(),
        'meta': ocp.JsonCheckpointHandler(),
      },
    )
  finally:
    logging.getLogger('absl').removeFilter(notice)


class _DropDiskFullErrors(logging.Filter):
  """Drops orbax's error logs of a full disk (the run says it in one line instead).

  Orbax logs the failure with a traceback in each of its background threads
  (and the writes still in flight then fail too): once one of its errors says
  the disk is full, its later errors are dropped as well.
  """

  def __init__(self):
    super().__init__()
    self.seen = False

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    error = record.exc_info[1] if record.exc_info else None
    disk_full = workdirs.is_disk_full(error) or workdirs.is_disk_full(
      Exception(record.getMessage())
    )
    if record.name == 'asyncio':  # Orbax's futures of the failed writes, collected later.
      return not disk_full
    if f'{os.sep}orbax{os.sep}' not in record.pathname:
      return True
    self.seen = self.seen or disk_full
    return not self.seen


def _is_closed_loop(unraisable) -> bool:
  """TensorStore's callbacks into an event loop that orbax closed after a failed write."""
  return unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == (
    'Event loop is closed'
  )


@contextlib.contextmanager
def quiet_disk_full():
  """Within the block, orbax's error logs of a full disk are dropped (`_DropDiskFullErrors`).

  So are TensorStore's reports (unraisable RuntimeErrors) of writes that
  finish after orbax closed their event loop, which only a failed write
  causes. After a full disk, both stay dropped for the rest of the process
  (asyncio reports orbax's failed futures when they are collected).
  """
  drop = _DropDiskFullErrors()
  loggers = [logging.getLogger('absl'), logging.getLogger('asyncio')]
  for logger in loggers:
    logger.addFilter(drop)
  previous_hook = sys.unraisablehook

  def unraisable_hook(unraisable):
    if not _is_closed_loop(unraisable):
      previous_hook(unraisable)

  sys.unraisablehook = unraisable_hook
  disk_full = False
  try:
    yield
  except BaseException as e:
    disk_full = workdirs.is_disk_full(e) or 'no space left on device' in str(e)
    raise
  finally:
    loggers[0].removeFilter(drop)
    if not (drop.seen or disk_full):
      loggers[1].removeFilter(drop)
      sys.unraisablehook = previous_hook


def join_writers(timeout: float = 60.0) -> None:
  """Waits (up to `timeout` s) for the threads still writing a failed checkpoint to end."""
  deadline = time.monotonic() + timeout
  for thread in threading.enumerate():
    if thread is threading.main_thread() or thread.daemon:
      continue
    thread.join(max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def _closing_on_error(manager: ocp.CheckpointManager):
  """Closes `manager` (its threads and event loops) when the block raises."""
  try:
    yield
  except BaseException:
    try:
      manager.close()
    except Exception:  # pylint: disable=broad-except
      log.debug('closing the checkpoint manager after an error failed', exc_info=True)
    raise


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Saves `state` and `meta` (plus the checksums of `state`) as checkpoint `step`.

  Async: see `manager.wait_until_finished`. The checksums are computed first,
  from the same arrays. A state with non-finite values is not saved (it
  would not restore): a UserError, and the checkpoints already saved are kept.
  """
  checksums, nonfinite = array_checksums(state)
  bad = [name for name, count in nonfinite.items() if count]
  if bad:
    kept = manager.latest_step()
    kept = f'checkpoint {kept} is kept' if kept is not None else 'no checkpoint'
    raise UserError(
      f'{bad[0]} is not finite at step {step} ({nonfinite[bad[0]]} values'
      f'{first_and_more(bad)}); checkpoint {step} not saved, {kept}. Lower '
      'optimizer.learning_rate or set optimizer.grad_clip_norm.'
    )
  meta = {**meta, CHECKSUMS_KEY: checksums, CHECKSUM_VERSION_KEY: CHECKSUM_VERSION}
  manager.save(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    force=True,
  )


# Per array: orbax's metadata (_METADATA, _sharding, array_metadatas) and the
# checksum in 'meta'; per checkpoint: its directories and manifests. Measured
# on a local disk: about 1.2 KiB per array, a few KiB per checkpoint.
_BYTES_PER_ARRAY = 1280
_BYTES_PER_CHECKPOINT = 32 * 1024


def estimate_bytes(abstract_state: Any) -> int:
  """About the bytes one checkpoint of `abstract_state` takes on disk.

  The arrays' bytes (parameters and optimizer state, each stored once
  whatever the mesh), plus orbax's metadata per array and per checkpoint.
  """
  leaves = jax.tree.leaves(abstract_state)
  arrays = sum(int(math.prod(leaf.shape)) * itemsize(leaf.dtype) for leaf in leaves)
  return arrays + _BYTES_PER_ARRAY * len(leaves) + _BYTES_PER_CHECKPOINT


# --------------------------------------------------------------------------- restore


def _shape_mismatch(saved: Any, target: Any) -> str | None:
  """The first leaf whose saved shape differs from the target, as a message."""
  flat = jax.tree_util.tree_flatten_with_path(saved)[0]
  saved_leaves = {path_names(p): leaf for p, leaf in flat}
  for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    names = path_names(path)
    name = '/'.join(names)
    if names not in saved_leaves:
      return f'{name} is missing from it'
    saved_shape = tuple(getattr(saved_leaves[names], 'shape', ()))
    if saved_shape != tuple(leaf.shape):
      return f'{name} has shape {saved_shape} there but {tuple(leaf.shape)} in this config'
  if len(saved_leaves) != len(jax.tree.leaves(target)):
    return f'it holds {len(saved_leaves)} arrays, this config {len(jax.tree.leaves(target))}'
  return None


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


_READ_ERROR = re.compile(r'Error reading "([^"/]+)/[^"]*"')


def _read_problem(where: str, error: Exception) -> str:
  """What went wrong reading checkpoint `where`, naming the array when TensorStore does.

  Orbax wraps TensorStore's error (which names the array and the cause) in
  one that holds a repr of the TensorStore object; report the innermost.
  """
  chain, seen = [], error
  while seen is not None and len(chain) < 10:
    chain.append(seen)
    seen = seen.__cause__ or seen.__context__
  for error in reversed(chain):
    text = _without_reprs(str(error))
    match = _READ_ERROR.search(text)
    if match:
      name = match.group(1).replace('.', '/')
      reason = text[match.end() :].split('": ', 1)[-1].split('; at byte')[0]
      return f'checkpoint {where} is corrupt: {name} cannot be read ({reason[:200]})'
  innermost = chain[-1]
  text = _without_reprs(str(innermost))[:200]
  return f'checkpoint {where} cannot be read ({type(innermost).__name__}: {text})'


def _without_reprs(text: str) -> str:
  """The first line of an error message, without TensorStore's spec and object reprs."""
  lines = text.strip().splitlines()
  line = lines[0] if lines else ''
  for tail in (' See full TensorStore details', ' [tensorstore_spec='):
    line = line.split(tail)[0]
  return line.strip()


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
  """Restores and verifies checkpoint `step` onto the shardings of `abstract_state`.

  Raises CorruptCheckpointError when it cannot be read or does not verify,
  UserError when it was saved for another model.
  """
  where = _step_dir(manager, step)
  try:
    saved = manager.item_metadata(step)['state']
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpointError(_read_problem(where, e), _RESUME_FIX) from None
  if saved is None:
    raise CorruptCheckpointError(f'checkpoint {where} has no readable state', _RESUME_FIX)
  mismatch = _shape_mismatch(getattr(saved, 'tree', saved), abstract_state)
  if mismatch:
    raise UserError(
      f'checkpoint {where} was saved for another model: {mismatch}; use a new --workdir or the '
      'config that wrote it.'
    )
  try:
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
      ),
    )
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpointError(_read_problem(where, e), _RESUME_FIX) from None
  meta = dict(restored['meta'] or {})
  verify(where, restored['state'], meta, _RESUME_FIX)
  return restored['state'], meta


def _earlier_fix(manager: ocp.CheckpointManager, step: int) -> str:
  earlier = [s for s in manager.all_steps() if s < step]
  if not earlier:
    return 'it is the only checkpoint of the run; retrain'
  return (
    f'use an earlier checkpoint of the run ({", ".join(map(str, sorted(earlier)))}): --step=N '
    'for vmoe_jax.evaluate, step=N for inference.load'
  )


def restore_params(
  manager: ocp.CheckpointManager, step: int, abstract_params: Any, fix: str | None = None
) -> Any:
  """Only the params of checkpoint `step`, verified, onto the shardings of `abstract_params`.

  The optimizer state is skipped (not read), so a checkpoint restores for
  inference whatever optimizer wrote it. `manager` must be read-only
  (`create_manager(..., create=False)`). `fix` ends the message of a corrupt
  checkpoint (default: use an earlier step).
  """
  where = _step_dir(manager, step)
  try:
    saved = manager.item_metadata(step)['state']
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpointError(
      _read_problem(where, e), fix or _earlier_fix(manager, step)
    ) from None
  saved_tree = dict(getattr(saved, 'tree', saved) or {})
  if 'params' not in saved_tree:
    raise UserError(f'checkpoint {where} holds no params; is it a vmoe_jax checkpoint?')
  mismatch = _shape_mismatch(saved_tree['params'], abstract_params)
  if mismatch:
    raise UserError(f'checkpoint {where} was saved for another model: {mismatch}.')
  target = {'params': abstract_params}
  state = ocp.args.PyTreeRestore(
    item=target,
    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
    partial_restore=True,
  )
  try:
    restored = manager.restore(
      step, args=ocp.args.Composite(state=state, meta=ocp.args.JsonRestore())
    )
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpointError(
      _read_problem(where, e), fix or _earlier_fix(manager, step)
    ) from None
  params = {'params': restored['state']['params']}
  verify(where, params, dict(restored['meta'] or {}), fix or _earlier_fix(manager, step))
  return params['params']


def load_params(
  workdir: str, abstract_params: Any, step: int | None = None, fix: str | None = None
) -> tuple[Any, int]:
  """(params, step): the verified params of checkpoint `step` (default: latest) of `workdir`.

  For inference, evaluation and starting a run from another run's params
  (`init_from`): opens `workdir/checkpoints` read-only, never writes, and
  closes it whatever happens.
  """
  manager = create_manager(workdir, keep=0, async_save=False, create=False)
  try:
    if step is None:
      step = manager.latest_step()
      if step is None:
        raise UserError(f'{workdir} has no checkpoint; train first or check --workdir.')
    elif step not in manager.all_steps():
      raise UserError(f'{workdir} has no checkpoint {step}; it has {sorted(manager.all_steps())}.')
    return restore_params(manager, step, abstract_params, fix), step
  finally:
    manager.close()


def restore_for_resume(
  manager: ocp.CheckpointManager, abstract_state: Any, on_corrupt: str = 'fail'
) -> tuple[Any, dict, int] | None:
  """(state, meta, step) of the newest checkpoint that verifies, or None without any.

  on_corrupt='fail': a corrupt or unreadable latest checkpoint is a one-line
  CorruptCheckpointError, and nothing is written. 'previous': one warning line
  per corrupt checkpoint (naming it and why), then the newest earlier one that
  verifies is restored. The corrupt ones (all newer than it) are renamed
  `<step>.corrupt` (`.corrupt.1`, ... if taken), logged: their bytes stay on
  disk as evidence, and orbax, which no longer lists them, neither refuses to
  save that step again ('checkpoint already exists') nor counts them against
  `keep_checkpoints` (it would delete the good ones first). Nothing is deleted.
  If no checkpoint verifies, the error names the latest and nothing is renamed.
  Any UserError closes `manager`.
  """
  with _closing_on_error(manager):
    if on_corrupt not in ON_CORRUPT:
      raise UserError(f"train.on_corrupt={on_corrupt!r}; use 'fail' or 'previous'.")
    steps = sorted(manager.all_steps(), reverse=True)
    corrupt = []
    for step in steps:
      log.info('Found checkpoint %d in %s.', step, manager.directory)
      try:
        state, meta = restore(manager, step, abstract_state)
      except CorruptCheckpointError as e:
        if on_corrupt == 'fail':
          raise
        log.warning('%s; trying the checkpoint before it.', e.problem)
        corrupt.append((step, e))
        continue
      if corrupt:
        _set_aside(manager, [s for s, _ in corrupt])
      return state, meta, step
    if corrupt:
      raise CorruptCheckpointError(
        corrupt[0][1].problem + f', and no earlier checkpoint of {manager.directory} verifies',
        'use a new --workdir',
      )
    return None


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Renames checkpoints `steps` to `<step>.corrupt` so that orbax forgets them."""
  if jax.process_index() == 0:
    for step in steps:
      source = _step_dir(manager, step)
      target, n = source + CORRUPT_SUFFIX, 0
      while os.path.exists(target):
        n += 1
        target = f'{source}{CORRUPT_SUFFIX}.{n}'
      os.rename(source, target)
      log.warning('Moved corrupt checkpoint %s to %s (kept, not deleted).', source, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices('vmoe_jax_corrupt_checkpoints_set_aside')
  manager.reload()


def latest_step(manager: ocp.CheckpointManager) -> int | None:
  step = manager.latest_step()
  if step is not None:
    log.info('Found checkpoint %d in %s.', step, manager.directory)
  return step
