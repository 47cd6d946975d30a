"""ViT shapes, parameter counts, size names and MoE placement."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmoe_jax.errors import UserError
from vmoe_jax.models import vit
from vmoe_jax.moe.spec import MoeSpec


def param_count(model, image_shape=(32, 32, 3)):
  variables = jax.eval_shape(
    lambda k: model.init({'params': k}, jnp.zeros((1, *image_shape)), train=False),
    jax.random.key(0),
  )
  return sum(x.size for x in jax.tree.leaves(nn.meta.unbox(variables)['params']))


def seed_vit(**kwargs):
  """The seed's CIFAR-10 ViT: width 300, depth 12, 12 heads, MLP 1024, patch 4."""
  return vit.ViT(
    num_classes=10, patch_size=4, width=300, depth=12, num_heads=12, mlp_dim=1024, **kwargs
  )


def test_dense_seed_vit_parameter_count():
  width, mlp, depth, tokens = 300, 1024, 12, 8 * 8 + 1
  per_block = (
    2 * 2 * width  # two LayerNorms
    + 4 * (width * width + width)  # q, k, v, out projections with biases
    + (width * mlp + mlp)
    + (mlp * width + width)  # MLP
  )
  expected = (
    4 * 4 * 3 * width
    + width  # patch embedding
    + width
    + tokens * width  # class token, position embeddings
    + depth * per_block
    + 2 * width  # final LayerNorm
    + width * 10
    + 10  # head
  )
  assert expected == 11_775_598
  assert param_count(seed_vit()) == expected
  # The seed reports ~12.8M: ours is 8% fewer (see README, "Parameter counts").
  assert abs(expected / 12.8e6 - 1) < 0.1


@pytest.mark.parametrize('num_experts', [32, 64])
def test_switch_seed_vit_parameter_count(num_experts):
  width, mlp = 300, 1024
  dense = param_count(seed_vit())
  per_expert = 2 * width * mlp + mlp + width
  # Every block: the dense MLP is replaced by E experts and a router (D x E).
  expected = dense + 12 * ((num_experts - 1) * per_expert + width * num_experts)
  model = seed_vit(
    moe=MoeSpec(num_experts=num_experts, layers=tuple(range(12)), mlp_dim=mlp, group_size=0)
  )
  assert param_count(model) == expected
  assert expected == {32: 240_940_126, 64: 477_493_342}[num_experts]


def test_output_shapes_and_extras():
  model = vit.ViT(
    num_classes=7,
    patch_size=2,
    width=16,
    depth=3,
    num_heads=2,
    mlp_dim=32,
    moe=MoeSpec(num_experts=4, layers=(1,), mlp_dim=32, load_balance_weight=0.5, group_size=0),
  )
  images = jnp.ones((4, 8, 8, 1))
  variables = model.init({'params': jax.random.key(0)}, images, train=False)
  logits, extras = model.apply(variables, images, train=False)
  assert logits.shape == (4, 7) and logits.dtype == jnp.float32
  assert extras['pre_logits'].shape == (4, 16)
  assert set(extras['moe']) == {1}
  assert extras['moe'][1]['expert_load'].shape == (4,)
  np.testing.assert_allclose(
    extras['auxiliary_loss'], 0.5 * extras['moe'][1]['load_balancing_loss'], rtol=1e-6
  )


def test_expert_width_can_differ_from_the_dense_mlp():
  model = vit.ViT(
    num_classes=3,
    patch_size=4,
    width=16,
    depth=2,
    num_heads=2,
    mlp_dim=32,
    moe=MoeSpec(num_experts=4, layers=(1,), mlp_dim=8, group_size=0),
  )
  variables = model.init({'params': jax.random.key(0)}, jnp.ones((2, 8, 8, 3)), train=False)
  params = nn.meta.unbox(variables)['params']
  assert params['block_01']['moe']['wi'].shape == (4, 16, 8)
  assert params['block_00']['mlp']['Dense_0']['kernel'].shape == (16, 32)


def test_gap_classifier_and_bfloat16():
  model = vit.ViT(
    num_classes=3,
    patch_size=4,
    width=16,
    depth=1,
    num_heads=2,
    mlp_dim=16,
    classifier='gap',
    dtype=jnp.bfloat16,
  )
  images = jnp.ones((2, 16, 16, 3))
  variables = model.init({'params': jax.random.key(0)}, images, train=False)
  assert 'cls' not in variables['params']
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  logits, _ = model.apply(variables, images, train=False)
  assert logits.dtype == jnp.float32


def test_dropout_only_in_training():
  model = vit.ViT(
    num_classes=3, patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=16, dropout_rate=0.5
  )
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  variables = model.init({'params': jax.random.key(0)}, images, train=False)
  a, _ = model.apply(variables, images, train=False)
  b, _ = model.apply(variables, images, train=False)
  np.testing.assert_array_equal(a, b)
  pre_a = model.apply(variables, images, train=True, rngs={'dropout': jax.random.key(2)})[1]
  pre_b = model.apply(variables, images, train=True, rngs={'dropout': jax.random.key(3)})[1]
  assert not np.allclose(pre_a['pre_logits'], pre_b['pre_logits'])


