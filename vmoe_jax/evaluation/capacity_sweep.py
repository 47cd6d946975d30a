"""Evaluation of a trained checkpoint: the capacity sweep per router, few-shot, the report.

The library of `python -m vmoe_jax.evaluate`; `run(workdir, ...)` does it all
and returns what eval.json holds (the maps: `vmoe_jax.evaluation.figures`).

For every eval capacity factor C of the sweep the test set is run through
the model; each row reports test accuracy, loss, images/s, the share of
assignments that an expert processed ('kept share', `reports.KEPT_SHARE`) and the
expert FLOPs these cost per image: the "compute saved by dropping patches"
curve of Riquelme et al. 2021 ("Scaling Vision with Sparse Mixture of
Experts", Sec. 4.1). What the sweep varies follows the router (`SWEEPS`):
top-k and image-level routing run every C with vanilla routing and with
Batch Prioritized Routing (BPR); Expert Choice every C without BPR (no token
priority exists); Soft MoE and dropless drop nothing: one row at the trained
setting, and a note in eval.md / eval.json.

Routing groups form over the images of one device's batch, so the numbers
depend on the batch: the training evaluation's batches are used
(`input.eval_batch_size` over the devices, padded with masked images, which
the model is told about) and `model.moe.group_size` from the config.
Images/s times the same jitted forward (padding rows included) on the first
batches, already on the devices, after a warm-up call, repeated for at least
`timing_seconds`. Runs in one process.

Axis letters: B images, T tokens per image, K' entries of a token's routing
view (K for top-k routers, E for Expert Choice, 1 for Soft MoE), E experts,
L classes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np

from vmoe_jax import inference
from vmoe_jax.data import input_pipeline
from vmoe_jax.errors import UserError
from vmoe_jax.errors import check_split
from vmoe_jax.evaluation import fewshot as fewshot_lib
from vmoe_jax.evaluation import figures
from vmoe_jax.evaluation import reports
from vmoe_jax.evaluation import routing_stats
from vmoe_jax.runtime import sharding
from vmoe_jax.schema import defaults

log = logging.getLogger(__name__)

DEFAULT_CAPACITY_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


@dataclasses.dataclass(frozen=True)
class Sweep:
  """How the capacity sweep applies to a router.

  capacity: the eval capacity factor changes the routing (else one row at
    the trained setting); priority: BPR changes it; note: for eval.md.
  """

  capacity: bool
  priority: bool
  note: str


SWEEPS = {
  'topk': Sweep(True, True, ''),
  'image_topk': Sweep(True, True, 'Image-level routing: capacity counts whole images.'),
  'expert_choice': Sweep(
    True,
    False,
    'Expert Choice: every expert takes its C x T / E best tokens per image, so no token '
    'priority exists and BPR does not apply (BPR rows would equal these and are left out).',
  ),
  'soft': Sweep(
    False,
    False,
    'Soft MoE: every slot mixes all tokens of its group and nothing is dropped; the slot '
    'count is fixed by the trained parameters, so the eval capacity factor changes nothing '
    'and there is no sweep: one row at the trained setting. Expert FLOPs are those of the '
    'slots (every slot is computed).',
  ),
  'dropless': Sweep(
    False,
    False,
    'Dropless: no capacity, every assignment is processed, so there is no sweep: one row at '
    'the trained setting. Buffer FLOPs count the block-padded rows of the grouped matmul.',
  ),
}


@dataclasses.dataclass(frozen=True)
class Setting:
  """Routing at evaluation: capacity factor C and BPR.

  capacity_factor None: as configured (a dense model, or a router without a
  sweep); batch_priority None: priority does not apply (Expert Choice).
  """

  capacity_factor: float | None
  batch_priority: bool | None

  @property
  def name(self) -> str:
    if self.capacity_factor is None:
      return 'as trained'
    if self.batch_priority is None:
      return f'C={self.capacity_factor:g}'
    return f'C={self.capacity_factor:g} {"BPR" if self.batch_priority else "vanilla"}'


def map_settings(spec, sweep: Sweep, example_capacity_factor: float) -> dict[str, list[Setting]]:
  """Settings the maps need: 'trained' (as evaluated in training), 'train_capacity' (as
  trained) and 'low' (the examples' low capacity, vanilla and BPR where they apply)."""
  if not sweep.capacity:
    trained = Setting(None, None)
    return {'trained': [trained], 'train_capacity': [trained], 'low': []}
  bpr = spec.eval_batch_priority if sweep.priority else None
  priorities = (False, True) if sweep.priority else (None,)
  return {
    'trained': [Setting(spec.eval_capacity_factor, bpr)],
    'train_capacity': [Setting(spec.capacity_factor, bpr)],
    'low': [Setting(float(example_capacity_factor), b) for b in priorities],
  }


def with_routing(model, setting: Setting):
  """`model` (a ViT) with its MoE layers evaluated at `setting` (None: as configured)."""
  if setting.capacity_factor is None or not model.moe:
    return model
  bpr = bool(setting.batch_priority)
  return model.clone(moe=model.moe.at_eval(setting.capacity_factor, bpr))


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


TIMING_ROUNDS = 5


def images_per_second(
  forward, params, device_images: list, min_seconds: float, min_rounds: int = TIMING_ROUNDS
) -> float:
  """Median rows per second of `forward` over rounds of all (images, mask) pairs.

  Rounds are repeated for at least `min_seconds` and `min_rounds`; the median
  of their rates, not the mean, so that a stall of a shared machine in one
  round does not move the figure (it does move a single timed round by up to
  8x between neighbouring settings).
  """
  jax.block_until_ready(forward(params, *device_images[0]))  # Warm-up (compiles if needed).
  rows = sum(batch[0].shape[0] for batch in device_images)
  rates, start = [], time.perf_counter()
  while len(rates) < min_rounds or time.perf_counter() - start < min_seconds:
    begin = time.perf_counter()
    jax.block_until_ready([forward(params, *batch) for batch in device_images])
    rates.append(rows / max(time.perf_counter() - begin, 1e-9))
  return float(np.median(rates))


class _Totals:
  """Sums over the real rows of the test batches of one setting."""

  def __init__(self, num_classes, num_experts, experts_choose, example_index):
    self.correct = self.loss = self.count = self.kept = 0.0
    self.assignments_per_image = 0
    self.tallies: dict[str, routing_stats.RoutingTally] = {}
    self.args = (num_experts, num_classes, experts_choose)
    self.wanted = [] if example_index is None else [int(i) for i in example_index]
    self.found: dict[int, dict[str, tuple]] = {}  # Test position -> {layer: (experts, slots)}.
    self.position = 0

  def add(self, batch, logits, routing) -> None:
    labels, mask = np.asarray(batch['label']), np.asarray(batch['mask']) > 0
    real_logits, real_labels = np.asarray(logits)[mask], labels[mask]
    self.correct += float(np.sum(np.argmax(real_logits, -1) == real_labels))
    self.loss += float(np.sum(softmax_cross_entropy(real_logits, real_labels)))
    self.count += float(np.sum(mask))
    valid_rows = np.flatnonzero(mask)
    picked = {
      self.position + i: r for i, r in enumerate(valid_rows) if self.position + i in self.wanted
    }
    self.assignments_per_image = 0
    for name, layer in routing.items():
      tally = self.tallies.setdefault(name, routing_stats.RoutingTally(*self.args))
      tally.add(layer, labels, mask)
      self.kept += float(np.sum(routing_stats.kept_per_image(layer.slot)[mask]))
      choices = 1 if tally.experts_choose else layer.slot.shape[2]
      self.assignments_per_image += layer.slot.shape[1] * choices
      for test_position, row in picked.items():
        self.found.setdefault(test_position, {})[name] = (layer.expert_index[row], layer.slot[row])
    self.position += len(valid_rows)

  def result(self) -> dict:
    count = max(self.count, 1.0)
    found, wanted = self.found, self.wanted
    examples = {
      name: tuple(np.stack([found[p][name][j] for p in wanted if p in found]) for j in (0, 1))
      for name in self.tallies
      if any(p in found for p in wanted)
    }
    return {
      'accuracy': self.correct / count,
      'loss': self.loss / count,
      'count': int(count),
      'kept_per_image': self.kept / count,
      'assignments_per_image': self.assignments_per_image,
      'layers': self.tallies,
      'examples': examples,
    }


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
  experts_choose: bool = False,
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
    experts_choose: the views are Expert Choice's (see `routing_stats.RoutingTally`).

  Returns:
    a dict with 'accuracy', 'loss', 'count', 'kept_per_image' (mean over
    test images of the kept assignments, all MoE layers), 'assignments_per_image'
    (T * K summed over MoE layers, K = 1 with experts_choose), 'images_per_sec',
    'layers' ({'block_XX': RoutingTally}) and 'examples' ({'block_XX':
    (expert_index, slot)} (n, T, K')).
  """
  totals = _Totals(num_classes, num_experts, experts_choose, example_index)
  device_images = []
  for batch in batches:
    images, device_mask = jax.device_put(
      (batch['image'], batch['mask']), sharding.batch_sharding(mesh)
    )
    if len(device_images) < timing_batches:
      device_images.append((images, device_mask))
    logits, routing = jax.device_get(forward(params, images, device_mask))
    totals.add(batch, logits, routing)
  out = totals.result()
  out['images_per_sec'] = images_per_second(forward, params, device_images, timing_seconds)
  return out


def sweep_settings(sweep: Sweep, capacity_factors, required: list[Setting]) -> list[Setting]:
  """The settings of the sweep, plus the `required` settings (those of the maps)."""
  settings = set(required)
  if sweep.capacity:
    priorities = (False, True) if sweep.priority else (None,)
    settings.update(Setting(float(c), b) for c in capacity_factors for b in priorities)
  return sorted(settings, key=lambda s: (s.capacity_factor or 0.0, bool(s.batch_priority)))


def check_arguments(capacity_factors, example_capacity_factor: float) -> None:
  for c in (*capacity_factors, example_capacity_factor):
    if not c > 0:
      raise UserError(f'capacity factor {c} must be > 0; pass e.g. --capacity_factors=0.5,1,2.')
  if jax.process_count() > 1:
    raise UserError('vmoe_jax.evaluate runs in one process; start it without a cluster.')


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

  Writes eval.json, eval.md and the PNGs (`figures`) into `output_dir`
  (default `workdir/eval`); returns what eval.json holds.
  """
  check_arguments(capacity_factors, example_capacity_factor)
  trained = inference.load(workdir, step=step, key='--workdir')
  config, mesh, spec = trained.config, trained.mesh, trained.model.moe
  output_dir = os.path.abspath(output_dir or os.path.join(workdir, 'eval'))
  os.makedirs(output_dir, exist_ok=True)
  check_split(
    config.input.eval_batch_size,
    mesh.size,
    f'input.eval_batch_size={config.input.eval_batch_size}',
    f'the {mesh.size} devices',
    'run on a device count that divides it.',
  )
  dataset = input_pipeline.create_dataset(config)
  sweep = maps = None
  settings = [Setting(None, None)]
  if spec is not None:
    sweep = SWEEPS[spec.router]
    maps = map_settings(spec, sweep, example_capacity_factor)
    settings = sweep_settings(sweep, capacity_factors, [s for v in maps.values() for s in v])
  example_index = figures.spread_positions(dataset.num_test, num_examples)
  results = _evaluate_all(trained, dataset, settings, example_index, timing_batches, timing_seconds)
  report = reports.build_report(workdir, output_dir, trained, dataset, results, maps, sweep)
  if spec is not None:
    examples = (*figures.test_arrays(dataset, example_index), example_index)
    report['files'].update(
      figures.write_maps(output_dir, report, results, maps, examples, trained.model)
    )
  if fewshot:
    report['fewshot'] = run_fewshot(trained.model, trained.params, mesh, dataset, config)
  results_md = os.path.join(os.path.abspath(workdir), 'results.md')
  if os.path.exists(results_md):
    report['files']['training_results'] = results_md
  with open(os.path.join(output_dir, 'eval.md'), 'w') as f:
    f.write(reports.header(report) + '\n' + reports.markdown(report['settings']))
  with open(os.path.join(output_dir, 'eval.json'), 'w') as f:
    json.dump(report, f, indent=2)
  return report


def _evaluate_all(trained, dataset, settings, example_index, timing_batches, timing_seconds):
  """{Setting: `evaluate_setting` result} of every setting, in order."""
  model, spec = trained.model, trained.model.moe
  results = {}
  for setting in settings:
    start = time.perf_counter()
    results[setting] = result = evaluate_setting(
      make_forward(with_routing(model, setting)),
      trained.params,
      dataset.eval_batches(),
      trained.mesh,
      trained.num_classes,
      spec.num_experts if spec is not None else 1,
      example_index,
      timing_batches,
      timing_seconds,
      experts_choose=spec is not None and spec.router == 'expert_choice',
    )
    log.info(
      '%-14s accuracy %.4f  (%.1fs)',
      setting.name,
      result['accuracy'],
      time.perf_counter() - start,
    )
  return results


def fewshot_config(config) -> ml_collections.ConfigDict:
  """The run's config.fewshot, or the defaults for runs made before it existed."""
  section = defaults.get_config().fewshot
  if 'fewshot' in config:
    section.update(config.fewshot.to_dict())
  return section


def run_fewshot(model, params, mesh, dataset, config) -> dict:
  section = fewshot_config(config)
  results = fewshot_lib.evaluate(
    fewshot_lib.make_feature_fn(model, mesh), params, dataset, mesh, section
  )
  return {
    'config': section.to_dict(),
    'features': 'pre-logits at the training eval capacity',
    'shots': {str(k): v for k, v in results.items()},
  }
