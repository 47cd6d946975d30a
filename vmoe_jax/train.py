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

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vmoe_jax import inference
from vmoe_jax import steps
from vmoe_jax.data import input_pipeline
from vmoe_jax.data.dataset import Dataset
from vmoe_jax.errors import UserError
from vmoe_jax.evaluation import fewshot
from vmoe_jax.models import factory
from vmoe_jax.models import memory
from vmoe_jax.models import vit
from vmoe_jax.optim import optimizers
from vmoe_jax.optim import schedules
from vmoe_jax.runtime import sharding
from vmoe_jax.schema import validation
from vmoe_jax.storage import checkpointing
from vmoe_jax.storage import metrics as metrics_lib
from vmoe_jax.storage import results as results_lib
from vmoe_jax.storage import workdirs
from vmoe_jax.transfer import distill
from vmoe_jax.transfer import mapping
from vmoe_jax.transfer import warm_start

log = logging.getLogger(__name__)


def evaluate(eval_fn, params, dataset: Dataset, mesh) -> dict[str, float]:
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


def num_train_steps(config, dataset: Dataset) -> tuple[int, float]:
  steps_per_epoch = dataset.num_train / config.input.batch_size
  if config.train.num_epochs > 0:
    return max(1, math.ceil(config.train.num_epochs * steps_per_epoch)), steps_per_epoch
  return config.train.num_steps, steps_per_epoch


def config_to_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


class _StopRequest:
  """Turns SIGTERM / SIGINT into a stop at a step that every process agrees on.

  One process: a Python handler sets a flag that the loop reads after each
  step; the run then saves a checkpoint and stops. A second signal does not
  abort that save (or the step before it): it says to wait. A third aborts at
  once, without saving. Several processes: a signal may reach them at
  different steps, so SIGTERM is left to JAX's preemption service, which
  picks the same step on all of them
  (`multihost_utils.reached_preemption_sync_point`); Ctrl-C then interrupts
  at once.
  """

  def __init__(self):
    self.signal = None
    self.count = 0
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
    self.count += 1
    name = signal.Signals(signum).name
    if self.count >= 3:  # Third signal: give up at once.
      raise KeyboardInterrupt
    if self.count == 2:
      log.warning(
        '%s received again: saving, please wait (a third signal stops without saving).', name
      )
      return
    self.signal = name
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


@dataclasses.dataclass
class Run:
  """Everything a run builds before its first step (see `setup`)."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  dataset: Dataset
  total_steps: int
  steps_per_epoch: float
  schedule: optax.Schedule  # step -> learning rate.
  model: vit.ViT
  tx: optax.GradientTransformation
  init_fn: Callable[[int], steps.TrainState]  # seed -> the initial state, placed on the mesh.
  abstract_state: steps.TrainState  # Of jax.ShapeDtypeStruct, with their shardings.
  shardings: steps.TrainState  # Of NamedSharding.
  teacher: inference.TrainedModel | None = None  # The frozen teacher of distillation.


def _check_teacher(teacher, path: str, dataset: input_pipeline.Dataset) -> None:
  """The teacher sees the student's batches: it must take images of their size and classes."""

  def size(shape, name):
    return f'{"x".join(map(str, shape))} images{f" of {name}" if name else ""}'

  if tuple(teacher.image_shape) != tuple(dataset.image_shape):
    raise UserError(
      f'distill.teacher={path!r} was trained on {size(teacher.image_shape, teacher.dataset)}, '
      f'this run trains on {size(dataset.image_shape, dataset.name)}; distil from a teacher '
      'trained on images of the same size.'
    )
  if teacher.num_classes != dataset.num_classes:
    raise UserError(
      f"distill.teacher={path!r} predicts {teacher.num_classes} classes, this run's data has "
      f'{dataset.num_classes}; distil from a teacher trained on the same classes.'
    )


