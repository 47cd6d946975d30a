"""Dispatch plans: how tokens go into the expert buffers and how outputs come back.

Axis letters as in `vmoe_jax.moe.routing` (G, S, E, K, C, D). A router
(`vmoe_jax.moe.routers`) turns gates into a plan; the layer then runs

  dispatch(x (G, S, D), plan) -> buffers (G, E, C, D)
  -> experts (possibly on other devices) ->
  combine(outputs (G, E, C, D), plan) -> y (G, S, D).

Two kinds of plan:
  * `SlotPlan` (by indices, the default): `source[g, e, c]` is the token that
    fills slot c of expert e (S for an empty slot). Outputs come back either
    token-major -- every token gathers its K kept assignments (`position`,
    `weight`: (G, S, K)), the form of top-k routers -- or slot-major -- every
    slot adds `slot_weight * output` to its token (Expert Choice, where a
    token may be taken by 0..E experts). The work is O(S * K * D) or
    O(E * C * D) per group, whatever E is.
  * `DensePlan`: dispatch and combine weights over all (token, expert, slot)
    triples, (G, S, E, C) each. Soft MoE's plan (every slot mixes all
    tokens), and the one-hot einsum reference of a `SlotPlan`
    (`to_dense`): the textbook form, whose cost O(S * E * C * D) per group
    grows with E at a fixed capacity factor.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vmoe_jax.moe.routing import Routing


class SlotPlan(NamedTuple):
  """Dispatch by indices.

  Attributes:
    source: (G, E, C) int32, the token of every buffer slot; S when empty.
    position: (G, S, K) int32, e * C + c of every kept assignment, E * C when
      dropped; None for slot-major plans.
    weight: (G, S, K) float32 combine weights (0 when dropped), or None.
    slot_weight: (G, E, C) float32 combine weight of every slot (0 when
      empty), for slot-major plans; else None.
  """

  source: jax.Array
  position: jax.Array | None = None
  weight: jax.Array | None = None
  slot_weight: jax.Array | None = None


class DensePlan(NamedTuple):
  """Dense dispatch: (G, S, E, C) dispatch and combine weights."""

  dispatch: jax.Array
  combine: jax.Array


def buffer_position(routing: Routing, capacity: int, num_experts: int) -> jax.Array:
  """Flat position e * C + slot of every assignment, E * C (out of range) when dropped."""
  return jnp.where(
    routing.slot >= 0, routing.expert_index * capacity + routing.slot, num_experts * capacity
  )


def slot_sources(routing: Routing, num_experts: int, capacity: int) -> jax.Array:
  """The token that fills each buffer slot: (G, S, K) routing -> (G, E * C) int32.

  Empty slots hold S (one past the last token), which gathers as zeros.
  """
  num_groups, num_tokens, _ = routing.slot.shape
  position = buffer_position(routing, capacity, num_experts)
  token = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32)[None, :, None], position.shape)
  rows = jnp.arange(num_groups)[:, None, None]
  sources = jnp.full((num_groups, num_experts * capacity), num_tokens, jnp.int32)
  # Dropped assignments point past the end and are discarded by mode='drop'.
  return sources.at[rows, position].set(token, mode='drop')


def from_routing(routing: Routing, num_experts: int, capacity: int) -> SlotPlan:
  """The token-major plan of a top-k `Routing` (G, S, K)."""
  num_groups = routing.slot.shape[0]
  source = slot_sources(routing, num_experts, capacity).reshape(num_groups, num_experts, capacity)
  return SlotPlan(
    source=source,
    position=buffer_position(routing, capacity, num_experts),
    weight=routing.combine_weight,
  )


def _gather_rows(table: jax.Array, index: jax.Array) -> jax.Array:
  """Per group, rows of (G, N, D) at (G, ...) indices; out-of-range indices give zeros."""
  return jax.vmap(lambda t, i: t.at[i].get(mode='fill', fill_value=0))(table, index)


def dispatch(x: jax.Array, plan: SlotPlan | DensePlan) -> jax.Array:
  """Tokens into expert buffers: (G, S, D) -> (G, E, C, D)."""
  if isinstance(plan, DensePlan):
    return jnp.einsum('gsec,gsd->gecd', plan.dispatch.astype(x.dtype), x)
  num_groups, num_experts, capacity = plan.source.shape
  buffers = _gather_rows(x, plan.source.reshape(num_groups, num_experts * capacity))
  return buffers.reshape(num_groups, num_experts, capacity, x.shape[-1])


def combine(out: jax.Array, plan: SlotPlan | DensePlan, num_tokens: int) -> jax.Array:
  """Expert outputs back to tokens: (G, E, C, D) -> (G, S, D).

  y[s] = sum over the slots (e, c) holding token s of weight * out[e, c];
  dropped assignments and empty slots contribute zero.
  """
  if isinstance(plan, DensePlan):
    return jnp.einsum('gsec,gecd->gsd', plan.combine.astype(out.dtype), out)
  num_groups, num_experts, capacity, width = out.shape
  flat = out.reshape(num_groups, num_experts * capacity, width)
  if plan.position is not None:
    gathered = _gather_rows(flat, plan.position)  # (G, S, K, D)
    return jnp.einsum('gskd,gsk->gsd', gathered, plan.weight.astype(out.dtype))
  weighted = flat * plan.slot_weight.reshape(num_groups, -1, 1).astype(out.dtype)
  source = plan.source.reshape(num_groups, -1)
  y = jnp.zeros((num_groups, num_tokens + 1, width), out.dtype)
  y = jax.vmap(lambda yg, sg, wg: yg.at[sg].add(wg))(y, source, weighted)
  return y[:, :num_tokens]


def to_dense(plan: SlotPlan, num_tokens: int) -> DensePlan:
  """The one-hot (G, S, E, C) weights of a `SlotPlan` (the einsum reference)."""
  dispatch_weights = jax.nn.one_hot(plan.source, num_tokens, dtype=jnp.float32, axis=1)
  if plan.position is not None:
    num_groups, num_experts, capacity = plan.source.shape
    slots = jax.nn.one_hot(plan.position, num_experts * capacity, dtype=jnp.float32)
    combine_weights = jnp.einsum('gskn,gsk->gsn', slots, plan.weight)
    combine_weights = combine_weights.reshape(num_groups, num_tokens, num_experts, capacity)
  else:
    combine_weights = dispatch_weights * plan.slot_weight[:, None]
  return DensePlan(dispatch=dispatch_weights, combine=combine_weights)
