"""The dropless grouped matmul: the ragged_dot path (GPU/TPU) forced on the CPU.

XLA's CPU backend runs `jax.lax.ragged_dot` (densely, slowly, correctly at
these sizes), so the path that GPU and TPU take is checked here: against the
per-token loop reference, against the block path's gradients, on empty rows
(past sum(group_sizes)), and sharded over the expert axis.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from layer_reference_test import reference_layer

from vmoe_jax.moe import dropless
from vmoe_jax.moe import layer
from vmoe_jax.moe.spec import MoeSpec
from vmoe_jax.runtime import sharding

EXPERTS, WIDTH, HIDDEN = 4, 8, 16


def expert_params(seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  return {
    'wi': jax.random.normal(keys[0], (EXPERTS, WIDTH, HIDDEN)) / np.sqrt(WIDTH),
    'bi': 0.1 * jax.random.normal(keys[1], (EXPERTS, HIDDEN)),
    'wo': jax.random.normal(keys[2], (EXPERTS, HIDDEN, WIDTH)) / np.sqrt(HIDDEN),
    'bo': 0.1 * jax.random.normal(keys[3], (EXPERTS, WIDTH)),
  }


def rows_and_experts():
  """12 rows: experts 2, 0, E (empty), 3, 0, 0, E, 1, 2, 0, 3, E."""
  rows = jax.random.normal(jax.random.key(5), (12, WIDTH))
  expert = jnp.array([2, 0, EXPERTS, 3, 0, 0, EXPERTS, 1, 2, 0, 3, EXPERTS], jnp.int32)
  return rows, expert


def grouped(impl, params, rows, expert):
  return dropless.grouped_mlp(rows, expert, params, block_size=4, dtype=jnp.float32, impl=impl)


def test_ragged_rows_match_each_expert_alone_and_empty_rows_are_zero():
  params = expert_params()
  rows, expert = rows_and_experts()
  out = np.asarray(jax.jit(lambda p, r: grouped('ragged', p, r, expert))(params, rows))
  for i, e in enumerate(np.asarray(expert)):
    if e == EXPERTS:  # Sorted past sum(group_sizes): zero, whatever ragged_dot leaves there.
      np.testing.assert_array_equal(out[i], 0.0)
      continue
    h = nn.gelu(rows[i] @ params['wi'][e] + params['bi'][e])
    np.testing.assert_allclose(out[i], h @ params['wo'][e] + params['bo'][e], rtol=1e-5, atol=1e-6)


def test_ragged_gradients_equal_the_block_path_and_are_finite():
  params = expert_params()
  rows, expert = rows_and_experts()
  cotangent = jax.random.normal(jax.random.key(6), (12, WIDTH))

  def grads(impl):
    loss = lambda p, r: jnp.sum(grouped(impl, p, r, expert) * cotangent)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, rows)

  (p_ragged, r_ragged), (p_blocks, r_blocks) = grads('ragged'), grads('blocks')
  for name in params:
    assert np.all(np.isfinite(p_ragged[name])), name
    np.testing.assert_allclose(p_ragged[name], p_blocks[name], rtol=1e-5, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(r_ragged, r_blocks, rtol=1e-5, atol=1e-6)
  empty = np.asarray(expert) == EXPERTS
  np.testing.assert_array_equal(np.asarray(r_ragged)[empty], 0.0)  # No gradient into empty rows.


def dropless_spec(**fields):
  base = dict(
    num_experts=EXPERTS,
    layers=(0,),
    mlp_dim=HIDDEN,
    router='dropless',
    num_selected=2,
    group_size=2,
    block_size=4,
    grouped_matmul='ragged',
  )
  return MoeSpec(**{**base, **fields})


def test_ragged_layer_matches_the_loop_reference_with_padding():
  x = jax.random.normal(jax.random.key(0), (4, 6, WIDTH))
  mask = jnp.array([True, True, True, False])  # A padding image: empty rows in the matmul.
  mlp = layer.MoeMlp(dropless_spec())
  params = nn.meta.unbox(mlp.init(jax.random.key(1), x, train=False)['params'])
  params.update({k: v for k, v in expert_params(2).items()})
  y, metrics = jax.jit(lambda p: mlp.apply({'params': p}, x, train=False, mask=mask))(params)
  expected = reference_layer(x, params, 'dropless', 2, 1.0, False, group_size=2)
  scale = np.abs(expected).max()
  np.testing.assert_allclose(np.asarray(y[:3], np.float64), expected[:3], atol=1e-5 * scale)
  np.testing.assert_array_equal(y[3], 0.0)
  assert float(metrics['dropped']) == 0.0


@pytest.mark.parametrize('shards', [2, 4])
def test_sharded_ragged_layer_matches_the_unsharded_block_path(shards):
  """Outputs and gradients of the ragged layer on a mesh equal the CPU default, unsharded."""
  x = jax.random.normal(jax.random.key(0), (16, 6, WIDTH))  # 2 images a device.
  blocks = layer.MoeMlp(dropless_spec(grouped_matmul='blocks'))
  boxed = blocks.init(jax.random.key(1), x, train=False)['params']
  params = nn.meta.unbox(boxed)
  params.update({k: v for k, v in expert_params(3).items()})

  def loss(model, p):
    y, metrics = model.apply({'params': p}, x, train=False)
    return jnp.sum(jnp.sin(y)), metrics

  (ref, ref_metrics), ref_grads = jax.jit(
    jax.value_and_grad(lambda p: loss(blocks, p), has_aux=True)
  )(params)
  mesh = sharding.create_mesh(shards, EXPERTS)
  specs = sharding.param_specs(boxed)
  placed = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
  ragged = layer.MoeMlp(dropless_spec(), mesh=mesh)
  (got, metrics), grads = jax.jit(jax.value_and_grad(lambda p: loss(ragged, p), has_aux=True))(
    placed
  )
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  for name in params:
    np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(metrics['expert_load'], ref_metrics['expert_load'], rtol=1e-6)


def test_ragged_bias_gradients_in_bfloat16_are_summed_in_float32():
  """512 rows of one expert: the bias gradient is the sum of 512 row gradients."""
  params = expert_params()
  rows = jax.random.normal(jax.random.key(5), (512, WIDTH))
  expert = jnp.zeros((512,), jnp.int32)
  cotangent = jax.random.normal(jax.random.key(6), (512, WIDTH))

  def bias_grads(dtype):
    def loss(p):
      out = dropless.grouped_mlp(rows, expert, p, block_size=4, dtype=dtype, impl='ragged')
      return jnp.sum(out.astype(jnp.float32) * cotangent)

    return jax.jit(jax.grad(loss))(params)['bo'][0]

  exact = np.asarray(bias_grads(jnp.float32))  # The sum of the cotangent's rows.
  np.testing.assert_allclose(exact, np.asarray(cotangent).sum(0), rtol=1e-5, atol=1e-4)
  # In bfloat16 each row's cotangent is rounded (the output is bfloat16), but
  # their sum must be exact: a bfloat16 scatter-add would round 512 partial sums.
  rounded = np.asarray(cotangent.astype(jnp.bfloat16).astype(jnp.float32), np.float64).sum(0)
  np.testing.assert_allclose(np.asarray(bias_grads(jnp.bfloat16)), rounded, rtol=1e-3, atol=1e-3)
