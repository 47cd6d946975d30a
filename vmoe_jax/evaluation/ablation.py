"""Which blocks' MLPs (dense or MoE) a trained model relies on.

For each set of blocks, the second linear layer of the MLP of those blocks
(a dense block's `mlp/Dense_1` kernel and bias, an MoE block's `moe/wo` and
`moe/bo`: every expert) is set to zero, so that the block's MLP branch adds
nothing to the residual stream, and the test split is evaluated with the
trained weights otherwise untouched, in the trainer's evaluation batches
(same padding, same routing groups). `split` evaluates another split of
the run's dataset instead (e.g. 'train[:10000]': with the 'none' row, the
accuracy on images the model trained on, i.e. the generalisation gap). An
analysis of a finished run: it trains nothing. The command is
`launch/ablate.py`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from vmoe_jax import inference
from vmoe_jax.data import input_pipeline
from vmoe_jax.errors import UserError
from vmoe_jax.runtime import sharding

# The output-side parameters of each kind of MLP: zero them and the branch is zero.
OUTPUT_PARAMS = {'mlp': ('Dense_1', ('kernel', 'bias')), 'moe': (None, ('wo', 'bo'))}
BLOCK = re.compile(r'^block_(\d+)$')


def mlp_kinds(params: Any) -> dict[int, str]:
  """{block index: 'mlp' or 'moe'} for the encoder blocks of a ViT's params."""
  kinds = {}
  for name, block in params.items():
    match = BLOCK.match(name)
    if match:
      kind = [k for k in OUTPUT_PARAMS if k in block]
      if len(kind) != 1:
        raise ValueError(f'{name} has neither an mlp nor an moe sub-module: {sorted(block)}')
      kinds[int(match.group(1))] = kind[0]
  return dict(sorted(kinds.items()))


def zero_mlp_outputs(params: Any, blocks: Sequence[int]) -> Any:
  """A copy of `params` with the MLP output of `blocks` set to zero (the rest shared)."""
  kinds = mlp_kinds(params)
  check_blocks(blocks, kinds)
  params = dict(params)
  for b in blocks:
    kind = kinds[b]
    sub, names = OUTPUT_PARAMS[kind]
    block = dict(params[f'block_{b:02d}'])
    module = dict(block[kind])
    if sub is None:
      for n in names:
        module[n] = jax.tree.map(lambda x: x * 0, module[n])
    else:
      module[sub] = {
        k: (jax.tree.map(lambda x: x * 0, v) if k in names else v) for k, v in module[sub].items()
      }
    block[kind] = module
    params[f'block_{b:02d}'] = block
  return params


def check_blocks(blocks: Sequence[int], kinds: dict[int, str]) -> None:
  unknown = sorted(set(blocks) - set(kinds))
  if unknown:
    raise UserError(
      f'--blocks names block(s) {unknown}, but the model has blocks {sorted(kinds)}; '
      'pass indices from 0 to depth - 1.'
    )


def default_block_sets(kinds: dict[int, str]) -> list[tuple[int, ...]]:
  """None, every block alone, then the MoE blocks and the dense ones together (if both)."""
  sets = [()] + [(b,) for b in kinds]
  moe = tuple(b for b, k in kinds.items() if k == 'moe')
  dense = tuple(b for b, k in kinds.items() if k == 'mlp')
  for group in (moe, dense):
    if len(group) > 1 and moe and dense:
      sets.append(group)
  if len(kinds) > 1 and (not moe or not dense):
    sets.append(tuple(kinds))
  return sets


def parse_block_sets(text: str) -> list[tuple[int, ...]]:
  """'none;0;1,3' -> [(), (0,), (1, 3)]."""
  sets = []
  for part in text.split(';'):
    part = part.strip()
    if part in ('', 'none'):
      sets.append(())
      continue
    try:
      sets.append(tuple(int(b) for b in part.split(',')))
    except ValueError:
      raise UserError(
        f'--blocks={text!r}: {part!r} is not a list of block indices; '
        "pass sets separated by ';', e.g. --blocks='none;0;1,3'."
      ) from None
  return sets


