"""Training and evaluation of ViTs and MoE ViTs: `train_and_evaluate(config, workdir)`.

Reads top to bottom:
  mesh ('data', 'expert') -> dataset (this process's rows) -> model
  -> abstract state (jax.eval_shape) -> shardings from the model's partition
     marks -> jitted init with out_shardings
  -> resume: if workdir/checkpoints has a checkpoint, restore it onto this
     mesh (state, then the input position = its step); else start at step 0
  -> jitted train_step (donated state) and eval_step
  -> loop: step, log (JSONL + TensorBoard + progress line), evaluate,
     checkpoint; SIGTERM / Ctrl-C save a checkpoint and stop
  -> final evaluation, final checkpoint, results table.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils

from vmoe_jax import checkpointing
from vmoe_jax import config_defaults
from vmoe_jax import fewshot
from vmoe_jax import input_pipeline
from vmoe_jax import metrics as metrics_lib
from vmoe_jax import optim
from vmoe_jax import results as results_lib
from vmoe_jax import schedules
from vmoe_jax import sharding
from vmoe_jax import steps
from vmoe_jax import validation
from vmoe_jax.errors import UserError
from vmoe_jax.models import factory

log = logging.getLogger(__name__)


def evaluate(eval_fn, params, dataset: input_pipeline.Dataset, mesh) -> dict[str, float]:
  """Accuracy, loss (and MoE dropped share) over the test split."""
  totals = None
  for batch in dataset.eval_batches():
    sums = eval_fn(params, sharding.global_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = max(float(totals['count']), 1.0)
  out = {'accuracy': float(totals['correct']) / count, 'loss': float(totals['loss']) / count}
  if 'dropped' in totals:
    out['moe_dropped'] = float(totals['dropped']) / count
  return out


def _inference_speed(eval_fn, params, dataset, mesh, max_batches: int = 20) -> float:
  """Test images per second of the (already compiled) eval step, all processes."""
  batches = []
  for batch in dataset.eval_batches():
    batches.append(sharding.global_batch(batch, mesh))
    if len(batches) == max_batches:
      break
  jax.block_until_ready(eval_fn(params, batches[0]))  # Compiled by now; warm.
  start = time.perf_counter()
  outputs = [eval_fn(params, batch) for batch in batches]
  jax.block_until_ready(outputs)
  images = len(batches) * batches[0]['label'].shape[0]
  return images / max(time.perf_counter() - start, 1e-9)


# --------------------------------------------------------------------------- setup


def num_train_steps(config, dataset: input_pipeline.Dataset) -> tuple[int, float]:
  steps_per_epoch = dataset.num_train / config.input.batch_size
  if config.train.num_epochs > 0:
    return max(1, math.ceil(config.train.num_epochs * steps_per_epoch)), steps_per_epoch
  if config.train.num_steps <= 0:
    raise UserError(
      f'train.num_steps={config.train.num_steps}; set it > 0 or set train.num_epochs.'
    )
  return config.train.num_steps, steps_per_epoch


def config_to_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


class _StopRequest:
  """Turns SIGTERM / SIGINT into a stop at a step that every process agrees on.

  One process: a Python handler sets a flag that the loop reads after each
  step. Several processes: a signal may reach them at different steps, so
  SIGTERM is left to JAX's preemption service, which picks the same step on
  all of them (`multihost_utils.reached_preemption_sync_point`); Ctrl-C then
  interrupts at once.
  """

  def __init__(self):
    self.signal = None
    self._previous = {}
    self._multiprocess = jax.process_count() > 1

  def __enter__(self):
    if self._multiprocess:  # JAX's preemption service owns SIGTERM.
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread: leave signals alone.
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None:  # Second signal: give up at once.
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name
    log.warning('%s received: saving a checkpoint after this step, then stopping.', self.signal)

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step` (the same answer on every process)."""
    if self._multiprocess:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal = 'SIGTERM'
    return self.signal is not None

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _due(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its checkpoint) and evaluates.

  Returns the final metrics: 'step', 'test/accuracy', 'test/loss', ...
  """
  config_defaults.validate(config)
  validation.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
  workdir = os.path.abspath(workdir)
  is_writer = jax.process_index() == 0
  mesh = sharding.create_mesh(config.mesh.expert, config.model.moe.num_experts)
  log.info(
    'Mesh %s over %d devices (%d processes).', dict(mesh.shape), mesh.size, jax.process_count()
  )
  dataset = input_pipeline.create_dataset(config, jax.process_index(), jax.process_count())
  total_steps, steps_per_epoch = num_train_steps(config, dataset)
  schedule = schedules.from_config(config, total_steps, steps_per_epoch)
  model = factory.create_model(config, dataset.num_classes, mesh)
  tx, init_fn, abstract_state, shardings = steps.create_train_state(
    model,
    lambda p, m: optim.create_optimizer(config, schedule, p, m),
    mesh,
    dataset.image_shape,
  )

  # Resume: the latest checkpoint of the workdir, if any, onto this mesh.
  manager = checkpointing.create_manager(workdir, config.train.keep_checkpoints)
  config_json = config_to_json(config)
  last = checkpointing.latest_step(manager)
  checkpointing.check_config(workdir, config_json, last is not None)
  if last is not None:
    state, _ = checkpointing.restore(manager, last, abstract_state)
    log.info('Resumed from checkpoint %d.', last)
  else:
    state = init_fn(config.seed)
  checkpointing.write_config(workdir, config_json)
  checkpointing.write_dataset_info(workdir, dataset)
  start_step = int(jax.device_get(state.step))
  finished = os.path.join(workdir, 'results.json')
  if start_step >= total_steps and os.path.exists(finished):
    # A finished run: keep its results (and their timings) as they are.
    log.info('%s already holds a run finished at step %d; nothing to do.', workdir, start_step)
    with open(finished) as f:
      return json.load(f)
  num_params = factory.count_params(state.params)
  log.info(
    'Model: %s parameters; %d steps (%.1f epochs) from step %d.',
    f'{num_params:,}',
    total_steps,
    total_steps / steps_per_epoch,
    start_step,
  )

  train_fn = jax.jit(
    functools.partial(
      steps.train_step,
      model=model,
      tx=tx,
      schedule=schedule,
      accum_steps=config.train.grad_accum_steps,
      label_smoothing=config.optimizer.label_smoothing,
    ),
    donate_argnums=0,
    out_shardings=(shardings, None),
  )
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=model))
  fewshot_fn = fewshot.make_feature_fn(model, mesh) if config.fewshot.every >= 0 else None
  writer = metrics_lib.MetricWriter(workdir, enabled=is_writer, resume_step=start_step)
  progress = metrics_lib.Progress(total_steps, start_step, config.input.batch_size)
  batches = dataset.train_batches(start_step)
  profile_dir = os.path.join(workdir, 'profile')
  profile_start = config.profile.start_step
  profile_end = profile_start + config.profile.num_steps if profile_start >= 0 else -1
  last_saved = last
  train_seconds = 0.0
  previous = None  # (step, metrics) of the step before, checked once the next is queued.

  def check_finite(step, metrics):
    if config.train.on_nonfinite == 'stop' and float(metrics['train/nonfinite']):
      kept = f'checkpoint {last_saved} is kept' if last_saved is not None else 'no checkpoint'
      raise UserError(
        f'loss or gradients not finite at step {step} (loss={float(metrics["train/loss"])}); '
        f'stopped, {kept}. Lower optimizer.learning_rate or set --config.train.on_nonfinite=skip.'
      )

  def save(step):
    nonlocal last_saved
    checkpointing.save(
      manager, step, state, {'step': step, 'examples_seen': step * config.input.batch_size}
    )
    last_saved = step

  step = start_step
  with _StopRequest() as stop:
    loop_start = time.perf_counter()
    while step < total_steps:
      if step == profile_start and profile_end > profile_start:
        jax.profiler.start_trace(profile_dir)
      batch = sharding.global_batch(next(batches), mesh)
      state, metrics = train_fn(state, batch)
      step += 1
      if previous is not None:
        check_finite(*previous)
      previous = (step, metrics)
      if step == profile_end and profile_end > profile_start:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        log.info(
          'Profile of steps [%d, %d) written to %s.', profile_start, profile_end, profile_dir
        )
      if _due(step, config.train.log_every) or step == total_steps:
        check_finite(step, metrics)
        metrics = jax.device_get(metrics)
        rates = progress.report(step)
        writer.write(
          step,
          {
            **metrics,
            'train/images_per_sec': rates['images_per_sec'],
            'train/epoch': step / steps_per_epoch,
          },
        )
        log.info(
          'step %d/%d  loss %.4f  acc %.3f  %.0f img/s  ETA %s',
          step,
          total_steps,
          metrics['train/loss'],
          metrics['train/accuracy'],
          rates['images_per_sec'],
          metrics_lib.format_duration(rates['eta_sec']),
        )
      if _due(step, config.train.eval_every) and step < total_steps:
        test = evaluate(eval_fn, state.params, dataset, mesh)
        writer.write(step, {f'test/{k}': v for k, v in test.items()})
        log.info('step %d  test accuracy %.4f  loss %.4f', step, test['accuracy'], test['loss'])
      if fewshot_fn and _due(step, config.fewshot.every) and step < total_steps:
        writer.write(
          step,
          fewshot.evaluate_metrics(fewshot_fn, state.params, dataset, mesh, config.fewshot, step),
        )
      if _due(step, config.train.checkpoint_every) and step < total_steps:
        check_finite(step, metrics)
        save(step)
      if stop.should_stop(step):
        check_finite(step, metrics)
        save(step)
        manager.wait_until_finished()
        writer.close()
        raise UserError(
          f'stopped by {stop.signal} at step {step}; checkpoint {step} saved in '
          f'{workdir}, run the same command to resume.'
        )
    jax.block_until_ready(state)
    train_seconds = time.perf_counter() - loop_start

  # Final evaluation and checkpoint.
  test = evaluate(eval_fn, state.params, dataset, mesh)
  fewshot_metrics = {}
  if fewshot_fn:
    fewshot_metrics = fewshot.evaluate_metrics(
      fewshot_fn, state.params, dataset, mesh, config.fewshot, step
    )
  if last_saved != step:
    save(step)
  manager.wait_until_finished()
  results = {
    'step': step,
    'num_params': num_params,
    **{f'test/{k}': v for k, v in test.items()},
    **fewshot_metrics,
    'train_seconds': train_seconds,
    'train_steps_run': step - start_step,
    'step_seconds': progress.median_step_seconds(),
    'eval_images_per_sec': _inference_speed(eval_fn, state.params, dataset, mesh),
  }
  writer.write(step, {k: v for k, v in results.items() if k != 'step' and v is not None})
  writer.close()
  log.info('Final: step %d  test accuracy %.4f  (%d params)', step, test['accuracy'], num_params)
  if is_writer:
    results_lib.write(workdir, results)
  return results
