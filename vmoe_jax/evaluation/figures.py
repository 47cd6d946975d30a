"""The routing maps of an evaluation (`vmoe_jax.evaluation.capacity_sweep`): test images and PNGs.

Written into the output directory:

  accuracy_vs_compute.png accuracy against expert FLOPs/image, vanilla vs BPR
                          (routers with a capacity sweep only)
  expert_load.png         per MoE layer: assignments chosen / kept per expert at
                          the training capacity factor (Expert Choice: first
                          choices and taken (token, expert) pairs, per token)
  class_expert.png        per MoE layer: class x expert share of first choices
  examples.png            test images beside their patch -> expert grid (last
                          MoE layer) at the training eval capacity and at a low
                          capacity, vanilla and BPR where they apply, skipped
                          patches crossed

Every map reads the per-token routing views (`routing.Routing` (B, T, K'))
that the MoE layers sow: first choice = expert_index[..., 0], kept = slot >= 0.
"""

from __future__ import annotations

import os

import numpy as np

from vmoe_jax.evaluation import routing_maps
from vmoe_jax.evaluation import routing_stats


def spread_positions(num_test: int, num: int) -> np.ndarray:
  """`num` test positions spread evenly over the test set: 0, N/num, 2N/num, ...

  Spread rather than the first images: vanilla routing fills expert slots in
  token order, so the first images of a routing group are never dropped.
  """
  return np.unique(np.arange(num) * num_test // max(num, 1))


def test_arrays(dataset, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Images (n, H, W, C) and labels (n,) of the test images at `positions` (eval-batch order)."""
  wanted = {int(p): i for i, p in enumerate(positions)}
  images, labels, position = [None] * len(positions), [None] * len(positions), 0
  for batch in dataset.eval_batches():
    for row in np.flatnonzero(np.asarray(batch['mask']) > 0):
      if position in wanted:
        images[wanted[position]] = batch['image'][row]
        labels[wanted[position]] = int(batch['label'][row])
      position += 1
  return np.stack(images), np.asarray(labels)


def write_maps(output_dir: str, report: dict, results: dict, maps: dict, examples, model) -> dict:
  """The PNGs; returns {map: file name}.

  Args:
    output_dir: where they go.
    report: the eval.json dict so far ('settings', 'step', 'dataset', 'sweep', ...).
    results: {Setting: `evaluation.evaluate_setting` output}.
    maps: from `evaluation.map_settings`: 'trained', 'train_capacity', 'low'.
    examples: test images (n, H, W, C), labels (n,), positions (n,).
    model: the ViT.
  """
  files = {}
  if report['sweep']['capacity']:
    files['accuracy_vs_compute'] = _accuracy_vs_compute(output_dir, report)
  num_experts = model.moe.num_experts
  experts_choose = model.moe.router == 'expert_choice'
  train_capacity = maps['train_capacity'][0]
  routing_maps.plot_expert_load(
    {name: tally.summary() for name, tally in results[train_capacity]['layers'].items()},
    os.path.join(output_dir, 'expert_load.png'),
    num_experts,
    capacity_factor=train_capacity.capacity_factor,
    title=f'Expert load on the test set at the training capacity ({train_capacity.name})',
    experts_choose=experts_choose,
  )
  files['expert_load'] = 'expert_load.png'
  trained = maps['trained'][0]
  routing_maps.plot_class_expert(
    {
      name: routing_stats.row_shares(tally.class_expert)
      for name, tally in results[trained]['layers'].items()
    },
    os.path.join(output_dir, 'class_expert.png'),
    title=f"Share of each class's tokens per first-choice expert ({trained.name})",
  )
  files['class_expert'] = 'class_expert.png'
  files['examples'] = _examples(output_dir, report, results, maps, examples, model)
  return files


def _accuracy_vs_compute(output_dir: str, report: dict) -> str:
  routing_maps.plot_accuracy_vs_compute(
    [r for r in report['settings'] if r['capacity_factor'] is not None],
    os.path.join(output_dir, 'accuracy_vs_compute.png'),
    report['full_expert_flops_per_image'],
    title=f'{report["dataset"]} step {report["step"]}: accuracy against expert compute '
    f'({report["images_per_group"]} images per routing group)',
    num_test=report.get('num_test'),
  )
  return 'accuracy_vs_compute.png'


def _examples(output_dir: str, report: dict, results: dict, maps: dict, examples, model) -> str:
  """examples.png: the last MoE layer's first-choice expert of every patch, per setting."""
  images, labels, positions = examples
  trained = maps['trained'][0]
  last = sorted(results[trained]['examples'])[-1]
  grid = (images.shape[1] // model.patch_size, images.shape[2] // model.patch_size)
  has_cls = model.classifier == 'token'
  panels = []
  for setting in (trained, *maps['low']):
    expert_index, slot = results[setting]['examples'][last]
    grids = [routing_stats.patch_grid(e, s, grid, has_cls) for e, s in zip(expert_index, slot)]
    panels.append((setting.name, np.stack([g[0] for g in grids]), np.stack([g[1] for g in grids])))
  order = {
    'topk': 'vanilla routing fills expert slots in image order, BPR by router confidence.',
    'image_topk': 'whole images are routed; vanilla fills slots in image order, BPR by gate.',
    'expert_choice': 'every expert takes the tokens with its largest gates.',
    'soft': 'a patch shows the expert of its largest combine weight; nothing is dropped.',
  }.get(model.moe.router, 'nothing is dropped.')
  routing_maps.plot_examples(
    images,
    [f'test image {p}, label {int(y)}' for p, y in zip(positions, labels)],
    panels,
    model.moe.num_experts,
    os.path.join(output_dir, 'examples.png'),
    title=f'Patch -> first-choice expert in {last} (last MoE layer); x: no expert processed it.\n'
    f'Routing groups of {report["images_per_group"]} test images; {order}',
  )
  return 'examples.png'
