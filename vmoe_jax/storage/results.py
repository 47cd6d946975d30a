"""The results table of a run, in the seed's form, and of several runs (sweeps).

`train_and_evaluate` writes `results.json` (raw figures) and `results.md`
(this table for the one run) into the workdir; `summarize` reads a workdir
back into a row, `markdown_table` / `write_csv` lay rows out.
"""

from __future__ import annotations

import csv
import json
import os

COLUMNS = (
  ('model', 'model'),
  ('experts', 'experts'),
  ('num_params', 'parameters'),
  ('test_accuracy', 'test accuracy'),
  ('train_seconds_per_epoch', 'training time / epoch (s)'),
  ('step_seconds', 'step time (s)'),
  ('inference_ms_per_image', 'inference time / image (ms)'),
)


def model_name(config: dict) -> str:
  """'Switch-ViT 64/4x4/128 p2, E=8 K=1 every_2' style description of config.json."""
  model = config['model']
  moe = model['moe']
  size = model.get('variant') or (
    f'{model["width"]}/{model["depth"]}x{model["num_heads"]}/{model["mlp_dim"]} '
    f'p{model["patch_size"]}'
  )
  if not moe['num_experts']:
    return f'ViT {size}'
  family = 'Switch-ViT' if moe['num_selected'] == 1 else 'V-MoE'
  return f'{family} {size}, K={moe["num_selected"]} {moe["layers"]}'


def summarize(workdir: str) -> dict:
  """A row of the results table from a finished run's workdir."""
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  with open(os.path.join(workdir, 'dataset.json')) as f:
    dataset = json.load(f)
  steps_per_epoch = dataset['num_train'] / config['input']['batch_size']
  step_seconds = results.get('step_seconds')
  return {
    'workdir': workdir,
    'model': model_name(config),
    'experts': config['model']['moe']['num_experts'],
    'num_params': results['num_params'],
    'test_accuracy': results['test/accuracy'],
    'train_seconds_per_epoch': step_seconds * steps_per_epoch if step_seconds else None,
    'step_seconds': step_seconds,
    'inference_ms_per_image': 1000.0 / results['eval_images_per_sec'],
  }


def _cell(key: str, value) -> str:
  if value is None:
    return '-'
  if key == 'num_params':
    return f'{value / 1e6:.2f}M' if value >= 1e5 else f'{value:,}'
  if key == 'test_accuracy':
    return f'{100 * value:.2f}%'
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value)


def markdown_table(rows: list[dict]) -> str:
  header = '| ' + ' | '.join(title for _, title in COLUMNS) + ' |'
  rule = '| ' + ' | '.join('---' if key == 'model' else '---:' for key, _ in COLUMNS) + ' |'
  lines = [header, rule]
  for row in rows:
    lines.append('| ' + ' | '.join(_cell(key, row.get(key)) for key, _ in COLUMNS) + ' |')
  return '\n'.join(lines) + '\n'


def write_csv(rows: list[dict], path: str) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=[key for key, _ in COLUMNS] + ['workdir'])
    writer.writeheader()
    for row in rows:
      writer.writerow({k: row.get(k) for k in writer.fieldnames})


def write(workdir: str, results: dict) -> None:
  """results.json and results.md (the one-row table) in `workdir`, each written atomically."""
  from vmoe_jax.storage import workdirs  # pylint: disable=g-import-not-at-top  (imports jax)

  workdirs.write_json(os.path.join(workdir, 'results.json'), results, sort_keys=False)
  workdirs.write_text(os.path.join(workdir, 'results.md'), markdown_table([summarize(workdir)]))
