"""Orbax checkpoints in `workdir/checkpoints`: save, verify, resume, restore elsewhere.

A checkpoint holds two items:
  'state': the TrainState (params, optimizer state, step, rng), saved from
    every process, each writing its shards (async where orbax allows);
  'meta': JSON, the input position (the step: training batches are a pure
    function of it, see `input_pipeline`), what the run was, and a checksum
    of every array of the state ('checksums', keyed by the array's
    '/'-joined path, e.g. 'params/block_01/moe/wi').
The config of the run is kept beside them in `workdir/config.json`.

Checksums (`array_checksums`) are computed on the devices that hold the
arrays, by one jitted pass over the whole tree: each array is read as
unsigned 32-bit words w_i (float32 / int32 bitcast; 16- and 8-bit types
bitcast and widened; 64-bit types as two words; PRNG keys by their key data)
and summed twice modulo 2^32: sum_i w_i * (2i + 1), whose odd multipliers
make any single-bit flip change it, and sum_i g(w_i) * m_i with the
bijection g(w) = w ^ (w >> 16) and pseudo-random odd m_i = (i * 0x9E3779B1 +
0x7F4A7C15) | 1, so that other changes are unlikely to cancel in both. i is
the element's index in the flattened global array and the sums are exact
integer sums, so the result is the same on any mesh, any number of
processes, sharded or not. The same pass counts the non-finite elements of
float arrays.

Every restore verifies: `restore` (resume), `restore_params` and
`load_params` (inference, evaluation, transfer from another run) recompute
the checksums of the arrays they read and refuse, as a one-line
`CorruptCheckpointError` naming the checkpoint and the array, an array that
does not match or holds non-finite values, and a checkpoint whose bytes
cannot be decoded. Checkpoints written before checksums existed restore with
a warning that they cannot be verified. `save` refuses to write a state with
non-finite values (it would not restore).

Restoring takes an abstract target (shapes, dtypes and the *current*
shardings), so a checkpoint written on one mesh restores on another. A
checkpoint that cannot be read, or that was saved for another model, is a
`UserError` and is never overwritten; `restore_for_resume` documents what
`train.on_corrupt='previous'` does with one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from vmoe_jax.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = 'checkpoints'
CONFIG_FILE = 'config.json'
DATASET_FILE = 'dataset.json'
RESULTS_FILE = 'results.json'
CHECKSUMS_KEY = 'checksums'
CHECKSUM_VERSION_KEY = 'checksum_version'
CHECKSUM_VERSION = 1
CORRUPT_SUFFIX = '.corrupt'
ON_CORRUPT = ('fail', 'previous')
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

_RESUME_FIX = (
  'move it away to resume from an earlier one, or set --config.train.on_corrupt=previous'
)


class CorruptCheckpointError(UserError):
  """A checkpoint whose bytes cannot be read or do not match its checksums."""

  def __init__(self, problem: str, fix: str):
    self.problem = problem  # 'checkpoint DIR is corrupt: ...', without the fix.
    super().__init__(f'{problem}; {fix}.')


# --------------------------------------------------------------------------- checksums

_GOLDEN = 0x9E3779B1  # Odd: i -> i * _GOLDEN + _OFFSET is a bijection modulo 2^32.
_OFFSET = 0x7F4A7C15


def _words(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words (64-bit and complex elements: trailing axes)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    x = jnp.stack([x.real, x.imag], axis=-1)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """Row-major index of every element of the global array, modulo 2^32."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


