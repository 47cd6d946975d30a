"""The router table against the papers' rules, with numbers worked out by hand.

Image-level capacity counts images (never rounded up by the buffer multiple),
Expert Choice has no auxiliary loss and keeps its capacity at evaluation,
Soft MoE routes one image per group by default, and the metrics of a padded
batch are the same on one device and on a mesh.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from vmoe_jax.models import factory
from vmoe_jax.models import vit
from vmoe_jax.moe import layer
from vmoe_jax.moe import routers
from vmoe_jax.moe.spec import MoeSpec
from vmoe_jax.runtime import sharding


def spec_of(**fields):
  base = dict(num_experts=8, layers=(0,), mlp_dim=16)
  return MoeSpec(**{**base, **fields})


def confident_logits(num_groups, num_tokens, num_experts, expert=0):
  """Logits (G, S, E) with which every token strongly prefers `expert`."""
  logits = jnp.zeros((num_groups, num_tokens, num_experts))
  return logits.at[..., expert].set(10.0)


# --------------------------------------------------------------------------- image_topk capacity


@pytest.mark.parametrize('multiple', [1, 4])
@pytest.mark.parametrize(
  'num_experts,capacity_factor,images_per_expert',
  [
    (8, 1.25, 2),  # ceil(1 * 8 * 1.25 / 8) = ceil(1.25) = 2 images (cf 2.0 effective).
    (16, 1.0, 1),  # ceil(8 / 16) = 1 image.
    (4, 1.0, 2),  # 8 / 4 = 2 images exactly.
  ],
)
def test_image_capacity_counts_images_whatever_the_buffer_multiple(
  multiple, num_experts, capacity_factor, images_per_expert
):
  """8 images of 5 tokens all prefer expert 0: it keeps ceil(K*N*cf/E) of them."""
  images, tokens = 8, 5
  spec = spec_of(
    num_experts=num_experts,
    router='image_topk',
    capacity_factor=capacity_factor,
    capacity_multiple=multiple,
  )
  logits = confident_logits(1, images * tokens, num_experts)
  out = routers.route_image_topk(
    routers.RouterInputs(logits, None, None, tokens_per_image=tokens, train=True), spec
  )
  kept_images = np.asarray(out.view.slot[0, ::tokens, 0] >= 0).sum()
  assert kept_images == images_per_expert
  # The configured factor, within one image: C_img = ceil(K * N * cf / E).
  assert images_per_expert - images * capacity_factor / num_experts < 1
  # The buffer holds the kept images' tokens, aligned to the multiple, no more.
  slots = routers.image_capacity(spec, images * tokens, tokens, train=True)
  assert slots == multiple * math.ceil(images_per_expert * tokens / multiple)
  assert out.plan.source.shape[-1] == slots


# --------------------------------------------------------------------------- Expert Choice


def test_expert_choice_has_no_auxiliary_loss():
  logits = jax.random.normal(jax.random.key(0), (2, 16, 8)) * 3.0
  spec = spec_of(
    router='expert_choice', load_balance_weight=0.01, importance_weight=0.01, z_loss_weight=0.01
  )
  out = routers.route_expert_choice(routers.RouterInputs(logits, None, None, 4, True), spec)
  for name in ('load_balancing_loss', 'importance_loss', 'load_loss', 'z_loss'):
    assert float(out.metrics[name]) == 0.0, name
  # The control: the same logits give top-k a load-balancing loss well above 0.
  topk = routers.route_topk(routers.RouterInputs(logits, None, None, 4, True), spec_of())
  assert float(topk.metrics['load_balancing_loss']) > 0.5


def test_expert_choice_evaluates_at_its_training_capacity():
  spec = spec_of(router='expert_choice', capacity_factor=1.25)
  assert spec.eval_capacity_factor == 1.25
  assert spec_of(router='topk', capacity_factor=1.25).eval_capacity_factor == 2.0
  # The capacity sweep stays available on request.
  assert spec_of(router='expert_choice', eval_capacity_factor=2.0).eval_capacity_factor == 2.0
  # 16 tokens, 8 experts, cf 1.25: C = ceil(16 * 1.25 / 8) = 3 tokens per expert, 24 of
  # the 16 tokens' assignments, 1.5 experts per token, at training and at evaluation.
  logits = jax.random.normal(jax.random.key(1), (1, 16, 8))
  per_token = []
  for train in (True, False):
    out = routers.route_expert_choice(routers.RouterInputs(logits, None, None, 4, train), spec)
    per_token.append(float(jnp.sum(out.view.slot >= 0)) / 16)
  assert per_token == [1.5, 1.5]


def test_switch_config_with_expert_choice_keeps_the_capacity(tmp_path):
  from vmoe_jax.schema import defaults

  config = defaults.get_config()
  config.model.update(dict(width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=4))
  defaults.apply_moe_preset(config, 'switch')
  config.model.moe.num_experts = 4
  config.model.moe.router = 'expert_choice'
  spec = factory.moe_spec(config, backend='cpu')
  assert spec.eval_capacity_factor == spec.capacity_factor == 1.25
  config.model.moe.router = 'topk'
  assert factory.moe_spec(config, backend='cpu').eval_capacity_factor == 2.0


# --------------------------------------------------------------------------- Soft MoE groups


def soft_vit(**moe):
  spec = spec_of(num_experts=4, layers=(0, 1), mlp_dim=32, router='soft', **moe)
  return vit.ViT(num_classes=10, patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=32, moe=spec)


def test_soft_moe_routes_one_image_per_group_by_default():
  assert spec_of(router='soft').group_size == 1
  assert spec_of(router='topk').group_size == 8
  images = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
  others = images.at[1:].set(jax.random.normal(jax.random.key(1), (7, 8, 8, 3)))

  def first_logits(model):
    """Image 0's features (the head starts at zero) in the two batches."""
    params = model.init(jax.random.key(2), images, train=False)['params']
    apply = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False)[1]['pre_logits'])
    return np.asarray(apply(params, images)[0]), np.asarray(apply(params, others)[0])

  alone, with_others = first_logits(soft_vit())
  assert np.abs(alone).max() > 0.1
  np.testing.assert_array_equal(alone, with_others)  # Image 0 ignores its neighbours.
  # The control: groups of 8 images mix the neighbours into image 0's slots.
  grouped, grouped_others = first_logits(soft_vit(group_size=8))
  assert np.abs(grouped - grouped_others).max() > 1e-4


