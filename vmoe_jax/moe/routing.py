"""Top-k routing with expert capacity and Batch Prioritized Routing.

Pure functions: everything here is array math on gates, with no parameters.
The MoE layer (`vmoe_jax.moe.layer`) and both dispatch implementations
(`vmoe_jax.moe.dispatch`) are built on `route`.

Axis letters used in shapes:
  G: groups (routing is done per group, independently),
  S: tokens per group,
  E: experts,
  K: experts selected per token (`num_selected`),
  C: capacity, buffer slots per expert and group,
  D: model width.

The contract (see docs/design.md, "Routing contract"):
  * the K largest gates of a token choose its experts; equal gates go to the
    lower expert index (as `jax.lax.top_k` does);
  * assignments take slots in priority order, every 1st choice before any
    2nd choice. Vanilla priority is token order; Batch Prioritized Routing
    (Riquelme et al. 2021, "Scaling Vision with Sparse Mixture of Experts",
    Sec. 4.1) orders tokens by their top-1 gate, descending, stable on ties;
  * an assignment's slot is the number of earlier assignments to the same
    expert; it is dropped (slot -1, combine weight 0) when slot >= C.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
  """Where every (token, choice) goes. All arrays are (G, S, K) or (S, K).

  Attributes:
    expert_index: int32, the chosen expert of each choice.
    slot: int32, the position in that expert's buffer, -1 when dropped.
    combine_weight: float32, the gate of the choice (renormalised over the K
      choices if asked), 0 when the assignment was dropped.
  """

  expert_index: jax.Array
  slot: jax.Array
  combine_weight: jax.Array


def compute_capacity(
  num_tokens: int,
  num_experts: int,
  num_selected: int,
  capacity_factor: float,
  multiple_of: int = 1,
) -> int:
  """C = ceil(K * S * capacity_factor / E), at least 1, rounded up to a multiple."""
  if capacity_factor <= 0:
    raise ValueError(f'capacity_factor must be > 0, got {capacity_factor}.')
  capacity = max(1, math.ceil(num_selected * num_tokens * capacity_factor / num_experts))
  if multiple_of > 1:
    capacity = multiple_of * math.ceil(capacity / multiple_of)
  return capacity


def top_k_gates(gates: jax.Array, num_selected: int) -> tuple[jax.Array, jax.Array]:
  """The K largest gates per token: (..., S, E) -> values, indices (..., S, K).

  Equal gates go to the lower expert index.
  """
  values, indices = jax.lax.top_k(gates, num_selected)
  return values, indices.astype(jnp.int32)


def priority_rank(top1_gate: jax.Array, batch_priority: bool) -> jax.Array:
  """Rank of every token in the slot-filling order: (G, S) -> (G, S) int32.

  Rank 0 fills its slot first. Vanilla routing keeps token order; BPR sorts by
  the top-1 gate, descending, and keeps token order among equal gates.
  """
  num_groups, num_tokens = top1_gate.shape
  if not batch_priority:
    return jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), top1_gate.shape)
  order = jnp.argsort(-top1_gate, axis=-1, stable=True)  # order[r] = token of rank r.
  ranks = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), order.shape)
  rows = jnp.arange(num_groups)[:, None]
  return jnp.zeros_like(ranks).at[rows, order].set(ranks, unique_indices=True)


def assign_slots(expert_index: jax.Array, rank: jax.Array, num_experts: int) -> jax.Array:
  """Slot of every assignment before capacity is applied.

  Args:
    expert_index: (G, S, K) int32.
    rank: (G, S) int32, the priority rank of every token (see `priority_rank`).
    num_experts: E.

  Returns:
    (G, S, K) int32: how many assignments of higher priority (all earlier
    choices, then earlier ranks within the same choice) went to the same expert.

  The work is one sort of the K*S assignments per group, so the cost does not
  grow with E (a one-hot cumulative sum would cost O(K*S*E)).
  """
  num_groups, num_tokens, num_selected = expert_index.shape
  num_assignments = num_tokens * num_selected
  # Priority of an assignment: choice-major, then token rank.
  choice = jnp.arange(num_selected, dtype=jnp.int32)
  priority = choice[None, None, :] * num_tokens + rank[:, :, None]  # (G, S, K)
  # Sort key: expert first, then priority. Keys are unique within a group.
  key = (expert_index * num_assignments + priority).reshape(num_groups, num_assignments)
  perm = jnp.argsort(key, axis=-1)  # perm[j] = flat (s, k) index of the j-th assignment.
  flat_expert = expert_index.reshape(num_groups, num_assignments)
  rows = jnp.arange(num_groups)[:, None]
  counts = jnp.zeros((num_groups, num_experts), jnp.int32).at[rows, flat_expert].add(1)
  starts = jnp.cumsum(counts, axis=-1) - counts  # First sorted position of each expert.
  sorted_expert = jnp.take_along_axis(flat_expert, perm, axis=-1)
  sorted_slot = jnp.arange(num_assignments, dtype=jnp.int32)[None, :] - jnp.take_along_axis(
    starts, sorted_expert, axis=-1
  )
  slot = jnp.zeros_like(sorted_slot).at[rows, perm].set(sorted_slot, unique_indices=True)
  return slot.reshape(num_groups, num_tokens, num_selected)


def effective_capacity(
  mask: jax.Array | None,
  num_experts: int,
  num_selected: int,
  capacity_factor: float,
  multiple_of: int = 1,
) -> jax.Array | None:
  """The capacity of every group when only its unmasked tokens count: (G, S) -> (G,) int32.

  `compute_capacity` of the number of real tokens of each group (a lookup in
  a table of the S + 1 possible counts, so that it is exactly the static
  capacity when nothing is masked): with padded evaluation batches, the real
  rows route exactly as in an unpadded batch. None without a mask.
  """
  if mask is None:
    return None
  num_tokens = mask.shape[-1]
  table = jnp.array(
    [
      compute_capacity(max(n, 1), num_experts, num_selected, capacity_factor, multiple_of)
      for n in range(num_tokens + 1)
    ],
    jnp.int32,
  )
  return table[jnp.sum(mask.astype(jnp.int32), axis=-1)]


def route(
  gates: jax.Array,
  *,
  num_selected: int,
  capacity: int | jax.Array,
  batch_priority: bool = False,
  renormalize: bool = False,
  mask: jax.Array | None = None,
) -> Routing:
  """Routes tokens to experts: gates (G, S, E) or (S, E) -> Routing (G, S, K) or (S, K).

  Args:
    gates: router probabilities (softmax of the logits), float32.
    num_selected: K, experts per token (1: Switch, 2: V-MoE).
    capacity: C, slots per expert and group (see `compute_capacity`), or a
      (G,) array of per-group capacities (see `effective_capacity`).
    batch_priority: use Batch Prioritized Routing instead of token order.
    renormalize: divide the K selected gates by their sum.
    mask: (G, S) or (S,) bool, False for padding tokens: they take no slot,
      displace no real token and get combine weight 0.

  Returns:
    A `Routing`: expert index, slot (-1 when dropped) and combine weight
    (0 when dropped) of every token and choice.
  """
  squeeze = gates.ndim == 2
  if squeeze:
    gates = gates[None]
    mask = None if mask is None else mask[None]
  if gates.ndim != 3:
    raise ValueError(f'gates must be (G, S, E) or (S, E), got shape {gates.shape}.')
  num_experts = gates.shape[-1]
  if not 1 <= num_selected <= num_experts:
    raise ValueError(f'num_selected={num_selected} must be in [1, num_experts={num_experts}].')
  gate_values, expert_index = top_k_gates(gates, num_selected)
  rank = priority_rank(gate_values[..., 0], batch_priority)
  weights = gate_values
  if renormalize:
    weights = gate_values / jnp.sum(gate_values, axis=-1, keepdims=True)
  if mask is None:
    slot = assign_slots(expert_index, rank, num_experts)
  else:
    # Padding goes to a virtual expert E: it counts towards no real expert's slots.
    virtual = jnp.where(mask[..., None], expert_index, num_experts)
    slot = assign_slots(virtual, rank, num_experts + 1)
  capacity = jnp.asarray(capacity)
  kept = slot < (capacity[:, None, None] if capacity.ndim else capacity)
  if mask is not None:
    kept = kept & mask[..., None]
  routing = Routing(
    expert_index=expert_index,
    slot=jnp.where(kept, slot, -1),
    combine_weight=jnp.where(kept, weights, 0.0).astype(jnp.float32),
  )
  if squeeze:
    routing = Routing(*(a[0] for a in routing))
  return routing
