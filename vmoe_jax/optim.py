"""Optimizers: Adafactor as modified in Scaling Vision Transformers, AdamW, SGD.

Every optimizer is the same optax chain:

  clip_by_global_norm(grad_clip_norm)                  (if > 0)
  -> direction: scale_by_factored_rms + momentum | scale_by_adam | trace
  -> -lr(t) * direction - (lr(t) / peak_lr) * weight_decay * param

The weight decay is decoupled from the gradient (Loshchilov & Hutter 2019)
and follows the shape of the learning rate schedule; the head kernel has its
own (usually stronger) value, as in Zhai et al. 2022.

Adafactor (Shazeer & Stern 2018) with the changes of Zhai et al. 2022,
"Scaling Vision Transformers", Sec. 3.5 / Appendix D:
  * first moment (momentum) kept, in bfloat16;
  * second-moment decay beta2(t) = min(0.999, 1 - t^-0.8) (t counts from 1);
  * no scaling of the update by the parameter norm, no update clipping;
  * the second moment is factored (row and column means) over the two
    largest axes of a parameter when both are >= `factored_min_dim`; the
    experts axis of expert weights is never one of them, so every expert has
    its own factored statistics.
"""

from __future__ import annotations

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


class FactoredRmsState(NamedTuple):
  count: jax.Array
  v_row: Any  # Per parameter: row means of g^2, or a (1,) placeholder.
  v_col: Any
  v: Any  # Per parameter: full second moment, or a (1,) placeholder.


def scale_by_factored_rms(
  expert_mask: Any = None,
  min_dim: int = 128,
  decay_exponent: float = 0.8,
  max_decay: float = 0.999,
  epsilon: float = 1e-30,
) -> optax.GradientTransformation:
  """Divides gradients by the root of their (factored) second moment.

  Args:
    expert_mask: pytree of bools like the params (or a prefix); True marks
      parameters whose axis 0 is the experts axis, never factored.
    min_dim: smallest axis length that may be factored.
    decay_exponent, max_decay: beta2(t) = min(max_decay, 1 - t^-decay_exponent).
    epsilon: added to g^2 (Adafactor's epsilon1).
  """

  def axes_tree(params):
    mask = expert_mask if expert_mask is not None else jax.tree.map(lambda _: False, params)
    return jax.tree.map(lambda p, m: factored_axes(p.shape, min_dim, bool(m)), params, mask)

  def init_fn(params):
    axes = axes_tree(params)
    placeholder = lambda: jnp.zeros((1,), jnp.float32)

    def row(p, ax):
      return jnp.zeros(_drop(p.shape, ax[1]), jnp.float32) if ax else placeholder()

    def col(p, ax):
      return jnp.zeros(_drop(p.shape, ax[0]), jnp.float32) if ax else placeholder()

    def full(p, ax):
      return placeholder() if ax else jnp.zeros(p.shape, jnp.float32)

    return FactoredRmsState(
      count=jnp.zeros([], jnp.int32),
      v_row=_map_with_axes(row, params, axes),
      v_col=_map_with_axes(col, params, axes),
      v=_map_with_axes(full, params, axes),
    )

  def update_fn(updates, state, params=None):
    del params
    axes = axes_tree(updates)
    count = state.count + 1
    t = count.astype(jnp.float32)
    beta2 = jnp.minimum(max_decay, 1.0 - jnp.power(t, -decay_exponent))

    def one(g, ax, v_row, v_col, v):
      g = g.astype(jnp.float32)
      g2 = jnp.square(g) + epsilon
      if ax:
        row_axis, col_axis = ax
        new_row = beta2 * v_row + (1 - beta2) * jnp.mean(g2, axis=col_axis)
        new_col = beta2 * v_col + (1 - beta2) * jnp.mean(g2, axis=row_axis)
        # v_hat[i, j] = row[i] * col[j] / mean(row): rank-1 estimate of E[g^2].
        row_mean = jnp.mean(new_row, axis=row_axis, keepdims=True)
        row_factor = jnp.expand_dims(new_row / row_mean, col_axis)
        col_factor = jnp.expand_dims(new_col, row_axis)
        update = g * jax.lax.rsqrt(row_factor) * jax.lax.rsqrt(col_factor)
        return update, new_row, new_col, v
      new_v = beta2 * v + (1 - beta2) * g2
      return g * jax.lax.rsqrt(new_v), v_row, v_col, new_v

    out = _map_with_axes(one, updates, axes, state.v_row, state.v_col, state.v)
    treedef = jax.tree.structure(updates)
    leaves = treedef.flatten_up_to(out)
    new_updates = treedef.unflatten([leaf[0] for leaf in leaves])
    new_state = FactoredRmsState(
      count=count,
      v_row=treedef.unflatten([leaf[1] for leaf in leaves]),
      v_col=treedef.unflatten([leaf[2] for leaf in leaves]),
      v=treedef.unflatten([leaf[3] for leaf in leaves]),
    )
    return new_updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _drop(shape, axis):
  return tuple(d for i, d in enumerate(shape) if i != axis)