def setup(config, workdir: str) -> Run:
  """Mesh, data, schedule, model, optimizer and the abstract state of a run."""
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
    lambda p, m: optimizers.create_optimizer(config, schedule, p, m),
    mesh,
    dataset.image_shape,
  )
  teacher = None
  if config.distill.teacher:
    teacher = inference.load(config.distill.teacher, key='distill.teacher')
    _check_teacher(teacher, config.distill.teacher, dataset)
    log.info('Distilling from %s (step %d).', config.distill.teacher, teacher.step)
  return Run(
    config,
    workdir,
    mesh,
    dataset,
    total_steps,
    steps_per_epoch,
    schedule,
    model,
    tx,
    init_fn,
    abstract_state,
    shardings,
    teacher,
  )


def fresh_state(run: Run):
  """The initial state: random, or with `init_from` / the teacher's weights mapped in."""
  config = run.config
  state = run.init_fn(config.seed)
  if config.init_from:
    source = warm_start.load_source(config.init_from, config.init.step)
    params, line = warm_start.initial_params(
      config, source, state.params, run.model, run.dataset.image_shape
    )
  elif config.distill.init_from_teacher:
    params, report = distill.student_from_teacher(
      warm_start.to_host(run.teacher.params), warm_start.to_host(state.params)
    )
    line = mapping.format_report(report, prefix='student_from_teacher')
  else:
    return state
  log.info('%s', line)
  return state.replace(params=jax.device_put(params, run.shardings.params))


def initial_state(run: Run, manager):
  """(state, last checkpoint step or None): resumed from the workdir, else fresh."""
  resumed = checkpointing.restore_for_resume(
    manager, run.abstract_state, run.config.train.on_corrupt
  )
  if resumed is not None:
    state, _, last = resumed
    log.info('Resumed from checkpoint %d.', last)
    return state, last
  return fresh_state(run), None


def compile_steps(run: Run):
  """(train_fn(state, batch), eval_fn(params, batch)), jitted."""
  config = run.config
  teacher, teacher_params = None, None
  if run.teacher is not None:
    teacher = steps.Teacher(run.teacher.model, config.distill.temperature, config.distill.alpha)
    teacher_params = run.teacher.params
  train_step = jax.jit(
    functools.partial(
      steps.train_step,
      model=run.model,
      tx=run.tx,
      schedule=run.schedule,
      accum_steps=config.train.grad_accum_steps,
      label_smoothing=config.optimizer.label_smoothing,
      teacher=teacher,
    ),
    donate_argnums=0,
    out_shardings=(run.shardings, None),
  )
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=run.model))
  return (lambda state, batch: train_step(state, batch, teacher_params)), eval_fn


