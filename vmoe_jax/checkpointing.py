"""Orbax checkpoints in `workdir/checkpoints`: save, resume, restore elsewhere.

A checkpoint holds two items:
  'state': the TrainState (params, optimizer state, step, rng), saved from
    every process, each writing its shards (async where orbax allows);
  'meta': JSON, the input position (the step: training batches are a pure
    function of it, see `input_pipeline`) and what the run was.
The config of the run is kept beside them in `workdir/config.json`.

Restoring takes an abstract target (shapes, dtypes and the *current*
shardings), so a checkpoint written on one mesh restores on another. A
checkpoint that cannot be read, or that was saved for another model, is a
`UserError` and is never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from vmoe_jax.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = 'checkpoints'
CONFIG_FILE = 'config.json'
DATASET_FILE = 'dataset.json'


def create_manager(
  workdir: str, keep: int = 3, async_save: bool = True, create: bool = True
) -> ocp.CheckpointManager:
  """The manager of `workdir/checkpoints`; `create=False` for read-only use."""
  directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
  if not create and not os.path.isdir(directory):
    raise UserError(f'{directory} does not exist; point --workdir at a training run.')
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep if keep > 0 else None,
    enable_async_checkpointing=async_save,
    create=create,
    read_only=not create,
  )
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


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Saves `state` and `meta` as checkpoint `step` (async; see `wait`)."""
  manager.save(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    force=True,
  )


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


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
  """Restores checkpoint `step` onto the shardings of `abstract_state`."""
  where = os.path.join(str(manager.directory), str(step))
  try:
    saved = manager.item_metadata(step)['state']
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(
      f'checkpoint {where} cannot be read ({_first_line(e)}); move it away to resume from an '
      'earlier one, or use a new --workdir.'
    ) from None
  if saved is None:
    raise UserError(
      f'checkpoint {where} has no readable state; move it away to resume from an earlier one, '
      'or use a new --workdir.'
    )
  saved_tree = getattr(saved, 'tree', saved)
  mismatch = _shape_mismatch(saved_tree, abstract_state)
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
    raise UserError(
      f'checkpoint {where} cannot be restored ({_first_line(e)}); move it away to resume from '
      'an earlier one, or use a new --workdir.'
    ) from None
  return restored['state'], dict(restored['meta'] or {})


def restore_params(manager: ocp.CheckpointManager, step: int, abstract_params: Any) -> Any:
  """Only the params of checkpoint `step`, onto the shardings of `abstract_params`.

  The optimizer state is skipped (not read), so a checkpoint restores for
  inference whatever optimizer wrote it. `manager` must be read-only
  (`create_manager(..., create=False)`).
  """
  where = os.path.join(str(manager.directory), str(step))
  try:
    saved = manager.item_metadata(step)['state']
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'checkpoint {where} cannot be read ({_first_line(e)}).') from None
  saved_tree = dict(getattr(saved, 'tree', saved) or {})
  if 'params' not in saved_tree:
    raise UserError(f'checkpoint {where} holds no params; is it a vmoe_jax checkpoint?')
  mismatch = _shape_mismatch(saved_tree['params'], abstract_params)
  if mismatch:
    raise UserError(f'checkpoint {where} was saved for another model: {mismatch}.')
  target = {'params': abstract_params}
  restore = ocp.args.PyTreeRestore(
    item=target,
    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
    partial_restore=True,
  )
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=restore))
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'checkpoint {where} cannot be restored ({_first_line(e)}).') from None
  return restored['state']['params']


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0][:200]}' if text else type(error).__name__


def check_config(workdir: str, config_json: dict, has_checkpoint: bool) -> None:
  """Refuses to resume a workdir whose checkpoints belong to another model config."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not (has_checkpoint and os.path.exists(path)):
    return
  with open(path) as f:
    saved = json.load(f)
  for section in ('model',):
    if saved.get(section) != config_json.get(section):
      diffs = _dict_diff(saved.get(section, {}), config_json.get(section, {}), section)
      raise UserError(
        f'{workdir} holds checkpoints of another model ({"; ".join(diffs[:3])}); use a new '
        '--workdir or the same model config.'
      )


def _dict_diff(old: dict, new: dict, prefix: str) -> list[str]:
  diffs = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += _dict_diff(a, b, f'{prefix}.{key}')
    elif a != b:
      diffs.append(f'{prefix}.{key} was {a!r}, now {b!r}')
  return diffs


def write_config(workdir: str, config_json: dict) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, CONFIG_FILE + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(config_json, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def read_config(workdir: str) -> dict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise UserError(f'{path} does not exist; point --workdir at the directory of a training run.')
  with open(path) as f:
    return json.load(f)


def latest_step(manager: ocp.CheckpointManager) -> int | None:
  step = manager.latest_step()
  if step is not None:
    log.info('Found checkpoint %d in %s.', step, manager.directory)
  return step


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
  with open(os.path.join(workdir, DATASET_FILE), 'w') as f:
    json.dump(info, f, indent=2)


def read_dataset_info(workdir: str) -> dict:
  path = os.path.join(workdir, DATASET_FILE)
  if not os.path.exists(path):
    raise UserError(f'{path} does not exist; point --workdir at the directory of a training run.')
  with open(path) as f:
    return json.load(f)
