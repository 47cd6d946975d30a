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

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from vmoe_jax import checkpointing
from vmoe_jax import config_defaults
from vmoe_jax import fewshot
from vmoe_jax import input_pipeline
from vmoe_jax import metrics as metrics_lib
from vmoe_jax import optim
from vmoe_jax import results as results_lib
from vmoe_jax import schedules
from vmoe_jax import sharding
from vmoe_jax.errors import UserError
from vmoe_jax.models import vit

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # Base key; step t uses fold_in(rng, t).


# --------------------------------------------------------------------------- model


def model_settings(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Width, depth, heads, MLP width and patch size from the variant and overrides."""
  model = config.model
  settings = vit.decode_variant(model.variant) if model.variant else {}
  for key in ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size'):
    if model[key] is not None:
      settings[key] = model[key]
  missing = [
    k for k in ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size') if k not in settings
  ]
  if missing:
    raise UserError(
      f'model size incomplete: set --config.model.variant (e.g. S/16) or '
      f'{", ".join("--config.model." + k for k in missing)}.'
    )
  if settings['width'] % settings['num_heads']:
    raise UserError(
      f'model width {settings["width"]} is not divisible by num_heads {settings["num_heads"]}.'
    )
  return settings


def create_model(config, num_classes: int, mesh=None, **overrides) -> vit.ViT:
  """The ViT of `config.model`; MoE layers get `mesh` for expert parallelism."""
  settings = model_settings(config)
  moe_cfg = config.model.moe
  moe, moe_layers = None, ()
  if moe_cfg.num_experts > 0:
    moe_layers = vit.moe_layer_indices(moe_cfg.layers, settings['depth'])
    moe = dict(
      num_experts=moe_cfg.num_experts,
      num_selected=moe_cfg.num_selected,
      capacity_factor=moe_cfg.capacity_factor,
      eval_capacity_factor=moe_cfg.eval_capacity_factor,
      capacity_multiple=moe_cfg.capacity_multiple,
      batch_priority=moe_cfg.batch_priority,
      renormalize=moe_cfg.renormalize,
      noise_std=moe_cfg.noise_std,
      group_size=moe_cfg.group_size,
      dispatch=moe_cfg.dispatch,
      dropout_rate=moe_cfg.dropout,
    )
    if moe_cfg.mlp_dim is not None:
      moe['mlp_dim'] = moe_cfg.mlp_dim
  dtype = config.model.dtype
  if dtype not in ('float32', 'bfloat16', 'float16'):
    raise UserError(f"model dtype {dtype!r} is unknown; use 'float32' or 'bfloat16'.")
  kwargs = dict(
    num_classes=num_classes,
    classifier=config.model.classifier,
    stem=config.model.stem,
    dropout_rate=config.model.dropout,
    attention_dropout_rate=config.model.attention_dropout,
    dtype=jnp.dtype(dtype),
    moe=moe,
    moe_layers=moe_layers,
    aux_loss_weights={w: moe_cfg[w] for w in vit.AUX_LOSS_WEIGHTS.values()},
    mesh=mesh if moe is not None else None,
    **settings,
  )
  kwargs.update(overrides)
  return vit.ViT(**kwargs)


def count_params(params: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# --------------------------------------------------------------------------- steps


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy in float32: (B, classes), (B,) -> (B,)."""
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _moe_summary(moe_metrics: dict, prefix: str) -> dict[str, jax.Array]:
  """Per-layer MoE metrics as flat names, plus the mean dropped share."""
  out = {}
  for layer, layer_metrics in moe_metrics.items():
    for name, value in layer_metrics.items():
      out[f'{prefix}/moe/block_{layer:02d}/{name}'] = value
  if moe_metrics:
    out[f'{prefix}/moe_dropped'] = jnp.mean(jnp.stack([m['dropped'] for m in moe_metrics.values()]))
  return out


def _loss_and_metrics(params, model, images, labels, rngs, label_smoothing):
  logits, extras = model.apply({'params': params}, images, train=True, rngs=rngs)
  xent = jnp.mean(cross_entropy(logits, labels, label_smoothing))
  loss = xent + extras['auxiliary_loss']
  metrics = {
    'train/loss': loss,
    'train/xent': xent,
    'train/aux_loss': extras['auxiliary_loss'],
    'train/accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
    **_moe_summary(extras['moe'], 'train'),
  }
  return loss, metrics


def train_step(
  state: TrainState,
  batch,
  *,
  model,
  tx,
  schedule,
  accum_steps: int = 1,
  label_smoothing: float = 0.0,
) -> tuple[TrainState, dict]:
  """One optimizer step, averaging gradients over `accum_steps` micro-batches.

  A step whose loss or gradients are not finite leaves params and optimizer
  state unchanged and reports train/nonfinite = 1.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.grad(_loss_and_metrics, has_aux=True)

  def micro(i, images, labels):
    key = jax.random.fold_in(rng, i)
    rngs = {'dropout': jax.random.fold_in(key, 0), 'router': jax.random.fold_in(key, 1)}
    return grad_fn(state.params, model, images, labels, rngs, label_smoothing)

  if accum_steps == 1:
    grads, metrics = micro(0, batch['image'], batch['label'])
  else:
    # Micro-batch i takes rows i, i + A, i + 2A, ...: every device keeps its share.
    split = lambda x: jnp.swapaxes(x.reshape(-1, accum_steps, *x.shape[1:]), 0, 1)
    images, labels = split(batch['image']), split(batch['label'])

    def body(carry, inputs):
      i, images_i, labels_i = inputs
      grads_i, metrics_i = micro(i, images_i, labels_i)
      return jax.tree.map(jnp.add, carry, (grads_i, metrics_i)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(micro, 0, images[0], labels[0]))
    (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), images, labels))
    grads, metrics = jax.tree.map(lambda x: x / accum_steps, (grads, metrics))

  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
  finite = jnp.isfinite(metrics['train/loss']) & jnp.isfinite(grad_norm)

  def apply_update(_):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state

  # A cond, not a select: a finite step (the usual case) costs no extra pass
  # over params and optimizer state.
  params, opt_state = jax.lax.cond(
    finite, apply_update, lambda _: (state.params, state.opt_state), None
  )
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  metrics.update(
    {
      'train/grad_norm': grad_norm,
      'train/learning_rate': schedule(state.step),
      'train/nonfinite': 1.0 - finite.astype(jnp.float32),
    }
  )
  return new_state, metrics


def eval_step(params, batch, *, model) -> dict[str, jax.Array]:
  """Sums over the valid rows of a batch: correct, loss, count, dropped share."""
  logits, extras = model.apply({'params': params}, batch['image'], train=False)
  mask = batch['mask']
  out = {
    'correct': jnp.sum((jnp.argmax(logits, -1) == batch['label']) * mask),
    'loss': jnp.sum(cross_entropy(logits, batch['label']) * mask),
    'count': jnp.sum(mask),
  }
  if extras['moe']:
    dropped = jnp.mean(jnp.stack([m['dropped'] for m in extras['moe'].values()]))
    out['dropped'] = dropped * jnp.sum(mask)
  return out


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


def _param_init(config, model, image_shape):
  """(init_params(key), boxed abstract params) of the unsharded twin of `model`.

  The params are the sharded model's; they are initialised unsharded, on one
  routing group of dummy images.
  """
  dummy = jnp.zeros((max(1, config.model.moe.group_size), *image_shape), jnp.float32)
  model = model.clone(mesh=None)

  def init_params(key):
    return model.init({'params': key}, dummy, train=False)['params']

  return init_params, jax.eval_shape(init_params, jax.random.key(0))


def abstract_params(config, model, mesh, image_shape):
  """Shapes, dtypes and shardings on `mesh` of the params of `model`."""
  _, boxed = _param_init(config, model, image_shape)
  specs = sharding.param_specs(boxed)
  return jax.tree.map(
    lambda a, spec: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec)),
    nn.meta.unbox(boxed),
    specs,
  )


def create_train_state(config, model, tx_fn, mesh, image_shape):
  """Abstract state, its shardings and a jitted init that places it on `mesh`."""
  init_params, boxed = _param_init(config, model, image_shape)
  specs = sharding.param_specs(boxed)
  abstract = nn.meta.unbox(boxed)
  tx = tx_fn(abstract, sharding.expert_mask(specs))

  def init(seed):
    params_key, state_key = jax.random.split(jax.random.PRNGKey(seed))
    params = nn.meta.unbox(init_params(params_key))
    return TrainState(
      step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params), rng=state_key
    )

  abstract_state = jax.eval_shape(init, 0)
  shardings = sharding.state_shardings(abstract_state, abstract, specs, mesh)
  init_fn = jax.jit(init, static_argnums=0, out_shardings=shardings)
  abstract_state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
  )
  return tx, init_fn, abstract_state, shardings


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


def _check_batch(config, mesh) -> None:
  num_devices = mesh.size
  for what, size in (
    ('batch_size', config.input.batch_size),
    ('eval_batch_size', config.input.eval_batch_size),
  ):
    if size % num_devices:
      raise UserError(
        f'input.{what}={size} does not split over the {num_devices} devices of the mesh; use a '
        f'multiple of {num_devices} (--config.input.{what}).'
      )
  accum = config.train.grad_accum_steps
  if accum < 1 or config.input.batch_size % (accum * num_devices):
    raise UserError(
      f'train.grad_accum_steps={accum} must be >= 1 and split batch_size='
      f'{config.input.batch_size} into micro-batches that are multiples of {num_devices} devices.'
    )
  group = config.model.moe.group_size
  if config.model.moe.num_experts > 0 and group > 0:
    micro = config.input.batch_size // accum
    for what, size in (
      ('batch_size / grad_accum_steps', micro),
      ('eval_batch_size', config.input.eval_batch_size),
    ):
      if (size // num_devices) % group:
        raise UserError(
          f'model.moe.group_size={group} images does not divide the {size // num_devices} images '
          f'per device of {what}={size}; use a group size that divides it, or 0 (all images of '
          'a device).'
        )
  if config.train.on_nonfinite not in ('stop', 'skip'):
    raise UserError(f"train.on_nonfinite={config.train.on_nonfinite!r}; use 'stop' or 'skip'.")


def _due(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its checkpoint) and evaluates.

  Returns the final metrics: 'step', 'test/accuracy', 'test/loss', ...
  """
  config_defaults.validate(config)
  workdir = os.path.abspath(workdir)
  finished = checkpointing.check_workdir(workdir, config_to_json(config))
  if finished is not None:  # A finished run, rerun as it was: its results, nothing written.
    return finished
  is_writer = jax.process_index() == 0
  mesh = sharding.create_mesh(config.mesh.expert, config.model.moe.num_experts)
  _check_batch(config, mesh)
  log.info(
    'Mesh %s over %d devices (%d processes).', dict(mesh.shape), mesh.size, jax.process_count()
  )
  dataset = input_pipeline.create_dataset(config, jax.process_index(), jax.process_count())
  total_steps, steps_per_epoch = num_train_steps(config, dataset)
  schedule = schedules.from_config(config, total_steps, steps_per_epoch)
  model = create_model(config, dataset.num_classes, mesh)
  tx, init_fn, abstract_state, shardings = create_train_state(
    config,
    model,
    lambda p, m: optim.create_optimizer(config, schedule, p, m),
    mesh,
    dataset.image_shape,
  )

  # Resume: the newest checkpoint of the workdir that verifies, if any, onto this mesh.
  manager = checkpointing.create_manager(workdir, config.train.keep_checkpoints)
  config_json = config_to_json(config)
  checkpointing.check_config(workdir, config_json, bool(manager.all_steps()))
  resumed = checkpointing.restore_for_resume(manager, abstract_state, config.train.on_corrupt)
  if resumed is not None:
    state, _, last = resumed
    log.info('Resumed from checkpoint %d.', last)
  else:
    state, last = init_fn(config.seed), None
  start_step = int(jax.device_get(state.step))
  finished = os.path.join(workdir, 'results.json')
  if start_step >= total_steps and os.path.exists(finished):
    # A finished run: keep its results (and their timings) as they are.
    log.info('%s already holds a run finished at step %d; nothing to do.', workdir, start_step)
    manager.close()
    return checkpointing.read_json(workdir, 'results.json')
  checkpointing.write_config(workdir, config_json)
  checkpointing.write_dataset_info(workdir, dataset)
  num_params = count_params(state.params)
  log.info(
    'Model: %s parameters; %d steps (%.1f epochs) from step %d.',
    f'{num_params:,}',
    total_steps,
    total_steps / steps_per_epoch,
    start_step,
  )

  train_fn = jax.jit(
    functools.partial(
      train_step,
      model=model,
      tx=tx,
      schedule=schedule,
      accum_steps=config.train.grad_accum_steps,
      label_smoothing=config.optimizer.label_smoothing,
    ),
    donate_argnums=0,
    out_shardings=(shardings, None),
  )
  eval_fn = jax.jit(functools.partial(eval_step, model=model))
  fewshot_fn = fewshot.make_feature_fn(model, mesh) if config.fewshot.every >= 0 else None
  writer = metrics_lib.MetricWriter(workdir, enabled=is_writer)
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