class Loop:
  """The training loop's state between steps: checks, logging, evaluations, checkpoints."""

  def __init__(self, run: Run, manager, state, last_saved, writer, pending_config=None):
    self.run, self.manager, self.writer = run, manager, writer
    self.config = run.config
    self.state, self.last_saved = state, last_saved
    self.saving = None  # The step of the checkpoint being written in the background, if any.
    # config.json of this run, written once its first checkpoint is on disk (see
    # `train_and_evaluate`); None when it is written already.
    self.pending_config = pending_config
    self.checkpoint_bytes = checkpointing.estimate_bytes(run.abstract_state)
    self.start_step = self.step = int(jax.device_get(state.step))
    self.train_fn, self.eval_fn = compile_steps(run)
    self.fewshot_fn = None
    if self.config.fewshot.every >= 0:
      self.fewshot_fn = fewshot.make_feature_fn(run.model, run.mesh)
    self.progress = metrics_lib.Progress(
      run.total_steps, self.start_step, self.config.input.batch_size
    )
    self.previous = None  # (step, metrics) of a step not yet checked (`run_step`).
    self.skipped = jnp.zeros((), jnp.float32)  # Steps skipped as not finite, since the start.

  def check_finite(self, step: int, metrics) -> None:
    """Stops the run (on_nonfinite='stop') if step `step`'s loss or gradients were not finite."""
    if self.config.train.on_nonfinite == 'stop' and float(metrics['train/nonfinite']):
      kept = (
        f'checkpoint {self.last_saved} is kept' if self.last_saved is not None else 'no checkpoint'
      )
      raise UserError(
        f'loss or gradients not finite at step {step} (loss={float(metrics["train/loss"])}); '
        f'stopped, {kept}. Lower optimizer.learning_rate or set --config.train.on_nonfinite=skip.'
      )

  def check_skipped(self) -> int:
    """The steps skipped so far; stops the run when they are more than the allowed share."""
    skipped, run_steps = int(jax.device_get(self.skipped)), self.step - self.start_step
    limit = self.config.train.max_skipped_share
    if run_steps >= 10 and skipped > limit * run_steps:
      raise UserError(
        f'{skipped} of the {run_steps} steps so far were skipped (loss or gradients not finite), '
        f'more than train.max_skipped_share={limit}; lower optimizer.learning_rate, or raise '
        '--config.train.max_skipped_share.'
      )
    return skipped

  def save(self, step: int) -> None:
    """Checkpoint `step`, written in the background (see `wait_saved`).

    The previous checkpoint is finished first, then the free space is
    checked against the size of one checkpoint. A full disk is a one-line
    UserError (`_save_failed`): what the failed save left is removed, the
    checkpoints before it are kept.
    """
    self.wait_saved()
    checkpoints = os.path.join(self.run.workdir, workdirs.CHECKPOINT_DIR)
    doing = f'saving checkpoint {step} to {checkpoints}'
    workdirs.check_free_space(self.run.workdir, self.checkpoint_bytes, doing)
    meta = {'step': step, 'examples_seen': step * self.config.input.batch_size}
    self.saving = step
    try:
      checkpointing.save(self.manager, step, self.state, meta)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e) from None
    self.last_saved = step
    if self.pending_config is not None:  # The change is safe once a checkpoint backs it.
      self.wait_saved()
      workdirs.write_config(self.run.workdir, self.pending_config)
      self.pending_config = None

  def wait_saved(self) -> None:
    """Waits for the checkpoint being written; a full disk is a one-line UserError."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e) from None
    self.saving = None

  def _save_failed(self, error: Exception) -> Exception:
    """The error to raise for a failed save: one line for a full disk, else `error` itself."""
    if not workdirs.is_disk_full(error):
      return error
    checkpoints = os.path.join(self.run.workdir, workdirs.CHECKPOINT_DIR)
    failed = self.saving if self.saving is not None else self.step
    self.saving = None
    _close_quietly(self.manager)
    checkpointing.join_writers()
    workdirs.remove_partial_files(self.run.workdir)
    return workdirs.disk_full_error(f'saving checkpoint {failed} to {checkpoints}')

  def evaluate(self, step: int) -> dict:
    test = evaluate(self.eval_fn, self.state.params, self.run.dataset, self.run.mesh)
    self.writer.write(step, {f'test/{k}': v for k, v in test.items()})
    log.info('step %d  test accuracy %.4f  loss %.4f', step, test['accuracy'], test['loss'])
    return test

  def fewshot(self, step: int) -> dict:
    run = self.run
    return fewshot.evaluate_metrics(
      self.fewshot_fn, self.state.params, run.dataset, run.mesh, self.config.fewshot, step
    )

  def log_step(self, step: int, metrics) -> None:
    skipped = self.check_skipped()
    metrics = jax.device_get(metrics)
    rates = self.progress.report(step)
    extra = {
      'train/images_per_sec': rates['images_per_sec'],
      'train/epoch': step / self.run.steps_per_epoch,
      'train/skipped_steps': skipped,
    }
    self.writer.write(step, {**metrics, **extra})
    log.info(
      'step %d/%d  loss %.4f  acc %.3f  %.0f img/s  ETA %s',
      step,
      self.run.total_steps,
      metrics['train/loss'],
      metrics['train/accuracy'],
      rates['images_per_sec'],
      metrics_lib.format_duration(rates['eta_sec']),
    )

  def run_step(self, batch, stop: _StopRequest) -> None:
    """The loop body: one train step, then what is due after it.

    A step's metrics are checked (`check_finite`) once the next step is
    queued, so that the check does not hold up the device; a step that is
    logged or saved, or at which the run stops, is checked at once. Rates and
    the ETA count from the end of the first step, which compiles.
    """
    config, total = self.config, self.run.total_steps
    self.state, metrics = self.train_fn(self.state, batch)
    self.skipped = self.skipped + metrics['train/nonfinite']
    self.step = step = self.step + 1
    if step == self.start_step + 1:
      jax.block_until_ready(metrics)
      log.info('First step (compilation included) took %.1fs.', self.progress.compiled(step))
    log_now = _due(step, config.train.log_every) or step == total
    evaluate_now = _due(step, config.train.eval_every) and step < total
    fewshot_now = self.fewshot_fn is not None and _due(step, config.fewshot.every) and step < total
    save_now = _due(step, config.train.checkpoint_every) and step < total
    stop_now = stop.should_stop(step)
    unchecked = [self.previous] if self.previous is not None else []
    self.previous = (step, metrics)
    if log_now or save_now or stop_now:
      unchecked.append(self.previous)
      self.previous = None
    for unchecked_step, unchecked_metrics in unchecked:
      self.check_finite(unchecked_step, unchecked_metrics)
    if log_now:
      self.log_step(step, metrics)
    if evaluate_now:
      self.evaluate(step)
    if fewshot_now:
      self.writer.write(step, self.fewshot(step))
    if save_now or stop_now:
      self.save(step)
    if stop_now:
      self.stop(stop, step)

  def stop(self, stop: _StopRequest, step: int) -> None:
    """After the checkpoint of `step` is saved: waits for it, then stops the run."""
    self.wait_saved()
    self.writer.close()
    raise UserError(
      f'stopped by {stop.signal} at step {step}; checkpoint {step} saved in '
      f'{self.run.workdir}, run the same command to resume.'
    )

  def train(self, stop: _StopRequest) -> float:
    """Steps to the end (profiling the configured steps); the loop's seconds."""
    profile = self.config.profile
    profile_dir = os.path.join(self.run.workdir, 'profile')
    profile_end = profile.start_step + profile.num_steps if profile.start_step >= 0 else -1
    batches = self.run.dataset.train_batches(self.step)
    start = time.perf_counter()
    while self.step < self.run.total_steps:
      if self.step == profile.start_step and profile_end > profile.start_step:
        jax.profiler.start_trace(profile_dir)
      self.run_step(sharding.global_batch(next(batches), self.run.mesh), stop)
      if self.step == profile_end and profile_end > profile.start_step:
        jax.block_until_ready(self.state)
        jax.profiler.stop_trace()
        log.info(
          'Profile of steps [%d, %d) written to %s.', profile.start_step, profile_end, profile_dir
        )
    jax.block_until_ready(self.state)
    return time.perf_counter() - start

  def finish(self, train_seconds: float, num_params: int, stop: _StopRequest) -> dict:
    """Final checkpoint and evaluation; the results (written to results.json).

    The checkpoint is saved first (it is written while the evaluation runs):
    a signal during the evaluation stops the run with its checkpoint kept,
    and the same command then evaluates again.
    """
    run, step = self.run, self.step
    if self.last_saved != step:
      self.save(step)
    test = evaluate(self.eval_fn, self.state.params, run.dataset, run.mesh)
    fewshot_metrics = self.fewshot(step) if self.fewshot_fn else {}
    self.wait_saved()
    if self.pending_config is not None:  # Resumed at the last step: no new checkpoint.
      workdirs.write_config(run.workdir, self.pending_config)
      self.pending_config = None
    if stop.signal is not None:  # Received during the evaluation.
      self.stop(stop, step)
    results = {
      'step': step,
      'num_params': num_params,
      **{f'test/{k}': v for k, v in test.items()},
      **fewshot_metrics,
      'train_seconds': train_seconds,
      'train_steps_run': step - self.start_step,
      'skipped_steps': int(jax.device_get(self.skipped)),
      'step_seconds': self.progress.median_step_seconds(),
      'eval_images_per_sec': _inference_speed(
        self.eval_fn, self.state.params, run.dataset, run.mesh
      ),
    }
    self.writer.write(step, {k: v for k, v in results.items() if k != 'step' and v is not None})
    log.info('Final: step %d  test accuracy %.4f  (%d params)', step, test['accuracy'], num_params)
    return results


