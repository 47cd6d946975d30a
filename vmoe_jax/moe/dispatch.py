"""Moving tokens into expert buffers and back, given a `Routing`.

Axis letters as in `vmoe_jax.moe.routing` (G, S, E, K, C, D).

Two implementations with the same results:
  * by indices (the default): a gather of the tokens into an (E, C) slot
    table and a gather of the expert outputs back; the work is O(S * K * D)
    per group whatever E is.
  * by a one-hot einsum (`*_einsum`), the textbook form, kept as a
    reference: the (S, E, C) dispatch tensor costs O(S * E * C * D) per group,
    which grows with E at a fixed capacity factor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vmoe_jax.moe.routing import Routing


def _buffer_position(routing: Routing, capacity: int, num_experts: int) -> jax.Array:
  """Flat position e * C + slot of every assignment, E * C (out of range) when dropped."""
  return jnp.where(
    routing.slot >= 0, routing.expert_index * capacity + routing.slot, num_experts * capacity
  )


def slot_sources(routing: Routing, num_experts: int, capacity: int) -> jax.Array:
  """The token that fills each buffer slot: (G, S, K) routing -> (G, E * C) int32.

  Empty slots hold S (one past the last token), which gathers as zeros.
  """
  num_groups, num_tokens, num_selected = routing.slot.shape
  position = _buffer_position(routing, capacity, num_experts)
  token = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32)[None, :, None], position.shape)
  rows = jnp.arange(num_groups)[:, None, None]
  sources = jnp.full((num_groups, num_experts * capacity), num_tokens, jnp.int32)
  # Dropped assignments point past the end and are discarded by mode='drop'.
  return sources.at[rows, position].set(token, mode='drop')


def dispatch(x: jax.Array, routing: Routing, num_experts: int, capacity: int) -> jax.Array:
  """Scatters tokens to expert buffers by indices: (G, S, D) -> (G, E, C, D)."""
  num_groups, _, width = x.shape
  sources = slot_sources(routing, num_experts, capacity)
  buffers = jax.vmap(lambda xg, sg: xg.at[sg].get(mode='fill', fill_value=0))(x, sources)
  return buffers.reshape(num_groups, num_experts, capacity, width)


def combine(expert_out: jax.Array, routing: Routing) -> jax.Array:
  """Gathers expert outputs back to tokens: (G, E, C, D) -> (G, S, D).

  y[s] = sum_k combine_weight[s, k] * expert_out[expert_index[s, k], slot[s, k]];
  dropped assignments contribute zero.
  """
  num_groups, num_experts, capacity, width = expert_out.shape
  flat = expert_out.reshape(num_groups, num_experts * capacity, width)
  position = _buffer_position(routing, capacity, num_experts)
  gathered = jax.vmap(lambda og, pg: og.at[pg].get(mode='fill', fill_value=0))(flat, position)
  weight = routing.combine_weight.astype(expert_out.dtype)
  return jnp.einsum('gskd,gsk->gsd', gathered, weight)


def dispatch_tensor(routing: Routing, num_experts: int, capacity: int) -> jax.Array:
  """One-hot (G, S, E, C) tensor: 1 where token s sits in slot c of expert e."""
  expert = jax.nn.one_hot(routing.expert_index, num_experts, dtype=jnp.float32)  # (G, S, K, E)
  slot = jax.nn.one_hot(routing.slot, capacity, dtype=jnp.float32)  # (G, S, K, C); -1 -> 0.
  return jnp.einsum('gske,gskc->gsec', expert, slot)


def dispatch_einsum(x: jax.Array, routing: Routing, num_experts: int, capacity: int) -> jax.Array:
  """Reference dispatch with a one-hot einsum: (G, S, D) -> (G, E, C, D)."""
  mask = dispatch_tensor(routing, num_experts, capacity).astype(x.dtype)
  return jnp.einsum('gsec,gsd->gecd', mask, x)


def combine_einsum(expert_out: jax.Array, routing: Routing) -> jax.Array:
  """Reference combine with a one-hot einsum: (G, E, C, D) -> (G, S, D)."""
  _, num_experts, capacity, _ = expert_out.shape
  expert = jax.nn.one_hot(routing.expert_index, num_experts, dtype=jnp.float32)
  slot = jax.nn.one_hot(routing.slot, capacity, dtype=jnp.float32)
  weights = jnp.einsum('gske,gskc,gsk->gsec', expert, slot, routing.combine_weight)
  return jnp.einsum('gsec,gecd->gsd', weights.astype(expert_out.dtype), expert_out)


DISPATCHERS = {
  'indices': (dispatch, combine),
  'einsum': (dispatch_einsum, combine_einsum),
}
