"""Dropless experts: top-K assignments sorted by expert, a grouped matmul, no capacity.

Axis letters: A assignments (G * S * K on a device), E experts (E_l on this
device), D width, H expert hidden width, b rows per block, n expert shards.

Without capacity buffers the experts see a variable number of rows each. Two
grouped-matmul forms, chosen by the backend:
  * `ragged`: rows sorted by expert and `jax.lax.ragged_dot`, the grouped GEMM
    of GPU and TPU backends (MaxText's path);
  * `blocks` (the CPU): XLA's CPU backend computes `ragged_dot` densely (every
    row against every expert), so rows are sorted by expert, each expert's
    rows padded to a multiple of b, and one batched matmul runs over the
    blocks, every block with its expert's weights (MegaBlocks' block-sparse
    layout, Gale et al. 2022). At most A + E * b rows are computed.
Across expert shards (`exchange`), every device sends every other device a
fixed-size buffer of A rows (the worst case: all its assignments to one
shard), since ragged all-to-all does not run on the CPU backend; that costs n
times the memory and exchange of the capacity-buffer layout, and the grouped
matmul then runs on n * A rows (mostly padding blocks in the balanced case).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

EXPERT_AXIS = 'expert'


class SortedPlan(NamedTuple):
  """Every (token, choice) assignment of the groups of a device.

  expert_index: (G, S, K) int32; weight: (G, S, K) float32 combine weights
  (0 for padding tokens); mask: (G, S) bool or None.
  """

  expert_index: jax.Array
  weight: jax.Array
  mask: jax.Array | None = None


def default_impl() -> str:
  return 'blocks' if jax.default_backend() == 'cpu' else 'ragged'


def _sort_by(keys: jax.Array, num_groups: int):
  """(order, counts, starts) of a stable sort of int keys in [0, num_groups]."""
  order = jnp.argsort(keys, stable=True)
  counts = jnp.zeros((num_groups + 1,), jnp.int32).at[keys].add(1)
  starts = jnp.cumsum(counts) - counts
  return order, counts, starts


def _block_layout(expert: jax.Array, num_experts: int, block_size: int):
  """Rows of the block-padded layout: where each row goes, and each block's expert.

  Args:
    expert: (M,) int32 expert of every row; `num_experts` marks an empty row.

  Returns:
    position (M,) int32 (the padded row of each row; R for empty rows),
    block_expert (R / b,) int32, R (static).
  """
  num_rows = expert.shape[0]
  num_padded = block_size * (math.ceil(num_rows / block_size) + num_experts)
  order, counts, starts = _sort_by(expert, num_experts)
  padded = block_size * -(-counts[:num_experts] // block_size)  # (E,)
  padded_starts = jnp.cumsum(padded) - padded
  rank = jnp.zeros((num_rows,), jnp.int32).at[order].set(jnp.arange(num_rows, dtype=jnp.int32))
  safe = jnp.minimum(expert, num_experts - 1)
  position = padded_starts[safe] + rank - starts[safe]
  position = jnp.where(expert < num_experts, position, num_padded)
  block_start = block_size * jnp.arange(num_padded // block_size)
  ends = jnp.cumsum(padded)
  block_expert = jnp.minimum(jnp.searchsorted(ends, block_start, side='right'), num_experts - 1)
  return position.astype(jnp.int32), block_expert.astype(jnp.int32), num_padded


def _mlp(rows, wi, bi, wo, bo, dropout_key, rate, dtype, matmul, valid=None):
  """The expert MLP of every row; rows where `valid` (M,) is False give zeros.

  `jax.lax.ragged_dot` leaves the rows past sum(group_sizes) unspecified, so
  they are zeroed before the nonlinearity (whose backward pass would turn a
  non-finite value there into NaN gradients even behind a `where`) and after.
  """
  h = matmul(rows, wi) + bi
  if valid is not None:
    h = jnp.where(valid[..., None], h, 0)
  h = jax.nn.gelu(h)  # tanh approximation, as flax.linen.gelu in `layer.expert_mlp`.
  if dropout_key is not None and rate > 0:
    keep = jax.random.bernoulli(dropout_key, 1.0 - rate, h.shape)
    h = jnp.where(keep, h / (1.0 - rate), 0).astype(dtype)
  out = matmul(h, wo) + bo
  return out if valid is None else jnp.where(valid[..., None], out, 0)


def grouped_mlp(rows, expert, params, *, block_size, dtype, dropout_key=None, rate=0.0, impl=None):
  """Every row through its expert's MLP: (M, D), expert (M,) -> (M, D).

  `expert` == E (the number of experts in `params`) marks empty rows (zeros out).
  """
  num_experts = params['wi'].shape[0]
  wi, wo = params['wi'].astype(dtype), params['wo'].astype(dtype)
  bi, bo = params['bi'].astype(dtype), params['bo'].astype(dtype)
  impl = impl or default_impl()
  if impl == 'ragged':
    # Empty rows (expert == E) sort last, past sum(group_sizes).
    order, counts, _ = _sort_by(expert, num_experts)
    sorted_rows = rows[order]
    group_sizes = counts[:num_experts]
    sorted_expert = jnp.minimum(expert[order], num_experts - 1)
    # Biases gathered per row from the float32 parameters and cast after: the
    # gradient of the gather is a scatter-add over every row of an expert,
    # which in bfloat16 would lose a few percent of the bias gradient.
    out = _mlp(
      sorted_rows,
      wi,
      params['bi'][sorted_expert].astype(dtype),
      wo,
      params['bo'][sorted_expert].astype(dtype),
      dropout_key,
      rate,
      dtype,
      lambda x, w: jax.lax.ragged_dot(x, w, group_sizes),
      valid=expert[order] < num_experts,
    )
    return jnp.zeros_like(out).at[order].set(out)
  position, block_expert, num_padded = _block_layout(expert, num_experts, block_size)
  width = rows.shape[-1]
  padded = jnp.zeros((num_padded, width), rows.dtype).at[position].set(rows, mode='drop')
  blocks = padded.reshape(-1, block_size, width)
  out = _mlp(
    blocks,
    wi[block_expert],
    bi[block_expert][:, None],
    wo[block_expert],
    bo[block_expert][:, None],
    dropout_key,
    rate,
    dtype,
    lambda x, w: jnp.einsum('nbd,ndh->nbh', x, w),
  )
  return out.reshape(num_padded, width).at[position].get(mode='fill', fill_value=0)


def _slots_by_destination(dest: jax.Array, num_shards: int) -> jax.Array:
  """The row of every assignment in its destination's send buffer: (M,) -> (M,)."""
  num_rows = dest.shape[0]
  order, _, starts = _sort_by(dest, num_shards - 1)
  rank = jnp.zeros((num_rows,), jnp.int32).at[order].set(jnp.arange(num_rows, dtype=jnp.int32))
  return rank - starts[dest]