def _close_quietly(manager) -> None:
  """Closes a checkpoint manager (its threads) after an error, keeping that error."""
  try:
    manager.close()
  except Exception:  # pylint: disable=broad-except
    log.debug('closing the checkpoint manager after an error failed', exc_info=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its checkpoint) and evaluates.

  The workdir is locked for the whole run (`workdirs.lock`): a second run on
  it is refused. Returns the final metrics: 'step', 'test/accuracy',
  'test/loss', ...
  """
  validation.validate_devices(config, jax.device_count(), jax.process_count())
  workdir = os.path.abspath(workdir)
  with workdirs.lock(workdir), checkpointing.quiet_disk_full():
    try:
      return _train_and_evaluate(config, workdir)
    except OSError as e:
      if not workdirs.is_disk_full(e):
        raise
      workdirs.remove_partial_files(workdir)
      raise workdirs.disk_full_error(f'writing to {workdir}') from None


def _train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """`train_and_evaluate` in the locked `workdir`."""
  config_json = config_to_json(config)
  finished = workdirs.check_workdir(workdir, config_json)
  if finished is not None:  # A finished run, rerun as it was: its results, nothing written.
    return finished
  run = setup(config, workdir)
  new_checkpoints = not os.path.isdir(os.path.join(workdir, workdirs.CHECKPOINT_DIR))
  manager = checkpointing.create_manager(workdir, config.train.keep_checkpoints)
  try:
    return _run(run, manager, config_json, new_checkpoints)
  except BaseException:
    _close_quietly(manager)
    raise


@contextlib.contextmanager
def _removed_if_empty(directory: str, new: bool):
  """Removes `directory` (`new`: this run created it) if the block fails and leaves it empty."""
  try:
    yield
  except BaseException:
    if new and jax.process_index() == 0:
      with contextlib.suppress(OSError):
        os.rmdir(directory)  # Only if empty.
    raise


def _run(run: Run, manager, config_json: dict, new_checkpoints: bool) -> dict[str, Any]:
  config, workdir = run.config, run.workdir
  # A run refused before training (e.g. init_from cannot be mapped) leaves no checkpoints/.
  with _removed_if_empty(os.path.join(workdir, workdirs.CHECKPOINT_DIR), new_checkpoints):
    workdirs.check_config(workdir, config_json, bool(manager.all_steps()))
    memory.check(run)  # Before the state is placed on the devices.
    checkpoint_bytes = checkpointing.estimate_bytes(run.abstract_state)
    where = f'starting a run in {workdir}'
    workdirs.check_free_space(workdir, checkpoint_bytes, where, resume=False)
    state, last = initial_state(run, manager)  # init_from and the teacher's weights map here.
    start_step = int(jax.device_get(state.step))
    if start_step >= run.total_steps:
      results = workdirs.finished_results(workdir)
      if results is not None and results['step'] == start_step:
        log.info('%s already holds a run finished at step %d; nothing to do.', workdir, start_step)
        manager.close()
        return results
  # config.json describes the run that the checkpoints belong to: a run that
  # changes it (e.g. continues a finished run for longer) rewrites it only
  # once its own first checkpoint is on disk, so that a crash before that
  # leaves the workdir as it was.
  pending_config = None
  if last is not None and os.path.exists(os.path.join(workdir, workdirs.CONFIG_FILE)):
    if workdirs.read_config(workdir) != config_json:
      pending_config = config_json
  if pending_config is None:
    workdirs.write_config(workdir, config_json)
  workdirs.write_dataset_info(workdir, run.dataset)
  num_params = factory.count_params(state.params)
  log.info(
    'Model: %s parameters; %d steps (%.1f epochs) from step %d.',
    f'{num_params:,}',
    run.total_steps,
    run.total_steps / run.steps_per_epoch,
    start_step,
  )
  is_writer = jax.process_index() == 0
  with _StopRequest() as stop:  # From here on, SIGTERM / Ctrl-C stop at a step with a checkpoint.
    writer = metrics_lib.MetricWriter(workdir, enabled=is_writer, resume_step=start_step)
    loop = Loop(run, manager, state, last, writer, pending_config)
    if start_step == 0 and (config.init_from or config.distill.init_from_teacher):
      loop.evaluate(0)  # What the transfer starts from.
    train_seconds = loop.train(stop)
    results = loop.finish(train_seconds, num_params, stop)
  writer.close()
  if is_writer:
    results_lib.write(workdir, results)
  manager.close()
  return results
