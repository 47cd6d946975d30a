"""Routing against hand-worked examples and a NumPy reference of the contract."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmoe_jax.moe import routing


def reference_route(gates, num_selected, capacity, batch_priority, renormalize=False):
  """Direct loop transcription of docs/design.md, 'Routing contract', for one group (S, E)."""
  num_tokens, num_experts = gates.shape
  # Top-k with ties to the lower expert index: sort by (-gate, index).
  order_k = [
    sorted(range(num_experts), key=lambda e: (-gates[s, e], e))[:num_selected]
    for s in range(num_tokens)
  ]
  expert = np.array(order_k, np.int32)
  weight = np.take_along_axis(gates, expert, axis=1).astype(np.float64)
  if batch_priority:
    tokens = sorted(range(num_tokens), key=lambda s: (-gates[s, expert[s, 0]], s))
  else:
    tokens = list(range(num_tokens))
  fill = [0] * num_experts
  slot = np.full((num_tokens, num_selected), -1, np.int32)
  for k in range(num_selected):
    for s in tokens:
      e = expert[s, k]
      if fill[e] < capacity:
        slot[s, k] = fill[e]
      fill[e] += 1
  if renormalize:
    weight = weight / weight.sum(axis=1, keepdims=True)
  weight = np.where(slot >= 0, weight, 0.0)
  return expert, slot, weight


def test_capacity_formula():
  # C = ceil(K * S * cf / E), at least 1, optionally rounded up.
  assert routing.compute_capacity(64, 8, 1, 1.0) == 8
  assert routing.compute_capacity(64, 8, 2, 1.25) == 20
  assert routing.compute_capacity(10, 64, 1, 1.0) == 1
  assert routing.compute_capacity(100, 8, 1, 1.0) == 13
  assert routing.compute_capacity(100, 8, 1, 1.0, multiple_of=4) == 16
  with pytest.raises(ValueError, match='capacity_factor'):
    routing.compute_capacity(10, 2, 1, 0.0)


def test_hand_worked_top1_capacity_token_order():
  # 4 tokens, 2 experts, capacity 1: tokens 0,1,3 choose expert 0, token 2 expert 1.
  gates = jnp.array([[0.6, 0.4], [0.9, 0.1], [0.3, 0.7], [0.8, 0.2]])
  r = routing.route(gates, num_selected=1, capacity=1)
  np.testing.assert_array_equal(r.expert_index[:, 0], [0, 0, 1, 0])
  # Token order: token 0 gets expert 0's only slot; 1 and 3 are dropped.
  np.testing.assert_array_equal(r.slot[:, 0], [0, -1, 0, -1])
  np.testing.assert_allclose(r.combine_weight[:, 0], [0.6, 0.0, 0.7, 0.0])


def test_hand_worked_bpr_keeps_confident_tokens():
  gates = jnp.array([[0.6, 0.4], [0.9, 0.1], [0.3, 0.7], [0.8, 0.2]])
  r = routing.route(gates, num_selected=1, capacity=2, batch_priority=True)
  # Priority by top-1 gate: token 1 (0.9), 3 (0.8), 2 (0.7), 0 (0.6).
  # Expert 0 gets tokens 1 and 3 (slots 0, 1); token 0 is dropped.
  np.testing.assert_array_equal(r.slot[:, 0], [-1, 0, 0, 1])


def test_ties_go_to_lower_expert_and_earlier_token():
  gates = jnp.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
  r = routing.route(gates, num_selected=1, capacity=2, batch_priority=True)
  np.testing.assert_array_equal(r.expert_index[:, 0], [0, 0, 0])
  # Equal top-1 gates: BPR is stable, so token order decides.
  np.testing.assert_array_equal(r.slot[:, 0], [0, 1, -1])


def test_hand_worked_k2_bpr_first_choices_before_second():
  # 3 tokens, 3 experts, capacity 1, K=2, BPR.
  gates = jnp.array(
    [
      [0.5, 0.3, 0.2],  # choices 0 then 1; top-1 0.5
      [0.1, 0.6, 0.3],  # choices 1 then 2; top-1 0.6
      [0.45, 0.15, 0.4],  # choices 0 then 2; top-1 0.45
    ]
  )
  r = routing.route(gates, num_selected=2, capacity=1, batch_priority=True)
  # Priority: token 1, token 0, token 2.
  # 1st choices: t1->e1 slot 0; t0->e0 slot 0; t2->e0 dropped.
  # 2nd choices: t1->e2 slot 0; t0->e1 dropped (full); t2->e2 dropped.
  np.testing.assert_array_equal(r.expert_index, [[0, 1], [1, 2], [0, 2]])
  np.testing.assert_array_equal(r.slot, [[0, -1], [0, 0], [-1, -1]])
  np.testing.assert_allclose(r.combine_weight, [[0.5, 0], [0.6, 0.3], [0, 0]])


def test_renormalize():
  gates = jnp.array([[0.5, 0.3, 0.2]])
  r = routing.route(gates, num_selected=2, capacity=4, renormalize=True)
  np.testing.assert_allclose(r.combine_weight, [[0.625, 0.375]], rtol=1e-6)


@pytest.mark.parametrize('num_selected', [1, 2, 3])
@pytest.mark.parametrize('batch_priority', [False, True])
@pytest.mark.parametrize('capacity_factor', [0.5, 1.0, 1.5])
def test_matches_numpy_reference(num_selected, batch_priority, capacity_factor):
  rng = np.random.default_rng(num_selected * 10 + int(batch_priority))
  groups, tokens, experts = 3, 40, 6
  logits = rng.normal(size=(groups, tokens, experts))
  # Quantise so that ties happen, between experts and between tokens.
  logits = np.round(logits * 2) / 2
  gates = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
  capacity = routing.compute_capacity(tokens, experts, num_selected, capacity_factor)
  r = routing.route(
    jnp.asarray(gates), num_selected=num_selected, capacity=capacity, batch_priority=batch_priority
  )
  for g in range(groups):
    expert, slot, weight = reference_route(gates[g], num_selected, capacity, batch_priority)
    np.testing.assert_array_equal(r.expert_index[g], expert)
    np.testing.assert_array_equal(r.slot[g], slot)
    np.testing.assert_allclose(r.combine_weight[g], weight, rtol=1e-6)


def test_slots_are_a_valid_assignment():
  rng = np.random.default_rng(0)
  gates = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 100, 8)), jnp.float32))
  r = routing.route(gates, num_selected=2, capacity=20, batch_priority=True)
  for g in range(2):
    for e in range(8):
      slots = np.asarray(r.slot[g])[np.asarray(r.expert_index[g]) == e]
      kept = np.sort(slots[slots >= 0])
      # Kept slots of an expert are exactly 0..n-1, n = min(C, assignments).
      np.testing.assert_array_equal(kept, np.arange(min(20, len(slots))))


def test_low_capacity_bpr_keeps_at_most_the_capacity():
  # Eval capacity factor 0.5: at most half the tokens can be processed.
  rng = np.random.default_rng(1)
  tokens, experts = 64, 4
  gates = jax.nn.softmax(jnp.asarray(rng.normal(size=(1, tokens, experts)), jnp.float32))
  capacity = routing.compute_capacity(tokens, experts, 1, 0.5)
  r = routing.route(gates, num_selected=1, capacity=capacity, batch_priority=True)
  kept = int(jnp.sum(r.slot >= 0))
  assert kept <= math.ceil(0.5 * tokens)
  # And BPR keeps the most confident tokens of each expert.
  top1 = np.asarray(gates[0].max(-1))
  for e in range(experts):
    mine = np.asarray(r.expert_index[0, :, 0]) == e
    kept_e = mine & (np.asarray(r.slot[0, :, 0]) >= 0)
    dropped_e = mine & ~kept_e
    if kept_e.any() and dropped_e.any():
      assert top1[kept_e].min() >= top1[dropped_e].max()


def test_unbatched_gates_and_bad_k():
  gates = jnp.full((5, 4), 0.25)
  r = routing.route(gates, num_selected=1, capacity=2)
  assert r.slot.shape == (5, 1)
  with pytest.raises(ValueError, match='num_selected'):
    routing.route(gates, num_selected=5, capacity=2)


def test_jit_many_experts():
  route = jax.jit(routing.route, static_argnames=('num_selected', 'capacity', 'batch_priority'))
  gates = jax.nn.softmax(jax.random.normal(jax.random.key(0), (2, 512, 64)))
  r = route(gates, num_selected=2, capacity=20, batch_priority=True)
  assert r.expert_index.shape == (2, 512, 2)
