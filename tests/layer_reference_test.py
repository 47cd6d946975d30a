"""The MoE layer against a per-token loop reference, for every router.

The reference is written from the papers' definitions in NumPy (float64), by
loops over tokens and experts, sharing no code with `vmoe_jax.moe`:
  y[s] = sum over the (expert e, weight w) pairs that processed token s of
         w * MLP_e(x[s]),   MLP_e(x) = gelu(x W_in[e] + b_in[e]) W_out[e] + b_out[e].
Which pairs those are is each router's definition: top-k with capacity in
priority order (vanilla or BPR), top-k without capacity (dropless), the top-C
tokens of every expert (Expert Choice), top-k of every image's mean token with
capacity counted in images (image-level), and Soft MoE's dense slot mixing.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from routing_test import reference_route

from vmoe_jax.moe import layer
from vmoe_jax.moe.spec import MoeSpec

NUM_EXPERTS, WIDTH, HIDDEN, TOKENS = 4, 8, 16, 6


def gelu(x):
  """The tanh approximation (flax.linen.gelu's default)."""
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def softmax(z, axis=-1):
  z = z - z.max(axis=axis, keepdims=True)
  return np.exp(z) / np.exp(z).sum(axis=axis, keepdims=True)


def expert(params, e, x):
  return gelu(x @ params['wi'][e] + params['bi'][e]) @ params['wo'][e] + params['bo'][e]


def capacity(num, k, cf):
  return max(1, math.ceil(k * num * cf / NUM_EXPERTS))


def reference_assignments(router, gates, k, cf, bpr, tokens_per_image):
  """[(token, expert, weight)] of one group: gates (S, E) float64."""
  num_tokens = gates.shape[0]
  if router in ('topk', 'dropless'):
    cap = capacity(num_tokens, k, cf) if router == 'topk' else num_tokens * k
    experts, slots, weights = reference_route(gates, k, cap, bpr)
    return [
      (s, experts[s, j], weights[s, j])
      for s in range(num_tokens)
      for j in range(k)
      if slots[s, j] >= 0
    ]
  if router == 'expert_choice':
    cap = min(num_tokens, capacity(num_tokens, 1, cf))
    out = []
    for e in range(NUM_EXPERTS):
      chosen = sorted(range(num_tokens), key=lambda s: (-gates[s, e], s))[:cap]
      out += [(s, e, gates[s, e]) for s in chosen]
    return out
  if router == 'image_topk':
    raise AssertionError('image_topk needs the logits, see reference_layer')
  raise ValueError(router)


def reference_layer(x, params, router, k, cf, bpr, group_size):
  """y (B, T, D) of the MoE MLP, by loops."""
  x, params = np.asarray(x, np.float64), jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  batch, tokens, width = x.shape
  groups = x.reshape(batch // group_size, group_size * tokens, width)
  y = np.zeros_like(groups)
  for g, xg in enumerate(groups):
    if router == 'soft':
      y[g] = reference_soft(xg, params)
      continue
    logits = xg @ params['router']
    if router == 'image_topk':
      image_gates = softmax(logits.reshape(group_size, tokens, -1).mean(axis=1))
      experts, slots, weights = reference_route(image_gates, k, capacity(group_size, k, cf), bpr)
      pairs = [
        (n * tokens + t, experts[n, j], weights[n, j])
        for n in range(group_size)
        for j in range(k)
        if slots[n, j] >= 0
        for t in range(tokens)
      ]
    else:
      pairs = reference_assignments(router, softmax(logits), k, cf, bpr, tokens)
    for s, e, w in pairs:
      y[g, s] += w * expert(params, e, xg[s])
  return y.reshape(batch, tokens, width)


def reference_soft(xg, params):
  """Soft MoE on one group (S, D): slots = softmax over tokens, outputs = softmax over slots."""
  unit = xg / np.sqrt((xg**2).sum(-1, keepdims=True) + 1e-6)
  phi = params['router'] / np.sqrt((params['router'] ** 2).sum(0, keepdims=True) + 1e-6)
  logits = params['router_scale'] * unit @ phi  # (S, E * P)
  dispatch = softmax(logits, axis=0)  # Every slot: a convex mix of the tokens.
  combine = softmax(logits, axis=1)  # Every token: a convex mix of the slots.
  slots_per_expert = logits.shape[1] // NUM_EXPERTS
  outputs = np.stack(
    [expert(params, j // slots_per_expert, dispatch[:, j] @ xg) for j in range(logits.shape[1])]
  )
  return combine @ outputs


CASES = [
  ('topk', 1, 1.0, False),
  ('topk', 1, 0.5, True),  # Drops, BPR.
  ('topk', 2, 0.75, False),  # Drops of 2nd choices, vanilla.
  ('topk', 2, 0.5, True),
  ('dropless', 1, 1.0, False),
  ('dropless', 2, 1.0, False),
  ('expert_choice', 1, 1.0, False),
  ('expert_choice', 1, 0.5, False),
  ('image_topk', 1, 1.0, True),
  ('image_topk', 2, 0.75, False),
  ('soft', 1, 1.0, False),
]


@pytest.mark.parametrize('router,k,cf,bpr', CASES)
def test_layer_matches_the_loop_reference(router, k, cf, bpr):
  spec = MoeSpec(
    num_experts=NUM_EXPERTS,
    layers=(0,),
    mlp_dim=HIDDEN,
    router=router,
    num_selected=k,
    capacity_factor=cf,
    eval_capacity_factor=cf,
    batch_priority=bpr,
    eval_batch_priority=bpr,
    group_size=2,
    block_size=4,
  )
  x = jax.random.normal(jax.random.key(0), (4, TOKENS, WIDTH))
  mlp = layer.MoeMlp(spec)
  params = jax.tree.map(
    lambda a: a.value if hasattr(a, 'value') else a,
    mlp.init(jax.random.key(1), x, train=False)['params'],
    is_leaf=lambda a: hasattr(a, 'value'),
  )
  # Larger biases than the init's 1e-6, so that a missing bias term would show.
  keys = jax.random.split(jax.random.key(2), 2)
  params['bi'] = 0.1 * jax.random.normal(keys[0], params['bi'].shape)
  params['bo'] = 0.1 * jax.random.normal(keys[1], params['bo'].shape)
  y, metrics = jax.jit(lambda p: mlp.apply({'params': p}, x, train=False))(params)
  expected = reference_layer(x, params, router, k, cf, bpr, group_size=2)
  scale = np.abs(expected).max()
  np.testing.assert_allclose(np.asarray(y, np.float64), expected, atol=1e-5 * scale)
  if router in ('dropless', 'soft'):
    assert float(metrics['dropped']) == 0.0
  if (router, cf) in (('topk', 0.5), ('image_topk', 0.75)):
    assert float(metrics['dropped']) > 0  # The case exercises dropping.


def test_dropless_on_many_tokens_drops_nothing_and_matches_the_loop():
  """Skewed routing: most tokens pick expert 0, which no capacity would hold."""
  spec = MoeSpec(
    num_experts=NUM_EXPERTS,
    layers=(0,),
    mlp_dim=HIDDEN,
    router='dropless',
    num_selected=2,
    group_size=0,
    block_size=8,
  )
  # Every token shares a direction u that the router maps onto expert 0.
  u = jnp.ones((WIDTH,)) / math.sqrt(WIDTH)
  x = jax.random.normal(jax.random.key(3), (16, TOKENS, WIDTH)) + 3.0 * u
  mlp = layer.MoeMlp(spec)
  variables = mlp.init(jax.random.key(4), x, train=False)
  params = jax.tree.map(
    lambda a: getattr(a, 'value', a), variables['params'], is_leaf=lambda a: hasattr(a, 'value')
  )
  params['router'] = params['router'].at[:, 0].set(3.0 * u)
  y, metrics = mlp.apply({'params': params}, x, train=False)
  # Nearly every token has expert 0 among its K = 2: half of all assignments.
  assert float(metrics['expert_load'][0]) > 0.45 and float(metrics['dropped']) == 0.0
  expected = reference_layer(x, params, 'dropless', 2, 1.0, False, group_size=16)
  np.testing.assert_allclose(
    np.asarray(y, np.float64), expected, atol=1e-5 * np.abs(expected).max()
  )
