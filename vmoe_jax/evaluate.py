r"""Evaluation of a trained checkpoint: capacity sweep, routing maps, few-shot.

  python -m vmoe_jax.evaluate --workdir=/tmp/digits_switch \
      [--capacity_factors=0.25,0.5,0.75,1.0,1.25,1.5,2.0] [--step=N] \
      [--output_dir=/tmp/digits_switch/eval] [--example_capacity_factor=0.5] [--nofewshot]

The workdir of a training run holds everything needed (config.json,
dataset.json, checkpoints/). For every eval capacity factor C of the sweep,
with vanilla routing and with Batch Prioritized Routing (BPR; Riquelme et al.
2021, "Scaling Vision with Sparse Mixture of Experts", Sec. 4.1), the test
set is run through the model and the command reports test accuracy, loss,
images/s, the share of (token, choice) assignments that an expert processed
("kept") and the expert FLOPs that these cost per image: the paper's
"compute saved by dropping patches" curve, accuracy against compute. Into
`output_dir` (default `workdir/eval`):

  eval.json               every figure below, the setup (batch, group), few-shot
  eval.md                 the sweep as a table
  accuracy_vs_compute.png accuracy against expert FLOPs/image, vanilla vs BPR
  expert_load.png         per MoE layer: assignments chosen / kept per expert at
                          the training capacity factor
  class_expert.png        per MoE layer: class x expert share of first choices
  examples.png            test images beside their patch -> expert grid (last
                          MoE layer) at the training eval capacity and at a low
                          capacity, vanilla and BPR, skipped patches crossed

Routing groups form over the images of one device's batch, so the numbers
depend on the batch: the command uses the training evaluation's batches
(`input.eval_batch_size` over the devices, padded with masked images) and
`model.moe.group_size` from the config, and records both in eval.json.
Images/s times the same jitted forward (padding rows included) on the first
batches, already on the devices, after a warm-up call, repeated for at least
`--timing_seconds`. Runs in one process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from vmoe_jax import config_defaults
from vmoe_jax import fewshot as fewshot_lib
from vmoe_jax import flops
from vmoe_jax import host_malloc
from vmoe_jax import inference
from vmoe_jax import input_pipeline
from vmoe_jax import routing_maps
from vmoe_jax import routing_stats
from vmoe_jax import sharding
from vmoe_jax.errors import UserError
from vmoe_jax.moe.spec import MoeSpec

log = logging.getLogger(__name__)

DEFAULT_CAPACITY_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


@dataclasses.dataclass(frozen=True)
class Setting:
  """Routing at evaluation: capacity factor C (None: the model has no MoE) and BPR."""

  capacity_factor: float | None
  batch_priority: bool

  @property
  def name(self) -> str:
    if self.capacity_factor is None:
      return 'dense'
    return f'C={self.capacity_factor:g} {"BPR" if self.batch_priority else "vanilla"}'


def with_routing(model, setting: Setting):
  """`model` (a ViT) with its MoE layers evaluated at `setting`."""
  if setting.capacity_factor is None or not model.moe:
    return model
  return model.clone(moe=model.moe.at_eval(setting.capacity_factor, setting.batch_priority))


def make_forward(model):
  """Jitted (params, images (B, H, W, C), mask (B,)) -> (logits (B, L), {'block_XX': Routing}).

  Padding rows (mask 0) take no expert capacity (`vmoe_jax.moe.routers`).
  """

  def forward(params, images, mask):
    (logits, _), state = model.apply(
      {'params': params}, images, train=False, mask=mask, mutable=['intermediates']
    )
    return logits, routing_stats.moe_routing(state.get('intermediates', {}))

  return jax.jit(forward)


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Per-example loss in float64: (B, L), (B,) -> (B,)."""
  logits = np.asarray(logits, np.float64)
  top = logits.max(axis=-1, keepdims=True)
  log_norm = top[:, 0] + np.log(np.sum(np.exp(logits - top), axis=-1))
  return log_norm - logits[np.arange(len(labels)), labels]


def images_per_second(forward, params, device_images: list, min_seconds: float) -> float:
  """Rows per second of `forward` over (images, mask) pairs, repeated for >= min_seconds."""
  jax.block_until_ready(forward(params, *device_images[0]))  # Warm-up (compiles if needed).
  rows, start = 0, time.perf_counter()
  while True:
    jax.block_until_ready([forward(params, *batch) for batch in device_images])
    rows += sum(batch[0].shape[0] for batch in device_images)
    elapsed = time.perf_counter() - start
    if elapsed >= min_seconds:
      return rows / elapsed