def forward(
  xg, plan: SortedPlan, params, *, block_size, dtype, dropout_key, rate, num_shards, impl=None
):
  """The experts on every assignment of the device's groups: (G, S, D) -> (G, S, D).

  With num_shards > 1 this runs inside shard_map: `params` hold this device's
  E_l = E / n experts; assignments go to the shard of their expert and back
  through a fixed-size all_to_all (see the module docstring). `impl`: 'ragged',
  'blocks' or None (`default_impl`).
  """
  num_groups, num_tokens, width = xg.shape
  k = plan.expert_index.shape[-1]
  num_local = params['wi'].shape[0]
  expert = plan.expert_index.reshape(-1)  # (A,), assignments token-major.
  if plan.mask is not None:  # Padding tokens get no expert.
    valid = jnp.repeat(plan.mask.reshape(-1), k)
    expert = jnp.where(valid, expert, num_local * num_shards)
  rows = jnp.repeat(xg.reshape(-1, width), k, axis=0)  # (A, D)
  if num_shards == 1:
    out = grouped_mlp(
      rows,
      expert,
      params,
      block_size=block_size,
      dtype=dtype,
      dropout_key=dropout_key,
      rate=rate,
      impl=impl,
    )
  else:
    out = _exchange_and_run(
      rows,
      expert,
      params,
      num_shards,
      block_size=block_size,
      dtype=dtype,
      dropout_key=dropout_key,
      rate=rate,
      impl=impl,
    )
  out = out.reshape(num_groups, num_tokens, k, width)
  return jnp.einsum('gskd,gsk->gsd', out, plan.weight.astype(out.dtype))


def _exchange_and_run(rows, expert, params, num_shards, **kwargs):
  """Assignments to the shards of their experts, the grouped MLP there, and back."""
  num_rows, width = rows.shape
  num_local = params['wi'].shape[0]
  dest = jnp.minimum(expert // num_local, num_shards)  # n: padding (no shard).
  local = jnp.where(dest < num_shards, expert % num_local, num_local)
  slot = _slots_by_destination(jnp.minimum(dest, num_shards - 1), num_shards)
  keep = dest < num_shards
  flat = jnp.where(keep, dest * num_rows + slot, num_shards * num_rows)
  send = jnp.zeros((num_shards * num_rows, width), rows.dtype).at[flat].set(rows, mode='drop')
  send_expert = jnp.full((num_shards * num_rows,), num_local, jnp.int32)
  send_expert = send_expert.at[flat].set(local, mode='drop')
  send = send.reshape(num_shards, num_rows, width)
  received = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True)
  received_expert = jax.lax.all_to_all(
    send_expert.reshape(num_shards, num_rows), EXPERT_AXIS, 0, 0, tiled=True
  )
  out = grouped_mlp(received.reshape(-1, width), received_expert.reshape(-1), params, **kwargs)
  back = jax.lax.all_to_all(out.reshape(num_shards, num_rows, width), EXPERT_AXIS, 0, 0, tiled=True)
  return back.reshape(-1, width).at[flat].get(mode='fill', fill_value=0)
