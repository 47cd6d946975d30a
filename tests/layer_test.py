"""The MoE layer: expert parallelism matches the unsharded model; padding; precision; errors."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from vmoe_jax.errors import UserError
from vmoe_jax.models import vit
from vmoe_jax.moe import layer
from vmoe_jax.moe import losses
from vmoe_jax.moe import plans
from vmoe_jax.moe import routers
from vmoe_jax.moe import routing
from vmoe_jax.moe.spec import AUX_LOSS_WEIGHTS
from vmoe_jax.moe.spec import MoeSpec
from vmoe_jax.runtime import sharding

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
  # Every mesh for two top-k cases; for the others, several experts per device
  # (2 shards) and one (8 shards): each mesh is a compilation, and CI time counts.
  every_mesh = case in (ROUTER_CASES[0], ROUTER_CASES[3])
  for shards in (1, 2, 4, 8) if every_mesh else (2, 8):
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
  message = 'model.moe.num_experts=6 is not a multiple of mesh.expert=4'
  with pytest.raises(UserError, match=message):
    model.init({'params': jax.random.key(0)}, images, train=False)
  with pytest.raises(UserError, match=message):
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
  variables = mlp.init({'params': jax.random.key(5)}, x, train=False)
  assert variables['params']['wi'].value.dtype == jnp.float32
  y, metrics = mlp.apply(variables, x, train=False)
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
  variables = mlp.init({'params': jax.random.key(7)}, x, train=False)
  _, metrics = mlp.apply(variables, x, train=False)
  capacity = max(1, int(np.ceil(64 * capacity_factor / 4)))
  # At most E * C of the 64 assignments are kept: dropped >= 1 - cf.
  assert float(metrics['dropped']) >= 1 - 4 * capacity / 64 - 1e-6
  # Training uses the training factor (1.25) and drops far fewer.
  _, train_metrics = mlp.apply(variables, x, train=True)
  assert float(train_metrics['dropped']) < float(metrics['dropped'])


def unboxed_init(module, x, **kwargs):
  variables = module.init(jax.random.key(1), x, train=False, **kwargs)
  return nn.meta.unbox(variables)['params']


@pytest.mark.parametrize(
  'router,k,bpr',
  [
    ('topk', 1, False),
    ('topk', 2, True),
    ('image_topk', 1, True),
    ('expert_choice', 1, False),
    ('soft', 1, False),
    ('dropless', 2, False),
  ],
)
def test_padded_rows_take_no_capacity(router, k, bpr):
  """12 real images + 4 padding rows route the real ones exactly as 12 images alone."""
  spec = make_spec(
    num_selected=k,
    batch_priority=bpr,
    router=router,
    capacity_factor=0.5,
    eval_capacity_factor=0.5,
    group_size=0,
    slots_per_expert=2,
  )
  if router != 'soft':
    spec = dataclasses.replace(spec, slots_per_expert=None)
  real = jax.random.normal(jax.random.key(0), (12, 5, 32))
  padding = 10.0 * jax.random.normal(jax.random.key(1), (4, 5, 32))  # Confident garbage.
  padded = jnp.concatenate([real, padding])
  mask = jnp.arange(16) < 12
  mlp = layer.MoeMlp(spec)
  params = unboxed_init(mlp, real)

  def run(x, mask=None):
    (y, metrics), state = mlp.apply(
      {'params': params}, x, train=False, mask=mask, mutable=['intermediates']
    )
    return y, metrics, state['intermediates']['routing'][0]

  y_real, metrics_real, view_real = jax.jit(run)(real)
  y_padded, metrics_padded, view_padded = jax.jit(run)(padded, mask)
  np.testing.assert_allclose(y_padded[:12], y_real, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(view_padded.expert_index[:12], view_real.expert_index)
  np.testing.assert_array_equal(view_padded.slot[:12], view_real.slot)
  np.testing.assert_allclose(view_padded.combine_weight[:12], view_real.combine_weight, rtol=1e-5)
  for name in ('dropped', 'expert_load', 'top1_gate', 'importance_loss', 'z_loss'):
    np.testing.assert_allclose(metrics_padded[name], metrics_real[name], rtol=1e-5, atol=1e-7)
  if router in ('topk', 'image_topk'):
    # Without the mask, the padding would take slots: the real rows route differently.
    y_unmasked, _, _ = jax.jit(run)(padded)
    assert not np.allclose(y_unmasked[:12], y_real, atol=1e-4)


def test_routing_groups_make_routing_independent_of_the_device_count():
  """group_size=2: the same tokens go to the same experts on 1 device and on 8."""
  images = jax.random.normal(jax.random.key(0), (16, 16, 16, 3))

  def routing_on(devices, group_size):
    spec = make_spec(num_selected=2, group_size=group_size, capacity_factor=0.5)
    mesh = sharding.create_mesh(1, NUM_EXPERTS, jax.devices()[:devices])
    model = vit.ViT(
      num_classes=10, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=48, moe=spec, mesh=mesh
    )
    params = nn.meta.unbox(
      model.clone(mesh=None).init({'params': jax.random.key(2)}, images[:2], train=False)
    )['params']
    _, state = jax.jit(
      lambda p: model.apply({'params': p}, images, train=False, mutable=['intermediates'])
    )(params)
    return state['intermediates']['block_01']['moe']['routing'][0]

  one, eight = routing_on(1, 2), routing_on(8, 2)
  np.testing.assert_array_equal(one.expert_index, eight.expert_index)
  np.testing.assert_array_equal(one.slot, eight.slot)
  # group_size=0 (all images of a device): one group of 16 images on 1 device,
  # 8 groups of 2 on 8 devices, so the capacity and the drops differ.
  one, eight = routing_on(1, 0), routing_on(8, 0)
  assert not np.array_equal(one.slot, eight.slot)


def test_a_new_router_is_one_table_entry(monkeypatch):
  """A toy router added through the table: every token to expert 0, weight 1."""

  def route_first(inputs, spec):
    num_groups, num_tokens, _ = inputs.logits.shape
    view = routing.Routing(
      expert_index=jnp.zeros((num_groups, num_tokens, 1), jnp.int32),
      slot=jnp.broadcast_to(
        jnp.arange(num_tokens, dtype=jnp.int32)[None, :, None], (num_groups, num_tokens, 1)
      ),
      combine_weight=jnp.ones((num_groups, num_tokens, 1)),
    )
    metrics = {name: jnp.zeros(()) for name in AUX_LOSS_WEIGHTS}
    metrics.update(
      dropped=jnp.zeros(()), expert_load=jnp.eye(spec.num_experts)[0], top1_gate=jnp.ones(())
    )
    return routers.RouterOutput(
      plans.from_routing(view, spec.num_experts, num_tokens), metrics, view
    )

  monkeypatch.setitem(routers.ROUTERS, 'first', routers.Router(route_first))
  spec = make_spec(router='first', group_size=0)
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  mlp = layer.MoeMlp(spec)
  params = unboxed_init(mlp, x)
  y, metrics = mlp.apply({'params': params}, x, train=False)
  expected = layer.expert_mlp(
    x.reshape(1, 10, 32), {k: params[k][:1] for k in layer.EXPERT_PARAMS}, None, 0.0, jnp.float32
  )
  np.testing.assert_allclose(y, expected.reshape(2, 5, 32), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(metrics['expert_load'], [1, 0, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize('case', ROUTER_CASES, ids=lambda c: '-'.join(map(str, c.values())))
def test_a_group_of_padding_only_gives_finite_outputs(case):
  """The last evaluation batch may hold routing groups with no real image."""
  x = jax.random.normal(jax.random.key(6), (4, 5, 32))
  mask = jnp.array([1, 1, 0, 0], jnp.float32)  # Groups of 2 images: the second is padding.
  mlp = layer.MoeMlp(make_spec(**case))
  variables = mlp.init({'params': jax.random.key(7)}, x, train=False)
  y, metrics = mlp.apply(variables, x, train=False, mask=mask)
  assert np.all(np.isfinite(y))
  assert all(np.all(np.isfinite(v)) for v in metrics.values())


@pytest.mark.parametrize('router,k', [('topk', 1), ('topk', 2), ('dropless', 1)])
def test_combine_scale_gives_a_uniform_router_the_dense_mlp_weight(router, k):
  """Zero router (gates 1/E), E identical experts: the output is k/E times one expert's.

  With combine_scale = E/k it is exactly the output of that expert alone (the
  E=1 layer, whose only gate is 1): the dense MLP the layer replaces.
  """
  x = jax.random.normal(jax.random.key(11), (2, 8, 16))
  common = dict(layers=(0,), mlp_dim=12, router=router, group_size=0, capacity_factor=8.0)
  common.update(eval_capacity_factor=8.0)  # No drops: capacity holds every assignment.
  one = layer.MoeMlp(MoeSpec(num_experts=1, num_selected=1, **common))
  one_params = unboxed_init(one, x)
  y_one, _ = one.apply({'params': one_params}, x, train=False)

  def layer_output(scale):
    mlp = layer.MoeMlp(MoeSpec(num_experts=8, num_selected=k, combine_scale=scale, **common))
    params = unboxed_init(mlp, x)
    params = {
      name: (jnp.zeros_like(p) if name == 'router' else jnp.repeat(one_params[name], 8, axis=0))
      for name, p in params.items()
    }
    y, metrics = mlp.apply({'params': params}, x, train=False)
    assert float(metrics['dropped']) == 0
    np.testing.assert_allclose(metrics['top1_gate'], 1 / 8, rtol=1e-6)
    return y

  np.testing.assert_allclose(layer_output(1.0), y_one * k / 8, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(layer_output(8 / k), y_one, rtol=1e-5, atol=1e-6)