def evaluate_setting(
  forward,
  params,
  batches,
  mesh,
  num_classes: int,
  num_experts: int,
  example_index: np.ndarray | None = None,
  timing_batches: int = 4,
  timing_seconds: float = 0.5,
) -> dict:
  """Accuracy, loss, kept assignments and routing tallies over padded test batches.

  Args:
    forward: from `make_forward`.
    params: on `mesh`.
    batches: iterable of {'image', 'label', 'mask'} (the whole global batch).
    mesh: the device mesh.
    num_classes, num_experts: L, E.
    example_index: test positions whose per-token routing is kept (examples).
    timing_batches, timing_seconds: images/s is measured on the first
      `timing_batches` batches, repeated for at least `timing_seconds`.

  Returns:
    a dict with 'accuracy', 'loss', 'count', 'kept_per_image' (mean over
    test images of the kept assignments, all MoE layers), 'assignments_per_image'
    (T * K summed over MoE layers), 'images_per_sec', 'layers' ({'block_XX':
    RoutingTally}) and 'examples' ({'block_XX': (expert_index, slot)} (n, T, K)).
  """
  correct = loss = count = kept = 0.0
  assignments_per_image = 0
  tallies: dict[str, routing_stats.RoutingTally] = {}
  wanted = [] if example_index is None else [int(i) for i in example_index]
  found: dict[int, dict[str, tuple]] = {}  # Test position -> {layer: (expert_index, slot)}.
  device_images, position = [], 0
  for batch in batches:
    images, device_mask = jax.device_put(
      (batch['image'], batch['mask']), sharding.batch_sharding(mesh)
    )
    if len(device_images) < timing_batches:
      device_images.append((images, device_mask))
    logits, routing = jax.device_get(forward(params, images, device_mask))
    labels, mask = np.asarray(batch['label']), np.asarray(batch['mask']) > 0
    correct += float(np.sum((np.argmax(logits, -1) == labels) & mask))
    loss += float(np.sum(softmax_cross_entropy(logits, labels) * mask))
    count += float(np.sum(mask))
    valid_rows = np.flatnonzero(mask)
    picked = {position + i: row for i, row in enumerate(valid_rows) if position + i in wanted}
    assignments_per_image = 0
    for name, layer in routing.items():
      tallies.setdefault(name, routing_stats.RoutingTally(num_experts, num_classes))
      tallies[name].add(layer, labels, mask)
      kept += float(np.sum(routing_stats.kept_per_image(layer.slot)[mask]))
      assignments_per_image += layer.slot.shape[1] * layer.slot.shape[2]
      for test_position, row in picked.items():
        found.setdefault(test_position, {})[name] = (layer.expert_index[row], layer.slot[row])
    position += len(valid_rows)
  count = max(count, 1.0)
  examples = {
    name: tuple(np.stack([found[p][name][j] for p in wanted if p in found]) for j in (0, 1))
    for name in tallies
    if any(p in found for p in wanted)
  }
  return {
    'accuracy': correct / count,
    'loss': loss / count,
    'count': int(count),
    'kept_per_image': kept / count,
    'assignments_per_image': assignments_per_image,
    'images_per_sec': images_per_second(forward, params, device_images, timing_seconds),
    'layers': tallies,
    'examples': examples,
  }


