"""The results ledger: one small JSON per finished benchmark run, kept in the repository.

A table that needs many hours of a small machine is built a few runs at a
time: every finished run leaves a record in a folder (e.g.
`results/fashion_mnist/`), the tables and figures are regenerated from the
folder alone, and a queue skips the runs whose record exists. A record names
what was run (config file and argument, overrides, seed, split, kind), what
it gave (test accuracy, accuracy on training images), what it costs
(parameters, active GFLOPs per image, step and wall time) and where it ran
(commit, CPU, threads, date, jax version).

`RECORD_KEYS` lists the keys every record holds (None where unknown). A
run's identity is `run_id(config, overrides, seed, kind)`; its file is
`<results_dir>/<run_id>.json`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Mapping
from typing import Any

from vmoe_jax.errors import UserError

RECORD_KEYS = (
  'run_id',
  'config',  # 'configs/fashion_vit.py:w32,val': path and argument.
  'overrides',  # {'model.moe.num_experts': 32, ...}
  'seed',
  'split',  # 'test' or 'val' (the held-out slice of the train split).
  'kind',  # 'scratch', 'upcycled', 'continued' or 'distilled'.
  'test_accuracy',  # Fraction, on the evaluation split (test, or the held-out slice).
  'train_accuracy',  # Fraction, on the first 10,000 training images.
  'params',
  'gflops_per_image',  # Active forward GFLOPs per image (vmoe_jax.models.flops).
  'width',
  'num_experts',  # 0 for a dense model.
  'router',
  'num_selected',
  'moe_layers',  # Block indices holding MoE layers.
  'num_steps',
  'dropped',  # Share of test assignments dropped (MoE), else None.
  'step_seconds',  # Median training step.
  'wall_seconds',  # The whole training command.
  'config_hash',  # sha256 of the resolved config (config.json), 12 hex digits.
  'commit',
  'cpu',
  'threads',
  'jax_version',
  'date',
  'command',
)
KINDS = ('scratch', 'upcycled', 'continued', 'distilled')
TRAIN_ACCURACY_EXAMPLES = 10_000


def run_id(config: str, overrides: Mapping[str, Any], seed: int, kind: str = 'scratch') -> str:
  """A stable name for one run: readable prefix + a hash of what defines it."""
  if kind not in KINDS:
    raise UserError(f'kind={kind!r} is unknown; use one of {KINDS}.')
  key = json.dumps([config, dict(sorted(overrides.items())), seed, kind], sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:10]
  stem = os.path.splitext(os.path.basename(config.split(':')[0]))[0]
  arg = config.split(':')[1].replace(',', '-') if ':' in config else ''
  return '_'.join(p for p in (stem, arg, kind, f's{seed}', digest) if p)


def record_path(results_dir: str, rid: str) -> str:
  return os.path.join(results_dir, f'{rid}.json')


def has_record(results_dir: str, rid: str) -> bool:
  return os.path.exists(record_path(results_dir, rid))


def write_record(results_dir: str, record: Mapping[str, Any]) -> str:
  """Writes one record atomically (never overwrites another run's); returns its path."""
  missing = [k for k in RECORD_KEYS if k not in record]
  if missing:
    raise UserError(f'a ledger record lacks {missing}; every record holds RECORD_KEYS.')
  os.makedirs(results_dir, exist_ok=True)
  path = record_path(results_dir, record['run_id'])
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(dict(record), f, indent=1, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)
  return path


def load_records(results_dir: str) -> list[dict]:
  """Every record of the folder, in file-name order; a malformed file is a one-line error."""
  if not os.path.isdir(results_dir):
    return []
  records = []
  for name in sorted(os.listdir(results_dir)):
    if not name.endswith('.json'):
      continue
    path = os.path.join(results_dir, name)
    try:
      with open(path) as f:
        record = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise UserError(f'ledger record {path} is unreadable ({e}); fix or delete it.') from None
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
      raise UserError(f'ledger record {path} lacks {missing}; fix or delete it.')
    records.append(record)
  return records


def machine() -> dict[str, Any]:
  """CPU model, threads JAX's CPU backend may use, jax version, date, commit."""
  import jax  # pylint: disable=g-import-not-at-top

  return {
    'cpu': cpu_model(),
    'threads': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(),
    'jax_version': jax.__version__,
    'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d'),
    'commit': git_commit(),
  }


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def git_commit(repo: str | None = None) -> str | None:
  """The checked-out commit (12 hex digits, '+dirty' with local changes), or None."""
  repo = repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(
      ['git', 'rev-parse', '--short=12', 'HEAD'], cwd=repo, capture_output=True, text=True
    )
    if head.returncode:
      return None
    dirty = subprocess.run(
      ['git', 'status', '--porcelain', '--untracked-files=no', '--', 'vmoe_jax', 'configs'],
      cwd=repo,
      capture_output=True,
      text=True,
    )
    return head.stdout.strip() + ('+dirty' if dirty.stdout.strip() else '')
  except OSError:
    return None


def config_hash(workdir: str) -> str:
  with open(os.path.join(workdir, 'config.json'), 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()[:12]


def make_record(
  workdir: str,
  *,
  config: str,
  overrides: Mapping[str, Any],
  seed: int,
  kind: str = 'scratch',
  wall_seconds: float | None = None,
  command: str | None = None,
  train_accuracy: bool = True,
) -> dict[str, Any]:
  """The record of the finished run in `workdir` (its results.json and checkpoint)."""
  # Imported here: writing, reading and naming records (the queues) needs no JAX.
  from vmoe_jax import inference  # pylint: disable=g-import-not-at-top
  from vmoe_jax.models import flops  # pylint: disable=g-import-not-at-top
  from vmoe_jax.storage import workdirs  # pylint: disable=g-import-not-at-top

  results = workdirs.read_json(workdir, 'results.json')
  trained = inference.load(workdir)
  run_config = trained.config
  fwd = flops.forward_flops(trained.model, trained.image_shape)
  moe = trained.model.moe
  record = {
    'run_id': run_id(config, overrides, seed, kind),
    'config': config,
    'overrides': dict(overrides),
    'seed': seed,
    'split': 'val' if run_config.input.test_split.startswith('train') else 'test',
    'kind': kind,
    'test_accuracy': results['test/accuracy'],
    'train_accuracy': _train_accuracy(trained) if train_accuracy else None,
    'params': results['num_params'],
    'gflops_per_image': fwd['total'] / 1e9,
    'width': trained.model.width,
    'num_experts': moe.num_experts if moe else 0,
    'router': moe.router if moe else None,
    'num_selected': moe.num_selected if moe else None,
    'moe_layers': list(moe.layers) if moe else [],
    'num_steps': int(results['step']),
    'dropped': results.get('test/moe_dropped'),
    'step_seconds': results.get('step_seconds'),
    'wall_seconds': wall_seconds,
    'config_hash': config_hash(workdir),
    'command': command,
    **machine(),
  }
  return record


def _train_accuracy(trained) -> float:
  """Accuracy on the first 10,000 images of the run's training split."""
  from vmoe_jax import inference  # pylint: disable=g-import-not-at-top
  from vmoe_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

  dataset = input_pipeline.create_dataset(trained.config)
  if dataset.train_arrays is None:
    return None
  images, labels = dataset.train_arrays
  n = min(TRAIN_ACCURACY_EXAMPLES, len(labels))
  return inference.accuracy(trained, images[:n], labels[:n])