def test_decode_variant():
  assert vit.decode_variant('S/16') == dict(
    width=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=16
  )
  assert vit.decode_variant('Ti/4')['width'] == 192
  with pytest.raises(UserError, match="variant 'X/16' is unknown"):
    vit.decode_variant('X/16')
  with pytest.raises(UserError):
    vit.decode_variant('S16')


def test_conv_stem_tokens_and_errors():
  model = vit.ViT(
    num_classes=10,
    patch_size=4,
    width=16,
    depth=1,
    num_heads=2,
    mlp_dim=32,
    stem='conv',
    classifier='gap',
  )
  images = jnp.zeros((2, 28, 28, 1))
  variables = model.init(jax.random.key(0), images, train=False)
  params = variables['params']
  # 7x7 = 49 tokens, convolutions with 8 and 16 channels, then the projection.
  assert params['pos_embedding'].shape == (1, 49, 16)
  assert params['stem']['conv_0']['kernel'].shape == (3, 3, 1, 8)
  assert params['stem']['conv_1']['kernel'].shape == (3, 3, 8, 16)
  assert params['stem']['projection']['kernel'].shape == (1, 1, 16, 16)
  logits, _ = model.apply(variables, images, train=False)
  assert logits.shape == (2, 10)
  extra = model.clone(stem_extra_convs=1).init(jax.random.key(0), images, train=False)['params']
  assert extra['stem']['conv_0_1']['kernel'].shape == (3, 3, 8, 8)  # Stride 1 at 14x14.
  assert extra['stem']['conv_1_1']['kernel'].shape == (3, 3, 16, 16)  # Stride 1 at 7x7.
  assert extra['pos_embedding'].shape == (1, 49, 16)
  # One count per stage: none at 14x14, two at 7x7; a string is the config's form of it.
  last = model.clone(stem_extra_convs=(0, 2)).init(jax.random.key(0), images, train=False)
  assert sorted(k for k in last['params']['stem'] if k.startswith('conv')) == [
    'conv_0',
    'conv_1',
    'conv_1_1',
    'conv_1_2',
  ]
  assert last['params']['stem']['conv_1_2']['kernel'].shape == (3, 3, 16, 16)
  as_string = model.clone(stem_extra_convs='0,2')
  np.testing.assert_array_equal(
    as_string.apply(last, images, train=False)[0],
    model.clone(stem_extra_convs=(0, 2)).apply(last, images, train=False)[0],
  )
  with pytest.raises(UserError, match=r"model.stem_extra_convs='1,1,1' must be .* \(2 here"):
    model.clone(stem_extra_convs='1,1,1').init(jax.random.key(0), images, train=False)
  with pytest.raises(UserError, match='power of 2'):
    model.clone(patch_size=7).init(jax.random.key(0), images, train=False)


@pytest.mark.parametrize(
  'height, width, channels, stride', [(28, 28, 1, 2), (14, 14, 8, 2), (7, 9, 3, 2), (7, 9, 3, 1)]
)
def test_conv3x3_equals_lax_conv(height, width, channels, stride):
  # The matmul form against XLA's own 'SAME' convolution with the same
  # parameters (odd sizes at stride 2 pad one pixel at the bottom/right only).
  images = jax.random.normal(jax.random.key(1), (2, height, width, channels))
  layer = vit.Conv3x3(5, stride=stride)
  variables = layer.init(jax.random.key(2), images)
  kernel, bias = variables['params']['kernel'], variables['params']['bias'] + 0.5
  expected = (
    jax.lax.conv_general_dilated(
      images, kernel, (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
    + bias
  )
  got = layer.apply({'params': {'kernel': kernel, 'bias': bias}}, images)
  assert got.shape == (2, -(-height // stride), -(-width // stride), 5)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_map_classifier_pools_every_token():
  model = vit.ViT(
    num_classes=5, patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, classifier='map'
  )
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = model.init(jax.random.key(1), images, train=False)
  params = nn.meta.unbox(variables)['params']
  assert 'cls' not in params and params['pos_embedding'].shape == (1, 16, 16)
  assert params['map_head']['probe'].shape == (1, 1, 16)
  # A non-zero head, then: changing the pixels of any one patch changes the logits.
  params['head']['kernel'] = jax.random.normal(jax.random.key(2), (16, 5))
  logits, extras = model.apply({'params': params}, images, train=False)
  assert extras['pre_logits'].shape == (2, 16)
  for row, col in ((0, 0), (3, 3), (1, 2)):
    changed = images.at[:, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4].add(1.0)
    assert not np.allclose(model.apply({'params': params}, changed, train=False)[0], logits)