def spread_positions(num_test: int, num: int) -> np.ndarray:
  """`num` test positions spread evenly over the test set: 0, N/num, 2N/num, ...

  Spread rather than the first images: vanilla routing fills expert slots in
  token order, so the first images of a routing group are never dropped.
  """
  return np.unique(np.arange(num) * num_test // max(num, 1))


def sweep_settings(capacity_factors, required: list[Setting]) -> list[Setting]:
  """Every C with and without BPR, plus the `required` settings (those of the maps)."""
  settings = {Setting(float(c), bpr) for c in capacity_factors for bpr in (False, True)}
  settings.update(required)
  return sorted(settings, key=lambda s: (s.capacity_factor, s.batch_priority))


def _test_arrays(dataset, positions: np.ndarray):
  """Images and labels of the test images at `positions` (in eval-batch order)."""
  wanted = {int(p): i for i, p in enumerate(positions)}
  images, labels, position = [None] * len(positions), [None] * len(positions), 0
  for batch in dataset.eval_batches():
    for row in np.flatnonzero(np.asarray(batch['mask']) > 0):
      if position in wanted:
        images[wanted[position]] = batch['image'][row]
        labels[wanted[position]] = int(batch['label'][row])
      position += 1
  return np.stack(images), np.asarray(labels)


def _fewshot_config(config) -> ml_collections.ConfigDict:
  """The run's config.fewshot, or the defaults for runs made before it existed."""
  section = config_defaults.get_config().fewshot
  if 'fewshot' in config:
    section.update(config.fewshot.to_dict())
  return section


def _row(setting: Setting, result: dict, model, image_shape, images_per_group: int) -> dict:
  """The JSON row of one setting of the sweep."""
  row = {
    'capacity_factor': setting.capacity_factor,
    'batch_priority': setting.batch_priority,
    'accuracy': result['accuracy'],
    'loss': result['loss'],
    'images_per_sec': result['images_per_sec'],
  }
  if setting.capacity_factor is None:
    row['total_flops_per_image'] = flops.forward_flops(model, image_shape)['total']
    return row
  buffers = flops.forward_flops(
    model,
    image_shape,
    capacity_factor=setting.capacity_factor,
    images_per_group=images_per_group,
  )
  row.update(
    kept_share=result['kept_per_image'] / max(result['assignments_per_image'], 1),
    kept_assignments_per_image=result['kept_per_image'],
    expert_flops_per_image=flops.expert_flops_per_image(model, result['kept_per_image']),
    # What the hardware runs: full capacity buffers, padding included.
    buffer_expert_flops_per_image=buffers['experts'],
    buffer_total_flops_per_image=buffers['total'],
    layers={name: tally.summary() for name, tally in result['layers'].items()},
  )
  return row


def markdown(rows: list[dict]) -> str:
  """The sweep as a markdown table."""
  moe = any(r['capacity_factor'] is not None for r in rows)
  unit, scale = routing_maps.flops_unit(
    [r.get('expert_flops_per_image', 0.0) for r in rows] or [0.0]
  )
  if not moe:
    lines = ['| routing | accuracy | loss | images/s |', '| --- | ---: | ---: | ---: |']
    for r in rows:
      lines.append(
        f'| dense | {100 * r["accuracy"]:.2f}% | {r["loss"]:.4f} | {r["images_per_sec"]:.0f} |'
      )
    return '\n'.join(lines) + '\n'
  lines = [
    f'| C | routing | accuracy | loss | kept share | expert {unit}/image | '
    f'buffer {unit}/image (experts) | images/s |',
    '| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for r in rows:
    lines.append(
      f'| {r["capacity_factor"]:g} | {"BPR" if r["batch_priority"] else "vanilla"} | '
      f'{100 * r["accuracy"]:.2f}% | {r["loss"]:.4f} | {100 * r["kept_share"]:.1f}% | '
      f'{r["expert_flops_per_image"] / scale:.4g} | '
      f'{r["buffer_expert_flops_per_image"] / scale:.4g} | {r["images_per_sec"]:.0f} |'
    )
  return '\n'.join(lines) + '\n'


def run(
  workdir: str,
  capacity_factors=DEFAULT_CAPACITY_FACTORS,
  step: int | None = None,
  output_dir: str | None = None,
  example_capacity_factor: float = 0.5,
  num_examples: int = 6,
  fewshot: bool = True,
  timing_batches: int = 4,
  timing_seconds: float = 0.5,
) -> dict:
  """Runs the sweep, the routing maps and few-shot on a checkpoint of `workdir`.

  Returns what eval.json holds; see the module docstring for the files.
  """
  for c in (*capacity_factors, example_capacity_factor):
    if not c > 0:
      raise UserError(f'capacity factor {c} must be > 0; pass e.g. --capacity_factors=0.5,1,2.')
  if jax.process_count() > 1:
    raise UserError('vmoe_jax.evaluate runs in one process; start it without a cluster.')
  trained = inference.load(workdir, step=step)
  config, model, mesh = trained.config, trained.model, trained.mesh
  output_dir = os.path.abspath(output_dir or os.path.join(workdir, 'eval'))
  os.makedirs(output_dir, exist_ok=True)
  if config.input.eval_batch_size % mesh.size:
    raise UserError(
      f'input.eval_batch_size={config.input.eval_batch_size} does not split over the '
      f'{mesh.size} devices; run on a device count that divides it.'
    )
  dataset = input_pipeline.create_dataset(config)
  num_classes, image_shape = trained.num_classes, trained.image_shape
  has_moe = bool(model.moe)
  num_experts = config.model.moe.num_experts if has_moe else 0
  images_per_group = config.model.moe.group_size or config.input.eval_batch_size // mesh.size
  maps = _map_settings(config, example_capacity_factor)
  settings = (
    sweep_settings(capacity_factors, [s for v in maps.values() for s in v])
    if has_moe
    else [Setting(None, False)]
  )
  example_index = spread_positions(dataset.num_test, num_examples)

  rows, results = [], {}
  for setting in settings:
    start = time.perf_counter()
    result = evaluate_setting(
      make_forward(with_routing(model, setting)),
      trained.params,
      dataset.eval_batches(),
      mesh,
      num_classes,
      max(num_experts, 1),
      example_index,
      timing_batches,
      timing_seconds,
    )
    results[setting] = result
    rows.append(_row(setting, result, model, image_shape, images_per_group))
    log.info(
      '%-14s accuracy %.4f  kept %s  (%.1fs)',
      setting.name,
      result['accuracy'],
      f'{100 * rows[-1]["kept_share"]:.1f}%' if has_moe else '-',
      time.perf_counter() - start,
    )

  report = {
    'workdir': os.path.abspath(workdir),
    'output_dir': output_dir,
    'step': trained.step,
    'dataset': dataset.name,
    'num_test': dataset.num_test,
    'devices': mesh.size,
    'mesh': dict(mesh.shape),
    'eval_batch_size': config.input.eval_batch_size,
    'images_per_group': images_per_group if has_moe else None,
    'trained_setting': dataclasses.asdict(maps['trained'][0]) if has_moe else None,
    'settings': rows,
    'files': {'table': 'eval.md'},
  }
  if has_moe:
    report['full_expert_flops_per_image'] = flops.forward_flops(model, image_shape)['experts']
    # What class_expert.png shows: (L, E) shares of each class's first choices, per layer.
    report['class_expert_share'] = {
      name: routing_stats.row_shares(tally.class_expert).round(4).tolist()
      for name, tally in results[maps['trained'][0]]['layers'].items()
    }
    report['files'].update(
      _write_maps(
        output_dir,
        report,
        results,
        maps,
        (*_test_arrays(dataset, example_index), example_index),
        model,
        image_shape,
      )
    )
  if fewshot:
    report['fewshot'] = _run_fewshot(model, trained.params, mesh, dataset, config)
  results_md = os.path.join(os.path.abspath(workdir), 'results.md')
  if os.path.exists(results_md):
    report['files']['training_results'] = results_md
  with open(os.path.join(output_dir, 'eval.md'), 'w') as f:
    f.write(markdown(rows))
  with open(os.path.join(output_dir, 'eval.json'), 'w') as f:
    json.dump(report, f, indent=2)
  return report


def _run_fewshot(model, params, mesh, dataset, config) -> dict:
  section = _fewshot_config(config)
  results = fewshot_lib.evaluate(
    fewshot_lib.make_feature_fn(model, mesh), params, dataset, mesh, section
  )
  return {
    'config': section.to_dict(),
    'features': 'pre-logits at the training eval capacity',
    'shots': {str(k): v for k, v in results.items()},
  }


def _map_settings(config, example_capacity_factor: float) -> dict[str, list[Setting]]:
  """Settings the maps need: 'trained' (as evaluated in training), 'train_capacity' (as
  trained) and 'low' (the examples' low capacity, vanilla and BPR)."""
  spec = MoeSpec.from_config(config)
  bpr = spec.eval_batch_priority
  return {
    'trained': [Setting(spec.eval_capacity_factor, bpr)],
    'train_capacity': [Setting(spec.capacity_factor, bpr)],
    'low': [Setting(float(example_capacity_factor), b) for b in (False, True)],
  }


def _write_maps(output_dir, report, results, maps, examples, model, image_shape) -> dict:
  """The four PNGs; returns their file names.

  Args:
    output_dir: where they go.
    report: the eval.json dict so far ('settings', 'step', 'dataset', ...).
    results: {Setting: `evaluate_setting` output}.
    maps: from `_map_settings`.
    examples: test images (n, H, W, C), labels (n,), positions (n,).
    model: the ViT.
    image_shape: (H, W, C).
  """
  rows = [r for r in report['settings'] if r['capacity_factor'] is not None]
  num_experts = model.moe.num_experts
  trained_setting, train_capacity = maps['trained'][0], maps['train_capacity'][0]
  step = report['step']
  routing_maps.plot_accuracy_vs_compute(
    rows,
    os.path.join(output_dir, 'accuracy_vs_compute.png'),
    report['full_expert_flops_per_image'],
    title=f'{report["dataset"]} step {step}: accuracy against expert compute '
    f'({report["images_per_group"]} images per routing group)',
  )
  reference = results[trained_setting]
  routing_maps.plot_expert_load(
    {name: tally.summary() for name, tally in results[train_capacity]['layers'].items()},
    os.path.join(output_dir, 'expert_load.png'),
    num_experts,
    capacity_factor=train_capacity.capacity_factor,
    title=f'Expert load on the test set at the training capacity ({train_capacity.name})',
  )
  routing_maps.plot_class_expert(
    {
      name: routing_stats.row_shares(tally.class_expert)
      for name, tally in reference['layers'].items()
    },
    os.path.join(output_dir, 'class_expert.png'),
    title=f"Share of each class's tokens per first-choice expert ({trained_setting.name})",
  )
  images, labels, positions = examples
  last = sorted(reference['examples'])[-1]
  patch = model.patch_size
  grid = (image_shape[0] // patch, image_shape[1] // patch)
  has_cls = model.classifier == 'token'
  panels = []
  for setting in (trained_setting, *maps['low']):
    expert_index, slot = results[setting]['examples'][last]
    grids = [routing_stats.patch_grid(e, s, grid, has_cls) for e, s in zip(expert_index, slot)]
    panels.append((setting.name, np.stack([g[0] for g in grids]), np.stack([g[1] for g in grids])))
  routing_maps.plot_examples(
    images,
    [f'test image {p}, label {int(y)}' for p, y in zip(positions, labels)],
    panels,
    num_experts,
    os.path.join(output_dir, 'examples.png'),
    title=f'Patch -> first-choice expert in {last} (last MoE layer); x: no expert processed it.\n'
    f'Routing groups of {report["images_per_group"]} test images; vanilla routing fills expert '
    'slots in image order, BPR by router confidence.',
  )
  return {
    'accuracy_vs_compute': 'accuracy_vs_compute.png',
    'expert_load': 'expert_load.png',
    'class_expert': 'class_expert.png',
    'examples': 'examples.png',
  }


# --------------------------------------------------------------------------- command line


def main(argv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('vmoe_jax').setLevel(logging.INFO)
  values = flags.FLAGS
  try:
    if not values.workdir:
      raise UserError('--workdir=DIR (a training run) is needed.')
    try:
      factors = [float(c) for c in values.capacity_factors]
    except ValueError:
      raise UserError(
        f'--capacity_factors={",".join(values.capacity_factors)} is not a list of numbers; '
        'pass e.g. --capacity_factors=0.25,0.5,1,2.'
      ) from None
    report = run(
      values.workdir,
      factors,
      step=values.step,
      output_dir=values.output_dir,
      example_capacity_factor=values.example_capacity_factor,
      num_examples=values.num_examples,
      fewshot=values.fewshot,
      timing_seconds=values.timing_seconds,
    )
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(markdown(report['settings']), end='')
  for k, r in report.get('fewshot', {}).get('shots', {}).items():
    print(
      f'few-shot {k:>2}-shot: {100 * r["accuracy"]:.2f}% +- {100 * r["accuracy_std"]:.2f} '
      f'(L2 chosen on held-out train images; best over the L2 sweep '
      f'{100 * r["best_over_sweep"]:.2f}%)'
    )
  print(f'wrote eval.json, eval.md and the PNGs to {report["output_dir"]}')


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string('workdir', None, 'The --workdir of a training run.')
  flags.DEFINE_list(
    'capacity_factors',
    [f'{c:g}' for c in DEFAULT_CAPACITY_FACTORS],
    'Eval capacity factors of the sweep (each with and without BPR).',
  )
  flags.DEFINE_integer('step', None, 'Checkpoint to evaluate; default the latest.')
  flags.DEFINE_string('output_dir', None, 'Where the files go; default WORKDIR/eval.')
  flags.DEFINE_float(
    'example_capacity_factor', 0.5, 'Low capacity factor of the example routing maps.'
  )
  flags.DEFINE_integer('num_examples', 6, 'Test images in examples.png (spread over the test set).')
  flags.DEFINE_bool('fewshot', True, 'Run few-shot linear evaluation on pre-logits.')
  flags.DEFINE_float('timing_seconds', 0.5, 'Minimum seconds of timed forward passes per setting.')


if __name__ == '__main__':
  host_malloc.maybe_reexec()  # CPU hosts: restart with glibc tunables, see host_malloc.
  from absl import app  # pylint: disable=g-import-not-at-top

  _define_flags()
  app.run(main)