def _map_with_axes(fn, params, axes, *rest):
  """tree.map over params whose `axes` leaves may be None or tuples."""
  treedef = jax.tree.structure(params)
  axes_leaves = treedef.flatten_up_to(axes)
  rest_leaves = [treedef.flatten_up_to(r) for r in rest]
  leaves = [
    fn(p, ax, *(r[i] for r in rest_leaves))
    for i, (p, ax) in enumerate(zip(treedef.flatten_up_to(params), axes_leaves))
  ]
  return treedef.unflatten(leaves)


def momentum_in(dtype, beta1: float) -> optax.GradientTransformation:
  """m = beta1 * m + (1 - beta1) * u, stored in `dtype`; returns m (float32)."""

  def init_fn(params):
    return jax.tree.map(lambda p: jnp.zeros(p.shape, dtype), params)

  def update_fn(updates, state, params=None):
    del params
    new_m = jax.tree.map(
      lambda u, m: beta1 * m.astype(jnp.float32) + (1.0 - beta1) * u, updates, state
    )
    return new_m, jax.tree.map(lambda m: m.astype(dtype), new_m)

  return optax.GradientTransformation(init_fn, update_fn)


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
  """Per-parameter decay: head kernel -> head_weight_decay, other kernels and
  expert weights -> weight_decay, biases/norms/embeddings -> 0."""

  def decay(path, _):
    names = [getattr(k, 'key', str(k)) for k in path]
    name = names[-1]
    if names[0] == 'head' and name == 'kernel':
      return head_weight_decay
    if name in ('kernel', 'wi', 'wo'):
      return weight_decay
    return 0.0

  return jax.tree_util.tree_map_with_path(decay, params)


def create_optimizer(
  config, schedule: Callable, params: Any, expert_mask: Any = None
) -> optax.GradientTransformation:
  """The optimizer of `config.optimizer` for `params` (arrays or shapes)."""
  opt = config.optimizer
  if opt.name not in OPTIMIZERS:
    raise UserError(f'optimizer {opt.name!r} is unknown; use one of {OPTIMIZERS}.')
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  if opt.name == 'adafactor':
    parts.append(scale_by_factored_rms(expert_mask, min_dim=opt.factored_min_dim))
    if opt.beta1 > 0:
      parts.append(momentum_in(jnp.bfloat16, opt.beta1))
  elif opt.name == 'adamw':
    parts.append(optax.scale_by_adam(b1=opt.beta1, b2=opt.beta2))
  else:
    parts.append(optax.trace(decay=opt.beta1))
  parts.append(optax.scale_by_schedule(lambda t: -schedule(t)))
  decay_tree = weight_decay_tree(params, opt.weight_decay, opt.head_weight_decay)
  if opt.learning_rate > 0 and any(jax.tree.leaves(decay_tree)):
    parts.append(scheduled_weight_decay(schedule, opt.learning_rate, decay_tree))
  return optax.chain(*parts)


def state_bytes(tree: Any) -> int:
  """Bytes held by the arrays (or shape structs) of a pytree."""
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
