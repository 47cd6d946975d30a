"""The MoE spec: the blocks of model.moe.layers, the defaults by router, evaluation settings."""

import pytest

from vmoe_jax.errors import UserError
from vmoe_jax.moe import spec as spec_lib
from vmoe_jax.moe.spec import MoeSpec
from vmoe_jax.schema import defaults
from vmoe_jax.schema import validation


@pytest.mark.parametrize(
  'layers,expected',
  [
    ('all', (0, 1, 2, 3, 4, 5)),
    ('every_2', (1, 3, 5)),
    ('every_3', (2, 5)),
    ('last_2', (4, 5)),
    ('none', ()),
    ('0,3', (0, 3)),
    ((5, 1), (1, 5)),
  ],
)
def test_moe_layer_indices(layers, expected):
  assert spec_lib.moe_layer_indices(layers, 6) == expected


def test_moe_layer_indices_errors():
  with pytest.raises(ValueError, match='not understood'):
    spec_lib.moe_layer_indices('odd', 6)
  with pytest.raises(ValueError, match='outside the 6 blocks'):
    spec_lib.moe_layer_indices('1,7', 6)


def test_router_defaults_of_group_size_and_evaluation_capacity():
  topk = MoeSpec(num_experts=8, layers=(1,), mlp_dim=16, capacity_factor=1.25)
  assert topk.group_size == spec_lib.DEFAULT_GROUP_SIZE
  assert topk.eval_capacity_factor == spec_lib.DEFAULT_EVAL_CAPACITY_FACTOR
  soft = MoeSpec(num_experts=8, layers=(1,), mlp_dim=16, router='soft')
  assert soft.group_size == 1  # One image per group: no batch neighbours.
  choice = MoeSpec(num_experts=8, layers=(1,), mlp_dim=16, router='expert_choice')
  assert choice.eval_capacity_factor == choice.capacity_factor  # Part of the function.
  explicit = MoeSpec(num_experts=8, layers=(1,), mlp_dim=16, group_size=0, eval_capacity_factor=1)
  assert explicit.group_size == 0 and explicit.eval_capacity_factor == 1


def test_training_and_evaluation_settings():
  spec = MoeSpec(
    num_experts=4, layers=(0,), mlp_dim=8, capacity_factor=1.25, batch_priority=False
  ).at_eval(0.5, True)
  assert spec.capacity_factor_for(True) == 1.25 and spec.capacity_factor_for(False) == 0.5
  assert spec.batch_priority_for(True) is False and spec.batch_priority_for(False) is True
  assert spec.images_per_group(32) == spec_lib.DEFAULT_GROUP_SIZE
  assert MoeSpec(num_experts=4, layers=(0,), mlp_dim=8, group_size=0).images_per_group(32) == 32
  assert spec.family == 'Switch-ViT'
  assert MoeSpec(num_experts=4, layers=(0,), mlp_dim=8, num_selected=2).family == 'V-MoE'
  assert MoeSpec(num_experts=4, layers=(0,), mlp_dim=8, router='soft').family == 'Soft MoE'


def test_spec_is_hashable():  # A Flax module attribute.
  spec = MoeSpec(num_experts=4, layers=(0, 2), mlp_dim=8)
  assert hash(spec) == hash(MoeSpec(num_experts=4, layers=(0, 2), mlp_dim=8))


def test_the_spec_trusts_its_settings_and_the_schema_checks_them():
  MoeSpec(num_experts=4, layers=(0,), mlp_dim=8, combine_scale=0.0)  # No check here.
  config = defaults.get_config()
  config.model.update(dict(width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=4))
  config.model.moe.update(dict(num_experts=4, combine_scale=0.0))
  with pytest.raises(UserError, match=r'model.moe.combine_scale=0.0 must be a number > 0'):
    validation.validate(config)
