"""Dispatch plans by indices against their one-hot einsum reference (`plans.to_dense`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmoe_jax.moe import plans
from vmoe_jax.moe import routing


def _setup(seed=0, groups=2, tokens=24, experts=4, width=5, k=2, cf=0.75, bpr=True):
  keys = jax.random.split(jax.random.key(seed), 2)
  x = jax.random.normal(keys[0], (groups, tokens, width))
  gates = jax.nn.softmax(jax.random.normal(keys[1], (groups, tokens, experts)))
  capacity = routing.compute_capacity(tokens, experts, k, cf)
  r = routing.route(gates, num_selected=k, capacity=capacity, batch_priority=bpr)
  return x, gates, r, experts, capacity


def test_hand_worked_dispatch_and_combine():
  x = jnp.array([[[1.0], [2.0], [3.0]]])  # (G=1, S=3, D=1)
  r = routing.Routing(
    expert_index=jnp.array([[[1], [0], [1]]]),
    slot=jnp.array([[[0], [0], [-1]]]),  # token 2 dropped
    combine_weight=jnp.array([[[0.5], [0.25], [0.0]]]),
  )
  plan = plans.from_routing(r, num_experts=2, capacity=2)
  np.testing.assert_array_equal(plan.source[0], [[1, 3], [0, 3]])  # 3 = S: an empty slot
  buffers = plans.dispatch(x, plan)
  np.testing.assert_array_equal(buffers[0, :, :, 0], [[2.0, 0.0], [1.0, 0.0]])
  y = plans.combine(buffers * 10, plan, num_tokens=3)  # an "expert" that multiplies by 10
  np.testing.assert_allclose(y[0, :, 0], [5.0, 5.0, 0.0])


def test_hand_worked_slot_major_combine():
  """Expert Choice's form: every slot adds weight * output to its token."""
  plan = plans.SlotPlan(
    source=jnp.array([[[0, 2], [0, 3]]]),  # expert 0 took tokens 0, 2; expert 1 token 0
    slot_weight=jnp.array([[[0.5, 1.0], [0.25, 0.0]]]),
  )
  out = jnp.array([[[[1.0], [2.0]], [[4.0], [8.0]]]])  # (G, E, C, D=1)
  y = plans.combine(out, plan, num_tokens=3)
  np.testing.assert_allclose(y[0, :, 0], [0.5 * 1 + 0.25 * 4, 0.0, 2.0])
  np.testing.assert_allclose(plans.combine(out, plans.to_dense(plan, 3), 3), y)


@pytest.mark.parametrize('k,bpr,cf', [(1, False, 1.0), (2, True, 0.75), (2, False, 2.0)])
def test_indices_match_einsum(k, bpr, cf):
  x, _, r, e, c = _setup(k=k, bpr=bpr, cf=cf)
  plan = plans.from_routing(r, e, c)
  dense = plans.to_dense(plan, x.shape[1])
  np.testing.assert_allclose(plans.dispatch(x, plan), plans.dispatch(x, dense), atol=1e-6)
  out = jax.random.normal(jax.random.key(5), (x.shape[0], e, c, x.shape[-1]))
  np.testing.assert_allclose(
    plans.combine(out, plan, x.shape[1]), plans.combine(out, dense, x.shape[1]), atol=1e-6
  )


def test_gradients_match_einsum():
  x, gates, _, e, c = _setup()
  w = jax.random.normal(jax.random.key(7), (e, x.shape[-1], x.shape[-1]))

  def loss(x, gates, dense):
    r = routing.route(gates, num_selected=2, capacity=c, batch_priority=True)
    plan = plans.from_routing(r, e, c)
    if dense:
      plan = plans.to_dense(plan, x.shape[1])
    out = jnp.tanh(jnp.einsum('gecd,edf->gecf', plans.dispatch(x, plan), w))
    return jnp.sum(plans.combine(out, plan, x.shape[1]) ** 2)

  g_idx = jax.grad(loss, argnums=(0, 1))(x, gates, False)
  g_ein = jax.grad(loss, argnums=(0, 1))(x, gates, True)
  for a, b in zip(g_idx, g_ein):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # The router gets a gradient through the combine weights.
  assert float(jnp.abs(g_idx[1]).sum()) > 0


def test_dropped_tokens_contribute_zero():
  x, _, r, e, c = _setup(cf=0.25)
  assert int(jnp.sum(r.slot < 0)) > 0
  out = jnp.ones((x.shape[0], e, c, x.shape[-1]))
  y = plans.combine(out, plans.from_routing(r, e, c), x.shape[1])
  # With all-ones expert outputs, y = sum of kept combine weights per token.
  np.testing.assert_allclose(y[..., 0], r.combine_weight.sum(-1), rtol=1e-6)
  fully_dropped = np.asarray(jnp.all(r.slot < 0, axis=-1))
  assert np.all(np.asarray(y)[fully_dropped] == 0)