def test_accuracy(trained: inference.TrainedModel, params: Any, dataset) -> tuple[float, int]:
  """(accuracy, images) over the test split, in the trainer's padded eval batches."""
  correct = total = 0
  batch_sharding = sharding.batch_sharding(trained.mesh)
  for batch in dataset.eval_batches():
    images = jax.device_put(np.asarray(batch['image'], np.float32), batch_sharding)
    logits, _ = trained._apply(params, images)  # pylint: disable=protected-access
    mask = np.asarray(batch['mask']) > 0
    predicted = np.argmax(np.asarray(logits), axis=-1)
    correct += int(np.sum((predicted == np.asarray(batch['label'])) & mask))
    total += int(np.sum(mask))
  return correct / total, total


def run(
  workdir: str,
  block_sets: Sequence[Sequence[int]] | None = None,
  step: int | None = None,
  output_dir: str | None = None,
  log=print,
  split: str | None = None,
) -> dict:
  """Evaluates every set of `block_sets` (default `default_block_sets`); writes ablation.json/md.

  With `split` (default: the run's test split) the files are
  ablation_<split>.json/md, so the test-split table is never overwritten.
  """
  trained = inference.load(workdir, step=step, key='--workdir')
  if split:
    trained.config.input.test_split = split  # Bad slices fail in create_dataset, one line.
  kinds = mlp_kinds(trained.params)
  sets = [tuple(s) for s in (block_sets or default_block_sets(kinds))]
  for s in sets:
    check_blocks(s, kinds)  # Bad indices fail before any evaluation.
  dataset = input_pipeline.create_dataset(trained.config)
  rows = []
  for s in sets:
    accuracy, images = test_accuracy(trained, zero_mlp_outputs(trained.params, s), dataset)
    rows.append({'blocks': list(s), 'kinds': [kinds[b] for b in s], 'accuracy': accuracy})
    log(f'MLP output removed in blocks {_name(s, kinds)}: {100 * accuracy:.2f}% ({images} images)')
  base = next((r['accuracy'] for r in rows if not r['blocks']), None)
  report = {
    'workdir': os.path.abspath(workdir),
    'step': trained.step,
    'dataset': trained.config.input.dataset,
    'test_split': trained.config.input.test_split,
    'test_images': images,
    'block_kinds': {str(b): k for b, k in kinds.items()},
    'rows': rows,
  }
  output_dir = os.path.abspath(output_dir or os.path.join(workdir, 'eval'))
  os.makedirs(output_dir, exist_ok=True)
  stem = 'ablation' if not split else 'ablation_' + re.sub(r'[^A-Za-z0-9]+', '_', split).strip('_')
  with open(os.path.join(output_dir, stem + '.json'), 'w') as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(output_dir, stem + '.md'), 'w') as f:
    f.write(markdown(report, base))
  report['files'] = [stem + '.json', stem + '.md']
  report['output_dir'] = output_dir
  return report


def _name(blocks: Sequence[int], kinds: dict[int, str]) -> str:
  if not blocks:
    return 'none'
  return ', '.join(f'{b} ({"MoE" if kinds[b] == "moe" else "dense"})' for b in blocks)


def markdown(report: dict, base: float | None) -> str:
  kinds = {int(b): k for b, k in report['block_kinds'].items()}
  lines = [
    f'Accuracy of {report["workdir"]} (step {report["step"]}, {report["dataset"]} '
    f'{report["test_split"]}, {report["test_images"]} images) with the MLP output of some '
    'blocks set to zero.',
    '',
    f'| MLP output removed in blocks | {report["test_split"]} accuracy | change |',
    '| --- | ---: | ---: |',
  ]
  for row in report['rows']:
    change = '-' if base is None or not row['blocks'] else f'{100 * (row["accuracy"] - base):+.2f}'
    lines.append(f'| {_name(row["blocks"], kinds)} | {100 * row["accuracy"]:.2f}% | {change} |')
  return '\n'.join(lines) + '\n'
