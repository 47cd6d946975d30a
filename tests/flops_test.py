"""Analytic FLOP counts against hand-worked numbers."""

import ast
import importlib.util
import os

import pytest

from vmoe_jax.models import factory
from vmoe_jax.models import flops
from vmoe_jax.models import vit
from vmoe_jax.moe.spec import MoeSpec
from vmoe_jax.schema import defaults

# A file in configs/: sibling_config resolves names next to it.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, 'configs', 'x.py')


def small(**kwargs):
  return vit.ViT(num_classes=10, patch_size=4, width=8, depth=2, num_heads=2, mlp_dim=16, **kwargs)


def test_dense_vit_flops_by_hand():
  # 16x16x3 images, patch 4: 16 patches + class token = 17 tokens, D=8, H=16.
  f = flops.forward_flops(small(), (16, 16, 3))
  assert f['embedding'] == 2 * 16 * (4 * 4 * 3) * 8
  assert f['attention'] == 2 * (2 * 4 * 17 * 8 * 8 + 2 * 2 * 17 * 17 * 8)
  assert f['mlp'] == 2 * (2 * 2 * 17 * 8 * 16)
  assert f['head'] == 2 * 8 * 10
  assert f['total'] == sum(v for k, v in f.items() if k != 'total')


def test_moe_active_and_buffer_flops():
  model = small(moe=MoeSpec(num_experts=4, layers=(1,), mlp_dim=16, num_selected=2, group_size=0))
  dense = flops.forward_flops(small(), (16, 16, 3))
  f = flops.forward_flops(model, (16, 16, 3))
  # One dense MLP left; the MoE block runs each token through K=2 experts.
  assert f['mlp'] == dense['mlp'] / 2
  assert f['experts'] == 2 * 17 * (2 * 2 * 8 * 16)
  assert f['router'] == 2 * 17 * 8 * 4
  # Buffers: 2 images per group = 34 tokens, C = ceil(2 * 34 * 1.0 / 4) = 17 slots.
  b = flops.forward_flops(model, (16, 16, 3), capacity_factor=1.0, images_per_group=2)
  assert b['experts'] == 4 * 17 * (2 * 2 * 8 * 16) / 2
  with pytest.raises(ValueError):
    flops.forward_flops(model, (16, 16, 3), capacity_factor=1.0)
  assert flops.expert_flops_per_image(model, 3.0) == 3 * 2 * 2 * 8 * 16


def test_conv_stem_flops_by_hand():
  # 28x28x1 images, patch 4: two 3x3 stride-2 convs (D/2 = 4, then D = 8 channels)
  # at 14x14 and 7x7, then a 1x1 projection to D = 8 at 7x7.
  model = vit.ViT(
    num_classes=10, patch_size=4, width=8, depth=1, num_heads=2, mlp_dim=16, stem='conv'
  )
  assert vit.conv_stem_channels(8, 4) == (4, 8)
  f = flops.forward_flops(model, (28, 28, 1))
  assert f['embedding'] == 2 * (14 * 14 * 9 * 1 * 4 + 7 * 7 * 9 * 4 * 8 + 7 * 7 * 8 * 8)
  # One stride-1 3x3 conv after each: 4 -> 4 channels at 14x14, 8 -> 8 at 7x7.
  extra = flops.forward_flops(model.clone(stem_extra_convs=1), (28, 28, 1))['embedding']
  assert extra - f['embedding'] == 2 * (14 * 14 * 9 * 4 * 4 + 7 * 7 * 9 * 8 * 8)
  # Two at 7x7 only ('0,2').
  last = flops.forward_flops(model.clone(stem_extra_convs='0,2'), (28, 28, 1))['embedding']
  assert last - f['embedding'] == 2 * 2 * (7 * 7 * 9 * 8 * 8)


def test_map_head_flops_by_hand():
  gap = small(classifier='gap')
  map_ = small(classifier='map')
  # 16 tokens (no class token), D=8, H=16: q and out (1 token), k and v (16 tokens),
  # scores and weighted sum (16 tokens), the MLP (1 token).
  extra = 2 * (2 * 8 * 8 + 2 * 16 * 8 * 8 + 2 * 16 * 8 + 2 * 8 * 16)
  f_gap, f_map = flops.forward_flops(gap, (16, 16, 3)), flops.forward_flops(map_, (16, 16, 3))
  assert f_map['head'] - f_gap['head'] == extra
  assert f_map['attention'] == f_gap['attention']


@pytest.mark.parametrize('name', ['fashion_switch', 'fashion_vmoe'])
def test_fashion_configs_have_the_dense_active_flops(name):
  """Switch (K=1, experts of the dense width) and V-MoE (K=2, half width) match the dense ViT.

  By hand: 7x7 = 49 tokens, width 128; the two MoE blocks' expert FLOPs are
  K * 49 * 2 * 2 * 128 * H with K * H = 512, the dense MLP's 49 * 2 * 2 * 128 * 512.
  The only extra work is the router, 2 * 49 * 128 * 8 per MoE block.
  """
  dense_config = defaults.sibling_config(CONFIGS, 'fashion_vit.py')
  moe_config = defaults.sibling_config(CONFIGS, f'{name}.py')
  dense = flops.forward_flops(factory.create_model(dense_config, 10), (28, 28, 1))
  moe = flops.forward_flops(factory.create_model(moe_config, 10), (28, 28, 1))
  assert moe['experts'] == 2 * 49 * 2 * 2 * 128 * 512
  assert moe['mlp'] + moe['experts'] == dense['mlp']
  assert moe['router'] == 2 * (2 * 49 * 128 * 8)
  assert moe['total'] - dense['total'] == moe['router']


def _with_overrides(config, overrides):
  """`config` with `--config.a.b=value` arguments applied (values parsed as Python literals)."""
  for override in overrides:
    key, value = override.removeprefix('--config.').split('=', 1)
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # A string such as 'soft'.
    node[leaf] = value
  return config


def test_fashion_router_table_rows_have_the_dense_active_flops():
  """Every row of `launch/fashion_table.py --table=routers` within 3% of the dense ViT's FLOPs.

  The mixing of Soft MoE (dispatch and combine, 2 * 2 * 49 * 48 * 128 per
  MoE block) and its 48 slots for 49 tokens are the largest difference.
  """
  spec = importlib.util.spec_from_file_location(
    'fashion_table', os.path.join(REPO, 'launch', 'fashion_table.py')
  )
  table = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(table)
  dense = None
  for name, (path, overrides) in table.ROUTERS.items():
    config = defaults.sibling_config(CONFIGS, os.path.basename(path))
    config = _with_overrides(config, table.resolve(overrides, path))
    total = flops.forward_flops(factory.create_model(config, 10), (28, 28, 1))['total']
    dense = dense or total  # The first row is the dense ViT.
    assert abs(total / dense - 1) < 0.03, (name, total / dense)
