"""Optimizers: Adafactor as modified in Scaling Vision Transformers, AdamW, SGD.

Every optimizer computes

  g      = clip_by_global_norm(gradient, grad_clip_norm)       (if > 0)
  d      = direction(g): Adafactor + momentum | Adam | momentum SGD
  update = -lr(t) * d - (lr(t) / peak_lr) * weight_decay * param

The weight decay is decoupled from the gradient and from the learning rate,
as in Loshchilov & Hutter 2019 (AdamW, Algorithm 2: theta -= eta_t * lambda *
theta, eta_t the schedule multiplier): it follows the *shape* of the schedule,
not its peak, so `weight_decay` is the decay per step at the peak. big_vision
and V-MoE instead multiply by the learning rate itself (lr(t) * wd * param):
their `wd` is `weight_decay / peak_lr` here, i.e. to reuse a value `wd` from
their configs set weight_decay = wd * learning_rate. The head kernel has its
own (usually stronger) value, as in Zhai et al. 2022.

What is decayed (`weight_decay_tree`): every kernel and expert weight, and the
router weight of linear routers (as V-MoE decays Router/dense/kernel); not
biases, norms, embeddings, nor Soft MoE's slot parameters and scale (the
model sees only their direction, so decay would shrink their norm and so
raise their effective learning rate, not regularise them).

Adafactor (Shazeer & Stern 2018) with the changes of Zhai et al. 2022,
"Scaling Vision Transformers", Sec. 3.5 / Appendix D:
  * first moment (momentum) kept, in bfloat16;
  * second-moment decay beta2(t) = min(0.999, 1 - t^-0.8) (t counts from 1);
  * no scaling of the update by the parameter norm, no update clipping;
  * the second moment is factored (row and column means) over the two
    largest axes of a parameter when both are >= `factored_min_dim`; the
    experts axis of expert weights is never one of them, so every expert has
    its own factored statistics.

Adafactor is one fused transformation (clipping, statistics, momentum,
learning rate and weight decay): MoE models have most of their parameters in
experts, and every separate stage would be one more pass over them. The
gradient is read for its statistics and once more for the update; clipping
scales the statistics instead of materialising clipped gradients.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from vmoe_jax.errors import UserError

OPTIMIZERS = ('adafactor', 'adamw', 'sgd')


def factored_axes(
  shape: tuple[int, ...], min_dim: int, skip_leading: bool
) -> tuple[int, int] | None:
  """The (row, col) axes to factor, or None to keep a full second moment.

  The two largest axes (the later one on ties), excluding axis 0 when it is
  the experts axis, if both are at least `min_dim` long.
  """
  candidates = list(range(1 if skip_leading else 0, len(shape)))
  if len(candidates) < 2:
    return None
  # Sort by size, later axes first among equal sizes.
  largest = sorted(candidates, key=lambda a: (shape[a], a), reverse=True)[:2]
  if shape[largest[1]] < min_dim:
    return None
  return tuple(sorted(largest))


class AdafactorState(NamedTuple):
  count: jax.Array
  v_row: Any  # Per parameter: row means of g^2, or a (1,) placeholder.
  v_col: Any  # Column means of g^2, or a (1,) placeholder.
  v: Any  # Full second moment of unfactored parameters, or a (1,) placeholder.
  momentum: Any  # First moment in `momentum_dtype`, or None without momentum.


def adafactor(
  learning_rate: Callable,
  *,
  beta1: float = 0.9,
  momentum_dtype: Any = jnp.bfloat16,
  clip_norm: float = 0.0,
  weight_decay: Any = None,
  peak_learning_rate: float = 1.0,
  expert_mask: Any = None,
  min_dim: int = 128,
  decay_exponent: float = 0.8,
  max_decay: float = 0.999,
  epsilon: float = 1e-30,
) -> optax.GradientTransformation:
  """Adafactor as in Scaling Vision Transformers, fused with clipping and decay.

  Args:
    learning_rate: step -> learning rate; updates are -lr * direction.
    beta1: momentum; 0 disables it (the direction is then g / sqrt(v)).
    momentum_dtype: dtype the momentum is stored in.
    clip_norm: clip gradients to this global norm first; 0 disables.
    weight_decay: pytree of per-parameter decay (see `weight_decay_tree`) or None;
      adds -(lr(t) / peak_learning_rate) * wd * param.
    peak_learning_rate: the schedule's peak, for the decoupled weight decay.
    expert_mask: pytree of bools like the params; True marks parameters whose
      axis 0 is the experts axis, never factored.
    min_dim: smallest axis length that may be factored.
    decay_exponent, max_decay: beta2(t) = min(max_decay, 1 - t^-decay_exponent).
    epsilon: added to the mean of g^2 (Adafactor's epsilon1).
  """

  def axes_tree(params):
    mask = expert_mask if expert_mask is not None else jax.tree.map(lambda _: False, params)
    return jax.tree.map(lambda p, m: factored_axes(p.shape, min_dim, bool(m)), params, mask)

  def init_fn(params):
    return _adafactor_init(params, axes_tree(params), beta1, momentum_dtype)

  def update_fn(grads, state, params=None):
    treedef = jax.tree.structure(grads)
    axes = treedef.flatten_up_to(axes_tree(grads))
    g_leaves = [g.astype(jnp.float32) for g in treedef.flatten_up_to(grads)]
    count = state.count + 1
    beta2 = jnp.minimum(max_decay, 1.0 - jnp.power(count.astype(jnp.float32), -decay_exponent))
    stats, squared_norm = _gradient_statistics(g_leaves, axes)
    scale = jnp.ones([], jnp.float32)
    if clip_norm > 0:
      scale = jnp.minimum(1.0, clip_norm / (jnp.sqrt(squared_norm) + 1e-16))
    moments = (beta2, scale, jnp.square(scale), epsilon)
    # New second moments of the clipped gradients, the direction, momentum, decay.
    lr = learning_rate(state.count)
    v_row, v_col, v_full = (treedef.flatten_up_to(v) for v in (state.v_row, state.v_col, state.v))
    moms = treedef.flatten_up_to(state.momentum) if beta1 > 0 else [None] * len(g_leaves)
    decays = treedef.flatten_up_to(weight_decay) if weight_decay is not None else None
    p_leaves = treedef.flatten_up_to(params) if decays is not None else None
    outs = {'update': [], 'v_row': [], 'v_col': [], 'v': [], 'momentum': []}
    for i, (g, ax, stat) in enumerate(zip(g_leaves, axes, stats)):
      direction, new_row, new_col, new_v = _second_moments_and_direction(
        g, ax, stat, v_row[i], v_col[i], v_full[i], *moments
      )
      if beta1 > 0:
        momentum = beta1 * moms[i].astype(jnp.float32) + (1 - beta1) * direction
        momentum = momentum.astype(momentum_dtype)
        outs['momentum'].append(momentum)
        direction = momentum.astype(jnp.float32)  # The stored (rounded) momentum.
      update = -lr * direction
      if decays is not None and decays[i]:
        update = update - (lr / peak_learning_rate) * decays[i] * p_leaves[i]
      for key, value in zip(('update', 'v_row', 'v_col', 'v'), (update, new_row, new_col, new_v)):
        outs[key].append(value)

    new_state = AdafactorState(
      count=count,
      **{key: treedef.unflatten(outs[key]) for key in ('v_row', 'v_col', 'v')},
      momentum=treedef.unflatten(outs['momentum']) if beta1 > 0 else None,
    )
    return treedef.unflatten(outs['update']), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _adafactor_init(params, axes, beta1: float, momentum_dtype) -> AdafactorState:
  """Zero statistics: (row, col) means for factored parameters, full g^2 for the others.

  The unused slots of a parameter hold a (1,) placeholder.
  """
  placeholder = lambda: jnp.zeros((1,), jnp.float32)

  def row(p, ax):
    return jnp.zeros(_drop(p.shape, ax[1]), jnp.float32) if ax else placeholder()

  def col(p, ax):
    return jnp.zeros(_drop(p.shape, ax[0]), jnp.float32) if ax else placeholder()

  def full(p, ax):
    return placeholder() if ax else jnp.zeros(p.shape, jnp.float32)

  momentum = None
  if beta1 > 0:
    momentum = jax.tree.map(lambda p: jnp.zeros(p.shape, momentum_dtype), params)
  return AdafactorState(
    count=jnp.zeros([], jnp.int32),
    v_row=_map_with_axes(row, params, axes),
    v_col=_map_with_axes(col, params, axes),
    v=_map_with_axes(full, params, axes),
    momentum=momentum,
  )


def _gradient_statistics(g_leaves, axes):
  """(per-leaf statistics, squared global norm) of the raw float32 gradients.

  Step 1 of the Adafactor update: row and column means of g^2 for factored
  parameters (the square fuses into the reductions), g^2 for the others; the
  global norm comes from the same sums.
  """
  stats, squared_norm = [], 0.0
  for g, ax in zip(g_leaves, axes):
    if ax:
      row_mean = jnp.mean(jnp.square(g), axis=ax[1])
      # The barrier keeps XLA from sharing one materialised g^2 between the
      # two reductions: two reading passes are cheaper than a write and two reads.
      col_mean = jnp.mean(jnp.square(jax.lax.optimization_barrier(g)), axis=ax[0])
      squared_norm += jnp.sum(row_mean) * g.shape[ax[1]]
      stats.append((row_mean, col_mean))
    else:
      squared = jnp.square(g)
      squared_norm += jnp.sum(squared)
      stats.append(squared)
  return stats, squared_norm


def _second_moments_and_direction(g, ax, stat, v_row, v_col, v_full, beta2, scale, scale2, epsilon):
  """(direction, new v_row, new v_col, new v) of one parameter, before momentum.

  Step 2 of the Adafactor update, for the gradient `g` clipped by `scale`
  (`scale2` = scale^2): the factored (row, col) or full second moment, then
  g / sqrt(v_hat).
  """
  if ax:
    row_axis, col_axis = ax
    new_row = beta2 * v_row + (1 - beta2) * (scale2 * stat[0] + epsilon)
    new_col = beta2 * v_col + (1 - beta2) * (scale2 * stat[1] + epsilon)
    # v_hat[i, j] = row[i] * col[j] / mean(row): rank-1 estimate of E[g^2].
    row_factor = jax.lax.rsqrt(new_row / jnp.mean(new_row, axis=row_axis, keepdims=True))
    col_factor = jax.lax.rsqrt(new_col)
    direction = (scale * g) * jnp.expand_dims(row_factor, col_axis)
    direction = direction * jnp.expand_dims(col_factor, row_axis)
    return direction, new_row, new_col, v_full
  new_v = beta2 * v_full + (1 - beta2) * (scale2 * stat + epsilon)
  direction = (scale * g) * jax.lax.rsqrt(new_v)
  return direction, v_row, v_col, new_v


def _drop(shape, axis):
  return tuple(d for i, d in enumerate(shape) if i != axis)


def _map_with_axes(fn, params, axes):
  """tree.map over params whose `axes` leaves may be None or tuples."""
  treedef = jax.tree.structure(params)
  leaves = [fn(p, ax) for p, ax in zip(treedef.flatten_up_to(params), treedef.flatten_up_to(axes))]
  return treedef.unflatten(leaves)


def scheduled_weight_decay(
  schedule: Callable, peak_value: float, decay_tree: Any
) -> optax.GradientTransformation:
  """Adds -(schedule(t) / peak) * wd * param, with wd per parameter from `decay_tree`."""

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params):
    factor = schedule(state.count) / peak_value
    new = jax.tree.map(
      lambda u, p, wd: u - factor * wd * p if wd else u, updates, params, decay_tree
    )
    return new, optax.ScaleByScheduleState(count=state.count + 1)

  return optax.GradientTransformation(init_fn, update_fn)


def weight_decay_tree(params: Any, weight_decay: float, head_weight_decay: float) -> Any:
  """Per-parameter decay: head kernel -> head_weight_decay; other kernels,
  expert weights and linear routers -> weight_decay; biases, norms,
  embeddings and Soft MoE's normalised slot parameters (a `router` beside a
  `router_scale`) -> 0. See the module docstring."""

  def decay(path, _):
    names = [getattr(k, 'key', str(k)) for k in path]
    name = names[-1]
    if names[0] == 'head' and name == 'kernel':
      return head_weight_decay
    if name in ('kernel', 'wi', 'wo'):
      return weight_decay
    if name == 'router' and 'router_scale' not in _parent(params, path):
      return weight_decay
    return 0.0

  return jax.tree_util.tree_map_with_path(decay, params)


def _parent(tree: Any, path) -> Any:
  for key in path[:-1]:
    tree = tree[getattr(key, 'key', key)]
  return tree


def frozen_mask(params: Any, pattern: str) -> Any:
  """True for the parameters whose '/'-joined path matches the regex `pattern` (re.search).

  E.g. '^(?!head/)' freezes everything but the head, '/moe/(wi|wo|bi|bo)$'
  only the experts. A pattern that matches no parameter, or every one, is a
  one-line error.
  """
  regex = re.compile(pattern)
  mask = jax.tree_util.tree_map_with_path(
    lambda path, _: bool(regex.search('/'.join(str(getattr(k, 'key', k)) for k in path))), params
  )
  flags = jax.tree.leaves(mask)
  if not any(flags) or all(flags):
    what = 'no parameter' if not any(flags) else 'every parameter (nothing would train)'
    raise UserError(
      f'optimizer.frozen={pattern!r} matches {what}; match parameter paths such as '
      "'embedding/kernel' or 'block_01/moe/wi', e.g. '^(?!head/)' to train only the head."
    )
  return mask


def freeze(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
  """`tx` with the parameters where `mask` is True frozen.

  Their gradients are zeroed before `tx` (so they count towards no global
  norm or statistics) and their updates after it (no weight decay either).
  Their optimizer state is still allocated.
  """

  def zero(tree):
    return jax.tree.map(lambda x, m: jnp.zeros_like(x) if m else x, tree, mask)

  def update_fn(grads, state, params=None):
    updates, state = tx.update(zero(grads), state, params)
    return zero(updates), state

  return optax.GradientTransformation(tx.init, update_fn)


def create_optimizer(
  config, schedule: Callable, params: Any, expert_mask: Any = None
) -> optax.GradientTransformation:
  """The optimizer of `config.optimizer` for `params` (arrays or shapes)."""
  tx = _create_optimizer(config, schedule, params, expert_mask)
  if config.optimizer.frozen:
    tx = freeze(tx, frozen_mask(params, config.optimizer.frozen))
  return tx


def _create_optimizer(config, schedule, params, expert_mask):
  opt = config.optimizer
  if opt.name not in OPTIMIZERS:
    raise UserError(f'optimizer {opt.name!r} is unknown; use one of {OPTIMIZERS}.')
  decay_tree = weight_decay_tree(params, opt.weight_decay, opt.head_weight_decay)
  has_decay = opt.learning_rate > 0 and any(jax.tree.leaves(decay_tree))
  if opt.name == 'adafactor':
    return adafactor(
      schedule,
      beta1=opt.beta1,
      clip_norm=max(opt.grad_clip_norm, 0.0),
      weight_decay=decay_tree if has_decay else None,
      peak_learning_rate=opt.learning_rate,
      expert_mask=expert_mask,
      min_dim=opt.factored_min_dim,
    )
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  if opt.name == 'adamw':
    parts.append(optax.scale_by_adam(b1=opt.beta1, b2=opt.beta2))
  else:
    parts.append(optax.trace(decay=opt.beta1))
  parts.append(optax.scale_by_schedule(lambda t: -schedule(t)))
  if has_decay:
    parts.append(scheduled_weight_decay(schedule, opt.learning_rate, decay_tree))
  return optax.chain(*parts)


def state_bytes(tree: Any) -> int:
  """Bytes held by the arrays (or shape structs) of a pytree."""
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
