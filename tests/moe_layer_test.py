"""The MoE layer: expert parallelism matches the unsharded model; precision; errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from vmoe_jax import sharding
from vmoe_jax.errors import UserError
from vmoe_jax.models import vit
from vmoe_jax.moe import layer
from vmoe_jax.moe import losses
from vmoe_jax.moe.spec import MoeSpec

NUM_EXPERTS = 8


def make_spec(num_selected=1, batch_priority=False, **overrides):
  fields = dict(
    num_experts=NUM_EXPERTS,
    layers=(0, 1),
    mlp_dim=48,
    num_selected=num_selected,
    capacity_factor=1.0,
    batch_priority=batch_priority,
    eval_batch_priority=batch_priority,
    group_size=2,
    noise_std=1.0,
    block_size=16,
    load_balance_weight=0.01,
    importance_weight=0.005,
    load_weight=0.005,
    z_loss_weight=0.001,
  )
  fields.update(overrides)
  return MoeSpec(**fields)


def make_vit(mesh=None, num_selected=1, batch_priority=False, dtype=jnp.float32, **moe):
  return vit.ViT(
    num_classes=10,
    patch_size=4,
    width=32,
    depth=2,
    num_heads=2,
    mlp_dim=48,
    dtype=dtype,
    moe=make_spec(num_selected, batch_priority, **moe),
    mesh=mesh,
  )


@pytest.fixture(scope='module')
def data():
  images = jax.random.normal(jax.random.key(0), (16, 16, 16, 3))
  labels = jax.random.randint(jax.random.key(1), (16,), 0, 10)
  boxed = make_vit(None).init({'params': jax.random.key(2)}, images, train=False)['params']
  # A head that is not zero, so that every parameter gets a gradient.
  head = jax.random.normal(jax.random.key(9), boxed['head']['kernel'].shape)
  boxed = {**boxed, 'head': {**boxed['head'], 'kernel': head}}
  return images, labels, boxed


def loss_and_grads(model, params, images, labels):
  def loss_fn(params):
    logits, extras = model.apply(
      {'params': params}, images, train=True, rngs={'router': jax.random.key(3)}
    )
    xent = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    return xent + extras['auxiliary_loss'], (logits, extras['moe'])

  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


def assert_trees_close(actual, expected, rtol=1e-5):
  for (path, a), b in zip(
    jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)
  ):
    a, b = np.asarray(a), np.asarray(b)
    scale = np.max(np.abs(b)) if b.size else 0.0
    err = np.max(np.abs(a - b)) if b.size else 0.0
    assert err <= rtol * scale + 1e-6, f'{jax.tree_util.keystr(path)}: {err} vs scale {scale}'


def router_params(images, **moe):
  """Params of a ViT with these MoE settings, with a non-zero head."""
  boxed = make_vit(None, **moe).init({'params': jax.random.key(2)}, images, train=False)['params']
  head = jax.random.normal(jax.random.key(9), boxed['head']['kernel'].shape)
  return {**boxed, 'head': {**boxed['head'], 'kernel': head}}


ROUTER_CASES = [
  dict(router='topk', num_selected=1),
  dict(router='topk', num_selected=1, batch_priority=True),
  dict(router='topk', num_selected=2),
  dict(router='topk', num_selected=2, batch_priority=True),
  dict(router='image_topk', num_selected=2, batch_priority=True),
  dict(router='expert_choice'),
  dict(router='soft'),
  dict(router='dropless', num_selected=2),
]


@pytest.mark.parametrize('case', ROUTER_CASES, ids=lambda c: '-'.join(map(str, c.values())))
def test_expert_parallel_matches_unsharded(data, case):
  images, labels, _ = data
  boxed = router_params(images, **case)
  params = nn.meta.unbox(boxed)
  reference = make_vit(None, **case)
  (ref_loss, (ref_logits, ref_moe)), ref_grads = loss_and_grads(reference, params, images, labels)
  if case['router'] in ('topk', 'image_topk', 'expert_choice'):
    # Capacity 1.0 with noise: some assignments are dropped, so dropping is exercised.
    assert float(ref_moe[0]['dropped']) > 0
  else:
    assert float(ref_moe[0]['dropped']) == 0
  for shards in (1, 2, 4, 8):
    mesh = sharding.create_mesh(shards, NUM_EXPERTS)
    specs = sharding.param_specs(boxed)
    placed = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    model = make_vit(mesh, **case)
    (loss, (logits, moe)), grads = loss_and_grads(model, placed, images, labels)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_trees_close(logits, ref_logits)
    assert_trees_close(grads, ref_grads)
    assert_trees_close(moe, ref_moe)
    wi = grads['block_00']['moe']['wi']
    assert wi.sharding.shard_shape(wi.shape)[0] == NUM_EXPERTS // shards
    assert float(jnp.abs(grads['block_00']['moe']['router']).sum()) > 0


def test_compiled_step_contains_all_to_all(data):
  images, labels, boxed = data
  mesh = sharding.create_mesh(4, NUM_EXPERTS)
  model = make_vit(mesh, 2, True)
  params = nn.meta.unbox(boxed)

  def loss_fn(params):
    logits, extras = model.apply({'params': params}, images, train=False)
    return jnp.mean(logits) + extras['auxiliary_loss']

  hlo = jax.jit(jax.grad(loss_fn)).lower(params).compile().as_text()
  # Forward: there and back per layer; backward: the same again.
  assert hlo.count('all-to-all(') >= 2 * 2 * 2


def test_more_experts_than_shards(data):
  images, _, _ = data
  mesh = sharding.create_mesh(2, 16)
  model = make_vit(mesh, num_experts=16)
  ref = make_vit(None, num_experts=16)
  variables = ref.init({'params': jax.random.key(0)}, images, train=False)
  params = nn.meta.unbox(variables)['params']
  out_ref, _ = ref.apply({'params': params}, images, train=False)
  out, _ = jax.jit(lambda p: model.apply({'params': p}, images, train=False))(params)
  np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-6)


def test_experts_not_divisible_by_expert_axis(data):
  images, _, _ = data
  mesh = sharding.create_mesh(4, 8)
  model = make_vit(mesh, num_experts=6)
  with pytest.raises(UserError, match='num_experts=6 is not a multiple of the expert mesh axis'):
    model.init({'params': jax.random.key(0)}, images, train=False)
  with pytest.raises(UserError, match='num_experts=6'):
    sharding.create_mesh(4, 6)


def test_batch_not_divisible_by_devices(data):
  images, _, boxed = data
  mesh = sharding.create_mesh(2, 8)
  model = make_vit(mesh, group_size=1)
  with pytest.raises(UserError, match='batch of 12 images does not split over the 8 devices'):
    model.apply({'params': nn.meta.unbox(boxed)}, images[:12], train=False)


def test_bfloat16_router_and_losses_stay_float32(data):
  images, labels, boxed = data
  params = nn.meta.unbox(boxed)
  x = jax.random.normal(jax.random.key(4), (4, 8, 32)).astype(jnp.bfloat16)
  spec = MoeSpec(num_experts=4, layers=(0,), mlp_dim=16, group_size=0)
  mlp = layer.MoeMlp(spec, dtype=jnp.bfloat16)
  variables = mlp.init({'params': jax.random.key(5)}, x, deterministic=True)
  assert variables['params']['wi'].value.dtype == jnp.float32
  y, metrics = mlp.apply(variables, x, deterministic=True)
  assert y.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in metrics.values())
  # The router logits are float32: the z-loss reported equals the one of
  # float32 logits computed here (bfloat16 logits would be off by ~1e-2).
  logits = jnp.einsum(
    'gsd,de->gse', x.astype(jnp.float32).reshape(1, 32, 32), variables['params']['router']
  )
  np.testing.assert_allclose(metrics['z_loss'], losses.z_loss(logits), rtol=1e-6)
  # The loss of a bfloat16 model tracks the float32 model's on the same batch.
  loss32, _ = loss_and_grads(make_vit(None), params, images, labels)[0]
  loss16, _ = loss_and_grads(make_vit(None, dtype=jnp.bfloat16), params, images, labels)[0]
  np.testing.assert_allclose(loss16, loss32, rtol=2e-2)


@pytest.mark.parametrize('capacity_factor', [0.5, 0.25])
def test_low_eval_capacity_processes_proportionally_fewer_tokens(capacity_factor):
  x = jax.random.normal(jax.random.key(6), (4, 16, 32))  # 64 tokens per group
  spec = MoeSpec(
    num_experts=4,
    layers=(0,),
    mlp_dim=16,
    capacity_factor=1.25,
    eval_capacity_factor=capacity_factor,
    batch_priority=True,
    eval_batch_priority=True,
    group_size=0,
  )
  mlp = layer.MoeMlp(spec)
  variables = mlp.init({'params': jax.random.key(7)}, x, deterministic=True)
  _, metrics = mlp.apply(variables, x, deterministic=True)
  capacity = max(1, int(np.ceil(64 * capacity_factor / 4)))
  # At most E * C of the 64 assignments are kept: dropped >= 1 - cf.
  assert float(metrics['dropped']) >= 1 - 4 * capacity / 64 - 1e-6
  # Training uses the training factor (1.25) and drops far fewer.
  _, train_metrics = mlp.apply(variables, x, deterministic=False)
  assert float(train_metrics['dropped']) < float(metrics['dropped'])


@pytest.mark.parametrize('case', ROUTER_CASES, ids=lambda c: '-'.join(map(str, c.values())))
def test_a_group_of_padding_only_gives_finite_outputs(case):
  """The last evaluation batch may hold routing groups with no real image."""
  x = jax.random.normal(jax.random.key(6), (4, 5, 32))
  mask = jnp.array([1, 1, 0, 0], jnp.float32)  # Groups of 2 images: the second is padding.
  mlp = layer.MoeMlp(make_spec(**case))
  variables = mlp.init({'params': jax.random.key(7)}, x, deterministic=True)
  y, metrics = mlp.apply(variables, x, deterministic=True, mask=mask)
  assert np.all(np.isfinite(y))
  assert all(np.all(np.isfinite(v)) for v in metrics.values())