def test_soft_moe_slot_parameters_have_fan_in_experts_times_width():
  """LeCun normal over (D, E, P) as the paper's code: std 1 / sqrt(E * D) = 1/32 here."""
  width, experts, slots = 64, 16, 4
  spec = spec_of(num_experts=experts, router='soft', slots_per_expert=slots)
  mlp = layer.MoeMlp(spec)
  x = jnp.ones((1, 4, width))
  params = nn.meta.unbox(mlp.init(jax.random.key(0), x, train=False)['params'])
  assert params['router'].shape == (width, experts * slots)
  std = float(np.std(np.asarray(params['router'])))
  assert abs(std - 1 / 32) < 0.05 / 32, std  # 4,096 draws: the estimate is within ~1.1%.


# --------------------------------------------------------------------------- padded metrics, mesh

PADDED_CASES = [
  dict(router='topk', num_selected=1),
  dict(router='topk', num_selected=2, batch_priority=True),
  dict(router='image_topk', num_selected=1),
  dict(router='expert_choice'),
  dict(router='soft'),
  dict(router='dropless', num_selected=2),
]


@pytest.mark.parametrize('case', PADDED_CASES, ids=lambda c: '-'.join(map(str, c.values())))
def test_padded_batch_metrics_are_the_same_sharded_and_unsharded(case):
  """13 real images of 16: the devices hold 2, 2, ..., 1, 0, 0 real rows each."""
  spec = spec_of(
    num_experts=8,
    mlp_dim=16,
    capacity_factor=0.5,
    eval_capacity_factor=0.5,
    eval_batch_priority=case.get('batch_priority', False),
    group_size=2 if case['router'] != 'soft' else 1,
    block_size=8,
    **case,
  )
  x = jax.random.normal(jax.random.key(0), (16, 6, 16))
  mask = jnp.arange(16) < 13
  reference = layer.MoeMlp(spec)
  boxed = reference.init(jax.random.key(1), x, train=False)['params']
  params = nn.meta.unbox(boxed)
  apply = lambda model, p: model.apply({'params': p}, x, train=False, mask=mask)
  y_ref, metrics_ref = jax.jit(lambda p: apply(reference, p))(params)
  if case['router'] in ('topk', 'image_topk', 'expert_choice'):
    assert 0 < float(metrics_ref['dropped']) < 1  # The case drops, so the share is tested.
  mesh = sharding.create_mesh(2, 8)  # 4 x 2 devices.
  specs = sharding.param_specs({'moe': boxed})['moe']
  placed = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
  y, metrics = jax.jit(lambda p: apply(layer.MoeMlp(spec, mesh=mesh), p))(placed)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  for name in ('dropped', 'expert_load', 'top1_gate'):
    np.testing.assert_allclose(metrics[name], metrics_ref[name], rtol=1e-6, atol=1e-7, err_msg=name)
