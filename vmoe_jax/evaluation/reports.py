"""The report of an evaluation: eval.json's rows and summary, eval.md's header and table.

`build_report` gathers what eval.json holds (without the files of the maps
and few-shot) from the results of `evaluation.run`'s settings, one
`setting_row` per setting (accuracy, loss, images/s, kept share,
expert and buffer FLOPs per image); `header` and `markdown` write eval.md
(also printed by `python -m vmoe_jax.evaluate`). `KEPT_SHARE` explains the
kept-share column.
"""

from __future__ import annotations

import dataclasses
import os

from vmoe_jax.evaluation import routing_maps
from vmoe_jax.evaluation import routing_stats
from vmoe_jax.models import flops

KEPT_SHARE = (
  'kept share: the (token, expert) assignments that an expert processed, per image, over '
  'T x K (T tokens per image, K experts per token); K = 1 for Expert Choice, where the share '
  'is then the mean number of experts per token (up to E; about C when every expert fills '
  'its C x T / E slots per image), and for Soft MoE, whose tokens are all processed.'
)


def setting_row(setting, result: dict, model, image_shape, images_per_group: int):
  """The JSON row of one setting of the sweep."""
  row = {
    'capacity_factor': setting.capacity_factor,
    'batch_priority': setting.batch_priority,
    'accuracy': result['accuracy'],
    'loss': result['loss'],
    'images_per_sec': result['images_per_sec'],
  }
  spec = model.moe
  if spec is None:
    row['total_flops_per_image'] = flops.forward_flops(model, image_shape)['total']
    return row
  buffers = flops.forward_flops(
    model,
    image_shape,
    capacity_factor=setting.capacity_factor or spec.eval_capacity_factor,
    images_per_group=images_per_group,
  )
  kept = result['kept_per_image']
  expert_flops = flops.expert_flops_per_image(model, kept)
  if spec.router == 'soft':  # Its view counts tokens; the experts compute every slot.
    expert_flops = buffers['experts']
  row.update(
    kept_share=kept / max(result['assignments_per_image'], 1),
    kept_assignments_per_image=kept,
    expert_flops_per_image=expert_flops,
    # What the hardware runs: full capacity buffers, padding included.
    buffer_expert_flops_per_image=buffers['experts'],
    buffer_total_flops_per_image=buffers['total'],
    layers={name: tally.summary() for name, tally in result['layers'].items()},
  )
  return row


def _routing_name(row: dict) -> str:
  if row['capacity_factor'] is None:
    return 'as trained'
  if row['batch_priority'] is None:
    return 'experts choose'
  return 'BPR' if row['batch_priority'] else 'vanilla'


def markdown(rows: list[dict]) -> str:
  """The sweep as a markdown table."""
  if 'kept_share' not in rows[0]:
    lines = ['| routing | accuracy | loss | images/s |', '| --- | ---: | ---: | ---: |']
    for r in rows:
      lines.append(
        f'| dense | {100 * r["accuracy"]:.2f}% | {r["loss"]:.4f} | {r["images_per_sec"]:.0f} |'
      )
    return '\n'.join(lines) + '\n'
  unit, scale = routing_maps.flops_unit([r['expert_flops_per_image'] for r in rows])
  lines = [
    f'| C | routing | accuracy | loss | kept share | expert {unit}/image | '
    f'buffer {unit}/image (experts) | images/s |',
    '| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for r in rows:
    capacity = '-' if r['capacity_factor'] is None else f'{r["capacity_factor"]:g}'
    lines.append(
      f'| {capacity} | {_routing_name(r)} | '
      f'{100 * r["accuracy"]:.2f}% | {r["loss"]:.4f} | {100 * r["kept_share"]:.1f}% | '
      f'{r["expert_flops_per_image"] / scale:.4g} | '
      f'{r["buffer_expert_flops_per_image"] / scale:.4g} | {r["images_per_sec"]:.0f} |'
    )
  return '\n'.join(lines) + '\n'


IMAGES_PER_SEC = (
  'images/s: the median over timed rounds of the first test batches, each setting in turn; '
  'a time, not a count: it depends on the machine and on what else runs on it.'
)


def header(report: dict) -> str:
  """The lines above the table in eval.md: what was evaluated, the router's note."""
  lines = [f'# {report["family"]}, step {report["step"]}, {report["dataset"]} test set', '']
  lines += [IMAGES_PER_SEC, '']
  if report['router'] is not None:
    group = report['images_per_group']
    lines += [f'Router {report["router"]!r}, routing groups of {group} test images.', '']
    if report['sweep']['note']:
      lines += [report['sweep']['note'], '']
    lines += [KEPT_SHARE, '']
  return '\n'.join(lines)


def build_report(workdir, output_dir, trained, dataset, results, maps, sweep) -> dict:
  """eval.json without the files of the maps and few-shot."""
  config, mesh, model = trained.config, trained.mesh, trained.model
  spec = model.moe
  images_per_group = (
    spec.images_per_group(config.input.eval_batch_size // mesh.size) if spec else None
  )
  rows = [
    setting_row(setting, result, model, trained.image_shape, images_per_group)
    for setting, result in results.items()
  ]
  report = {
    'workdir': os.path.abspath(workdir),
    'output_dir': output_dir,
    'step': trained.step,
    'dataset': dataset.name,
    'num_test': dataset.num_test,
    'devices': mesh.size,
    'mesh': dict(mesh.shape),
    'eval_batch_size': config.input.eval_batch_size,
    'router': spec.router if spec else None,
    'family': spec.family if spec else 'dense ViT',
    'sweep': dataclasses.asdict(sweep) if sweep else None,
    'kept_share': KEPT_SHARE if spec else None,
    'images_per_group': images_per_group,
    'trained_setting': dataclasses.asdict(maps['trained'][0]) if spec else None,
    'settings': rows,
    'files': {'table': 'eval.md'},
  }
  if spec is not None:
    report['full_expert_flops_per_image'] = flops.forward_flops(
      model, trained.image_shape, images_per_group=images_per_group
    )['experts']
    # What class_expert.png shows: (L, E) shares of each class's first choices, per layer.
    report['class_expert_share'] = {
      name: routing_stats.row_shares(tally.class_expert).round(4).tolist()
      for name, tally in results[maps['trained'][0]]['layers'].items()
    }
  return report
