"""The jitted pieces of training: state, train step, eval step, initialisation.

Pure functions over (params, batch) with the model and optimizer bound by
`functools.partial`; `vmoe_jax.train` runs them in its loop, and the
benchmarks and the profiler time them without importing the trainer.

  TrainState(step, params, opt_state, rng)
  create_train_state(model, tx_fn, mesh, image_shape) -> tx, init_fn, abstract state, shardings
  train_step(state, batch, model=, tx=, schedule=, ...) -> state, metrics
  eval_step(params, batch, model=) -> sums over the valid rows
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vmoe_jax.models import factory
from vmoe_jax.runtime import sharding
from vmoe_jax.transfer import distill


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # Base key; step t uses fold_in(rng, t).


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


class Teacher(NamedTuple):
  """A frozen teacher for distillation (`vmoe_jax.transfer.distill`): model and loss settings."""

  model: Any
  temperature: float
  alpha: float


def _loss_and_metrics(
  params, model, images, labels, rngs, label_smoothing, teacher, teacher_params
):
  logits, extras = model.apply({'params': params}, images, train=True, rngs=rngs)
  if teacher is None:
    xent = jnp.mean(cross_entropy(logits, labels, label_smoothing))
    distill_metrics = {}
  else:  # The teacher evaluates as at test time: no noise, its eval capacity.
    teacher_logits, _ = teacher.model.apply({'params': teacher_params}, images, train=False)
    xent, parts = distill.distillation_loss(
      logits,
      teacher_logits,
      labels,
      temperature=teacher.temperature,
      alpha=teacher.alpha,
      label_smoothing=label_smoothing,
    )
    distill_metrics = {f'train/distill/{k}': v for k, v in parts.items() if k != 'loss'}
  loss = xent + extras['auxiliary_loss']
  metrics = {
    'train/loss': loss,
    'train/xent': xent,
    'train/aux_loss': extras['auxiliary_loss'],
    'train/accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
    **distill_metrics,
    **_moe_summary(extras['moe'], 'train'),
  }
  return loss, metrics


def train_step(
  state: TrainState,
  batch,
  teacher_params=None,
  *,
  model,
  tx,
  schedule,
  accum_steps: int = 1,
  label_smoothing: float = 0.0,
  teacher: Teacher | None = None,
) -> tuple[TrainState, dict]:
  """One optimizer step, averaging gradients over `accum_steps` micro-batches.

  With a `teacher` (and its `teacher_params`), the loss is the distillation
  loss against the teacher's logits, computed in the same jitted step.
  A step whose loss or gradients are not finite leaves params and optimizer
  state unchanged and reports train/nonfinite = 1.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.grad(_loss_and_metrics, has_aux=True)

  def micro(i, images, labels):
    key = jax.random.fold_in(rng, i)
    rngs = {'dropout': jax.random.fold_in(key, 0), 'router': jax.random.fold_in(key, 1)}
    return grad_fn(
      state.params, model, images, labels, rngs, label_smoothing, teacher, teacher_params
    )

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
  mask = batch['mask']
  logits, extras = model.apply({'params': params}, batch['image'], train=False, mask=mask)
  out = {
    'correct': jnp.sum((jnp.argmax(logits, -1) == batch['label']) * mask),
    'loss': jnp.sum(cross_entropy(logits, batch['label']) * mask),
    'count': jnp.sum(mask),
  }
  if extras['moe']:
    dropped = jnp.mean(jnp.stack([m['dropped'] for m in extras['moe'].values()]))
    out['dropped'] = dropped * jnp.sum(mask)
  return out


def create_train_state(model, tx_fn, mesh, image_shape):
  """Abstract state, its shardings and a jitted init that places it on `mesh`."""
  init_params, boxed = factory.param_init(model, image_shape)
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
