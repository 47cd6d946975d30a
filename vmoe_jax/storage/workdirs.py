"""A run's workdir: whether a run may start there, and its JSON files.

`check_workdir` decides, before a run touches `workdir`, whether it repeats
a finished run (its results are returned), continues one for longer, or
starts or resumes; `check_config` refuses to resume checkpoints of another
model. The JSON files beside the checkpoints (`workdir/config.json`,
`dataset.json`, `results.json`) are written atomically and read as one-line
UserErrors when missing or unreadable. The checkpoints themselves are in
`vmoe_jax.storage.checkpointing`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import jax

from vmoe_jax.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = 'checkpoints'
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