def _nonfinite(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """1 per non-finite element of a float `x`, laid out like its words (`shape`)."""
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros(shape, jnp.uint32)
  bad = (~jnp.isfinite(x)).astype(jnp.uint32)
  extra = len(shape) - x.ndim  # Words per element beyond the first: count it once.
  if extra:
    first = sum(lax.broadcasted_iota(jnp.uint32, shape, x.ndim + k) for k in range(extra)) == 0
    bad = bad.reshape(x.shape + (1,) * extra) * first.astype(jnp.uint32)
  return bad


def _leaf_sums(x: jax.Array) -> jax.Array:
  """[weighted sum, mixed sum, non-finite count] of one array, as uint32.

  One variadic reduction per array (three separate ones compile twice as
  slowly, and a checkpoint holds hundreds of arrays).
  """
  words = _words(x)
  index = _flat_index(words.shape)
  weighted = words * (index * jnp.uint32(2) + jnp.uint32(1))
  odd = (index * jnp.uint32(_GOLDEN) + jnp.uint32(_OFFSET)) | jnp.uint32(1)
  mixed = (words ^ (words >> 16)) * odd
  terms = (weighted, mixed, _nonfinite(x, words.shape))
  zero = jnp.uint32(0)
  sums = lax.reduce(
    terms,
    (zero, zero, zero),
    lambda a, b: tuple(p + q for p, q in zip(a, b)),
    tuple(range(words.ndim)),
  )
  return jnp.stack(sums)


def _tree_sums(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([_leaf_sums(x) for x in leaves])


@functools.lru_cache(maxsize=16)
def _jitted_sums(out_sharding):
  return jax.jit(_tree_sums, out_shardings=out_sharding)


def _replicated_sharding(leaves: list[Any]):
  """Replicated on the mesh of the first sharded leaf: readable on every process."""
  for leaf in leaves:
    sharding = getattr(leaf, 'sharding', None)
    if isinstance(sharding, NamedSharding):
      return NamedSharding(sharding.mesh, PartitionSpec())
  return None


def array_names(tree: Any) -> list[str]:
  """The '/'-joined path of every leaf of `tree`, in leaf order."""
  return ['/'.join(_path_names(p)) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def array_checksums(tree: Any) -> tuple[dict[str, str], dict[str, int]]:
  """(checksums as 16 hex digits, non-finite counts) of every array, by '/'-joined path.

  One jitted pass on the devices that hold the arrays (see the module
  docstring); only the results (3 words per array) come to the host. Every
  process gets the same answer.
  """
  names = array_names(tree)
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return {}, {}
  sums = np.asarray(jax.device_get(_jitted_sums(_replicated_sharding(leaves))(leaves)))
  checksums = {n: f'{int(s[0]):08x}{int(s[1]):08x}' for n, s in zip(names, sums)}
  return checksums, {n: int(s[2]) for n, s in zip(names, sums)}


def _first_and_more(names: list[str]) -> str:
  more = len(names) - 1
  return f' (and {more} other array{"s" if more > 1 else ""})' if more else ''


def verify(where: str, tree: Any, meta: dict, fix: str) -> None:
  """Raises CorruptCheckpointError if `tree`, read from checkpoint `where`, is not as saved.

  Compares the checksums of the arrays of `tree` (all or some of the saved
  ones) with those in `meta`, and refuses non-finite float values.
  """
  checksums, nonfinite = array_checksums(tree)
  saved = meta.get(CHECKSUMS_KEY)
  if saved is None or meta.get(CHECKSUM_VERSION_KEY) != CHECKSUM_VERSION:
    log.warning(
      'checkpoint %s has no checksums (written by an earlier vmoe_jax); it cannot be verified.',
      where,
    )
  else:
    bad = [name for name, value in checksums.items() if saved.get(name) != value]
    if bad:
      name = bad[0]
      raise CorruptCheckpointError(
        f'checkpoint {where} is corrupt: {name} does not match its checksum (saved '
        f'{saved.get(name, "none")}, read {checksums[name]}){_first_and_more(bad)}',
        fix,
      )
  bad = [name for name, count in nonfinite.items() if count]
  if bad:
    name = bad[0]
    raise CorruptCheckpointError(
      f'checkpoint {where} is corrupt: {name} holds {nonfinite[name]} non-finite values'
      f'{_first_and_more(bad)}',
      fix,
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
      f'{_first_and_more(bad)}); checkpoint {step} not saved, {kept}. Lower '
      'optimizer.learning_rate or set optimizer.grad_clip_norm.'
    )
  meta = {**meta, CHECKSUMS_KEY: checksums, CHECKSUM_VERSION_KEY: CHECKSUM_VERSION}
  manager.save(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    force=True,
  )


# --------------------------------------------------------------------------- restore


def _path_names(path) -> tuple[str, ...]:
  """Key path -> names, the same for dict keys, attributes and indices."""
  names = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return tuple(names)


def _shape_mismatch(saved: Any, target: Any) -> str | None:
  """The first leaf whose saved shape differs from the target, as a message."""
  flat = jax.tree_util.tree_flatten_with_path(saved)[0]
  saved_leaves = {_path_names(p): leaf for p, leaf in flat}
  for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    names = _path_names(path)
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


# --------------------------------------------------------------------------- workdir


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
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir} is a file, not a directory; pass a directory.')
  results = _finished_results(workdir)
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


def check_workdir_writable(workdir: str) -> None:
  """Creates `workdir` if needed and checks a file can be written there (UserError)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir} is a file, not a directory; pass a directory.')
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir, prefix='.write_test'):
      pass
  except OSError as e:
    raise UserError(
      f'--workdir={workdir} cannot be written ({type(e).__name__}: {e.strerror or e}); '
      'pass a directory you can write to.'
    ) from None


def _finished_results(workdir: str) -> dict | None:
  """results.json of `workdir` if a checkpoint at its step exists, else None."""
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    return None
  results = read_json(workdir, RESULTS_FILE)
  step = results.get('step')
  if not isinstance(step, int):
    return None
  if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR, str(step))):
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
    elif a != b:
      diffs.append((name, a, b))
  return diffs


def _format_diffs(diffs: list[tuple[str, Any, Any]], limit: int = 6) -> str:
  shown = ', '.join(f'{name} (was {a!r}, now {b!r})' for name, a, b in diffs[:limit])
  more = len(diffs) - limit
  return shown + (f' and {more} more' if more > 0 else '')


# --------------------------------------------------------------------------- JSON files


def _write_json(path: str, value: Any) -> None:
  """Writes `value` to `path` atomically: a reader sees the old file or the new one."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


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
  _write_json(os.path.join(workdir, CONFIG_FILE), config_json)


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
  _write_json(os.path.join(workdir, DATASET_FILE), info)


def read_dataset_info(workdir: str) -> dict:
  return read_json(workdir, DATASET_FILE)
