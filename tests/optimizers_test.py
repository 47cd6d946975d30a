"""Optimizers against hand-worked steps; Adafactor factoring and state size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vmoe_jax.errors import UserError
from vmoe_jax.optim import optimizers
from vmoe_jax.schema import defaults


def make(name, lr=0.1, beta1=0.9, wd=0.0, head_wd=0.0, clip=0.0):
  config = defaults.get_config()
  config.optimizer.name = name
  config.optimizer.learning_rate = lr
  config.optimizer.beta1 = beta1
  config.optimizer.weight_decay = wd
  config.optimizer.head_weight_decay = head_wd
  config.optimizer.grad_clip_norm = clip
  return config


def constant(lr):
  return lambda step: jnp.asarray(lr, jnp.float32)


def run(tx, params, grads_list):
  state = tx.init(params)
  for grads in grads_list:
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  return params, state


def test_adafactor_two_hand_worked_steps():
  # One unfactored scalar, g = 2 each step, lr 0.1, beta1 0.9; the update uses
  # the momentum as stored, in bfloat16.
  # Step 1: beta2 = min(0.999, 1 - 1^-0.8) = 0 -> v = 4, u = 1; m = bf16(0.1).
  # Step 2: beta2 = 1 - 2^-0.8; v = 4, u = 1; m = bf16(0.9 * m1 + 0.1).
  tx = optimizers.create_optimizer(make('adafactor'), constant(0.1), {'w': jnp.ones(())})
  params = {'w': jnp.array(1.0)}
  p1, state = run(tx, params, [{'w': jnp.array(2.0)}])
  m1 = float(jnp.bfloat16(0.1))
  np.testing.assert_allclose(p1['w'], 1 - 0.1 * m1, rtol=1e-6)
  p2, _ = run(tx, params, [{'w': jnp.array(2.0)}] * 2)
  m2 = float(jnp.bfloat16(0.9 * m1 + 0.1))
  np.testing.assert_allclose(p2['w'], 1 - 0.1 * m1 - 0.1 * m2, rtol=1e-6)
  assert state.momentum['w'].dtype == jnp.bfloat16


def test_adafactor_beta2_schedule():
  # With g = 1 then g = 3, the second moment after step 2 is
  # beta2 * 1 + (1 - beta2) * 9 with beta2 = 1 - 2^-0.8.
  # learning rate -1 and no momentum: the update is the direction g / sqrt(v).
  tx = optimizers.adafactor(lambda t: -1.0, beta1=0.0)
  params = {'w': jnp.zeros(())}
  state = tx.init(params)
  _, state = tx.update({'w': jnp.array(1.0)}, state)
  u, state = tx.update({'w': jnp.array(3.0)}, state)
  beta2 = 1 - 2**-0.8
  v = beta2 * 1 + (1 - beta2) * 9
  np.testing.assert_allclose(state.v['w'], v, rtol=1e-6)
  np.testing.assert_allclose(u['w'], 3 / np.sqrt(v), rtol=1e-6)
  # The decay is capped at 0.999.
  beta2_at = lambda t: min(0.999, 1 - t**-0.8)
  assert beta2_at(10**6) == 0.999


def test_factored_second_moment_is_exact_for_rank_one_gradients():
  a = jnp.arange(1.0, 129.0)
  b = jnp.linspace(0.5, 2.0, 160)
  grads = {'kernel': jnp.outer(a, b)}
  tx = optimizers.adafactor(lambda t: -1.0, beta1=0.0, min_dim=128)
  state = tx.init(grads)
  assert state.v_row['kernel'].shape == (128,) and state.v_col['kernel'].shape == (160,)
  assert state.v['kernel'].shape == (1,)  # No full second moment.
  u, _ = tx.update(grads, state)
  np.testing.assert_allclose(u['kernel'], np.ones((128, 160)), rtol=1e-5)


def test_expert_axis_is_never_factored():
  params = {
    'wi': jnp.zeros((4, 128, 256)),
    'bi': jnp.zeros((4, 256)),
    'dense': jnp.zeros((256, 128)),
    'small': jnp.zeros((300, 12, 25)),
  }
  mask = {'wi': True, 'bi': True, 'dense': False, 'small': False}
  state = optimizers.adafactor(lambda t: 1.0, expert_mask=mask, min_dim=128).init(params)
  assert state.v_row['wi'].shape == (4, 128) and state.v_col['wi'].shape == (4, 256)
  assert state.v['bi'].shape == (4, 256)  # (E, H): experts axis kept, nothing to factor.
  assert state.v_row['dense'].shape == (256,) and state.v_col['dense'].shape == (128,)
  assert state.v['small'].shape == (300, 12, 25)  # Second largest axis 25 < 128.
  # Without the mask the largest axes of a (4, 128, 256) weight are 128 and 256 too,
  # but a (64, 200) expert bias would be factored over the experts axis.
  assert optimizers.factored_axes((64, 200), 64, skip_leading=False) == (0, 1)
  assert optimizers.factored_axes((64, 200), 64, skip_leading=True) is None


def test_adamw_and_decoupled_weight_decay():
  # AdamW step 1: u = g / (|g| + eps) = 1 -> p = 1 - lr - lr/peak * wd * p.
  params = {
    'head': {'kernel': jnp.ones(())},
    'body': {'kernel': jnp.ones(()), 'bias': jnp.ones(())},
  }
  config = make('adamw', lr=0.1, wd=0.01, head_wd=0.5)
  tx = optimizers.create_optimizer(config, constant(0.1), params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
  new, _ = run(tx, params, [grads])
  np.testing.assert_allclose(new['body']['kernel'], 1 - 0.1 - 0.01, rtol=1e-5)
  np.testing.assert_allclose(new['head']['kernel'], 1 - 0.1 - 0.5, rtol=1e-5)
  np.testing.assert_allclose(new['body']['bias'], 1 - 0.1, rtol=1e-5)  # No decay on biases.


def test_weight_decay_follows_the_schedule_shape_not_the_learning_rate():
  """At lr(t) = peak / 4: decay (lr(t) / peak) * wd * p = 0.25 * 0.01, whatever the peak is.

  big_vision / V-MoE would decay lr(t) * wd * p = 0.0025 * 0.01 at peak 0.01: their
  `wd` is weight_decay / learning_rate here (the conversion in optim's docstring).
  """
  params = {'body': {'kernel': jnp.ones(())}}
  zero = {'body': {'kernel': jnp.zeros(())}}
  for peak in (1e-3, 1e-2):
    config = make('sgd', lr=peak, beta1=0.0, wd=0.01)
    tx = optimizers.create_optimizer(config, constant(peak / 4), params)
    new, _ = run(tx, params, [zero])
    np.testing.assert_allclose(new['body']['kernel'], 1 - 0.25 * 0.01, rtol=1e-6)


def test_linear_routers_are_decayed_and_soft_moe_slots_are_not():
  params = {
    'block_00': {
      'moe': {'router': jnp.ones((4, 2)), 'wi': jnp.ones((2, 4, 8)), 'bi': jnp.ones((2, 8))}
    },
    'block_01': {'moe': {'router': jnp.ones((4, 6)), 'router_scale': jnp.ones(())}},
    'head': {'kernel': jnp.ones((4, 3))},
  }
  decay = optimizers.weight_decay_tree(params, 0.01, 0.5)
  assert decay['block_00']['moe']['router'] == 0.01  # A top-k router, as V-MoE decays it.
  assert decay['block_00']['moe']['wi'] == 0.01 and decay['block_00']['moe']['bi'] == 0.0
  assert decay['block_01']['moe']['router'] == 0.0  # Soft MoE slots: only their direction counts.
  assert decay['block_01']['moe']['router_scale'] == 0.0
  assert decay['head']['kernel'] == 0.5


def test_adafactor_clipping_scales_like_clipped_gradients():
  # Clipping inside the fused Adafactor equals clipping the gradients first.
  params = {'a': jnp.ones((130, 140)), 'b': jnp.ones((3,))}
  grads = {'a': jnp.linspace(-3, 5, 130 * 140).reshape(130, 140), 'b': jnp.array([4.0, -2, 1])}
  norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
  clipped = jax.tree.map(lambda g: g * (1.0 / norm), grads)
  # (No momentum: its bfloat16 rounding would hide float32-level agreement.)
  with_clip = optimizers.adafactor(lambda t: 0.1, beta1=0.0, clip_norm=1.0, min_dim=128)
  without = optimizers.adafactor(lambda t: 0.1, beta1=0.0, min_dim=128)
  p1, s1 = run(with_clip, params, [grads, grads])
  p2, s2 = run(without, params, [clipped, clipped])
  for a, b in zip(jax.tree.leaves((p1, s1.v_row, s1.v)), jax.tree.leaves((p2, s2.v_row, s2.v))):
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_sgd_momentum_and_clipping():
  params = {'w': jnp.zeros((2,))}
  config = make('sgd', lr=0.5, beta1=0.9, clip=1.0)
  tx = optimizers.create_optimizer(config, constant(0.5), params)
  grads = {'w': jnp.array([3.0, 4.0])}  # norm 5 -> clipped to norm 1: (0.6, 0.8).
  p1, _ = run(tx, params, [grads])
  np.testing.assert_allclose(p1['w'], [-0.3, -0.4], rtol=1e-6)
  p2, _ = run(tx, params, [grads, grads])
  # Trace: m2 = 0.9 * m1 + g = 1.9 * g_clipped.
  np.testing.assert_allclose(p2['w'], [-0.3 - 0.5 * 1.9 * 0.6, -0.4 - 0.5 * 1.9 * 0.8], rtol=1e-6)


def test_unknown_optimizer():
  with pytest.raises(UserError, match="optimizer 'adam' is unknown"):
    optimizers.create_optimizer(make('adam'), constant(0.1), {'w': jnp.ones(())})


def test_optimizer_state_bytes_of_the_seed_switch_vit():
  """Adafactor state / params <= 0.6 for the seed's Switch-ViT (32 experts); AdamW ~2."""
  import flax.linen as nn

  from vmoe_jax.models import vit
  from vmoe_jax.moe.spec import MoeSpec
  from vmoe_jax.runtime import sharding

  model = vit.ViT(
    num_classes=10,
    patch_size=4,
    width=300,
    depth=12,
    num_heads=12,
    mlp_dim=1024,
    moe=MoeSpec(num_experts=32, layers=tuple(range(12)), mlp_dim=1024, group_size=0),
  )
  boxed = jax.eval_shape(
    lambda k: model.init({'params': k}, jnp.zeros((1, 32, 32, 3)), train=False), jax.random.key(0)
  )['params']
  params = nn.meta.unbox(boxed)
  mask = sharding.expert_mask(sharding.param_specs(boxed))
  ratios = {}
  for name in ('adafactor', 'adamw'):
    tx = optimizers.create_optimizer(make(name, wd=1e-4), constant(1e-3), params, mask)
    ratios[name] = optimizers.state_bytes(jax.eval_shape(tx.init, params)) / optimizers.state_bytes(
      params
    )
  assert ratios['adafactor'] <= 0.6, ratios
  assert 1.99 <= ratios['adamw'] <= 2.01, ratios


def test_frozen_parameters_do_not_move():
  params = {'head': {'kernel': jnp.ones((3, 2))}, 'block_00': {'mlp': {'kernel': jnp.ones((3, 3))}}}
  grads = jax.tree.map(lambda p: 2.0 * p, params)
  config = make('adamw', wd=1e-2)
  config.optimizer.frozen = '^(?!head/)'  # Train the head only.
  tx = optimizers.create_optimizer(config, constant(0.1), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(jnp.abs(updates['block_00']['mlp']['kernel']).sum()) == 0.0
  assert float(jnp.abs(updates['head']['kernel']).sum()) > 0
  # The same head update as an optimizer that sees only the head's gradient.
  config.optimizer.frozen = ''
  alone = optimizers.create_optimizer(config, constant(0.1), {'head': params['head']})
  expected, _ = alone.update(
    {'head': grads['head']}, alone.init({'head': params['head']}), {'head': params['head']}
  )
  np.testing.assert_allclose(updates['head']['kernel'], expected['head']['kernel'], rtol=1e-6)
  for pattern, message in (('nothing', 'matches no parameter'), ('.', 'matches every parameter')):
    config.optimizer.frozen = pattern
    with pytest.raises(UserError, match=message):
      optimizers.create_optimizer(config, constant(0.1), params)
