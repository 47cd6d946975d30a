"""Routing statistics: hand-counted kept assignments, loads, class x expert, patch grids."""

import jax
import jax.numpy as jnp
import numpy as np
from small_configs import tiny_config

from vmoe_jax.evaluation import routing_stats
from vmoe_jax.models import factory
from vmoe_jax.moe.routing import Routing

# Two images, three tokens, K=2; slot -1 is dropped.
EXPERT = np.array(
  [
    [[0, 1], [1, 2], [0, 2]],
    [[2, 0], [2, 1], [1, 0]],
  ]
)
SLOT = np.array(
  [
    [[0, 0], [1, -1], [-1, 0]],
    [[0, -1], [-1, -1], [0, 1]],
  ]
)


def test_kept_per_image():
  np.testing.assert_array_equal(routing_stats.kept_per_image(SLOT), [4, 3])


def test_expert_counts_with_and_without_padding():
  chosen, kept = routing_stats.expert_counts(EXPERT, SLOT, 4)
  # Expert 0: chosen by (image, token, choice) (0,0,0) (0,2,0) (1,0,1) (1,2,1), kept by
  # (0,0,0) and (1,2,1); expert 1 kept (0,0,1) (0,1,0) (1,2,0); expert 2 (0,2,1) (1,0,0).
  np.testing.assert_array_equal(chosen, [4, 4, 4, 0])
  np.testing.assert_array_equal(kept, [2, 3, 2, 0])
  chosen, kept = routing_stats.expert_counts(EXPERT, SLOT, 4, mask=np.array([1.0, 0.0]))
  np.testing.assert_array_equal(chosen, [2, 2, 2, 0])
  np.testing.assert_array_equal(kept, [1, 2, 1, 0])


def test_class_expert_counts_and_row_shares():
  first = EXPERT[..., 0]  # [[0, 1, 0], [2, 2, 1]]
  counts = routing_stats.class_expert_counts(first, np.array([1, 0]), 3, 3)
  np.testing.assert_array_equal(counts, [[0, 1, 2], [2, 1, 0], [0, 0, 0]])
  shares = routing_stats.row_shares(counts)
  np.testing.assert_allclose(shares, [[0, 1 / 3, 2 / 3], [2 / 3, 1 / 3, 0], [0, 0, 0]])
  masked = routing_stats.class_expert_counts(first, np.array([1, 0]), 3, 3, np.array([0, 1]))
  np.testing.assert_array_equal(masked, [[0, 1, 2], [0, 0, 0], [0, 0, 0]])


def test_patch_grid_leaves_out_the_class_token_and_marks_skipped_patches():
  expert = np.array([[7, 0], [1, 2], [3, 1], [2, 0], [0, 3]])  # Class token, then 2x2 patches.
  slot = np.array([[0, 0], [-1, -1], [0, -1], [-1, 4], [-1, -1]])
  experts, skipped = routing_stats.patch_grid(expert, slot, (2, 2), has_class_token=True)
  np.testing.assert_array_equal(experts, [[1, 3], [2, 0]])
  np.testing.assert_array_equal(skipped, [[True, False], [False, True]])


def test_tally_summary():
  tally = routing_stats.RoutingTally(num_experts=4, num_classes=2)
  tally.add(Routing(EXPERT, SLOT, np.zeros(SLOT.shape)), np.array([1, 0]), np.array([1.0, 1.0]))
  summary = tally.summary()
  assert summary['kept_share'] == 7 / 12
  # Token (1, 1) lost both its choices; the other five tokens kept at least one.
  assert summary['skipped_token_share'] == 1 / 6
  np.testing.assert_allclose(summary['expert_chosen_share'], [4 / 12, 4 / 12, 4 / 12, 0])
  np.testing.assert_allclose(summary['expert_kept_share'], [2 / 12, 3 / 12, 2 / 12, 0])
  np.testing.assert_array_equal(tally.class_expert, [[0, 1, 2, 0], [2, 1, 0, 0]])


def test_tally_of_expert_choice_views_counts_per_token():
  # Two tokens of one image, E=3, experts in each token's gate order; expert 1
  # took both tokens, expert 0 token 0, expert 2 none.
  expert = np.array([[[0, 1, 2], [2, 1, 0]]])
  slot = np.array([[[0, 0, -1], [-1, 1, -1]]])
  tally = routing_stats.RoutingTally(num_experts=3, num_classes=1, experts_choose=True)
  tally.add(Routing(expert, slot, np.zeros(slot.shape)), np.array([0]), np.array([1.0]))
  summary = tally.summary()
  assert summary['kept_share'] == 3 / 2  # Experts per token.
  assert summary['skipped_token_share'] == 0.0
  np.testing.assert_allclose(summary['expert_chosen_share'], [1 / 2, 0, 1 / 2])  # First choices.
  np.testing.assert_allclose(summary['expert_kept_share'], [1 / 2, 1, 0])


def test_sown_routing_counts_match_the_layer_dropped_metric():
  config = tiny_config()
  config.model.moe.group_size = 0
  base = factory.create_model(config, num_classes=10)
  model = base.clone(moe=base.moe.at_eval(0.5, False))
  images = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  variables = jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(images)
  (_, extras), state = jax.jit(
    lambda v, x: model.apply(v, x, train=False, mutable=['intermediates'])
  )(variables, images)
  routing = routing_stats.moe_routing(state['intermediates'])
  assert list(routing) == ['block_01']
  layer = jax.device_get(routing['block_01'])
  assert layer.slot.shape == (4, 5, 1)  # (B, T, K): 2x2 patches + the class token.
  kept = routing_stats.kept_per_image(layer.slot)
  # 4 images x 5 tokens in one group, 8 experts, C = ceil(20 * 0.5 / 8) = 2: at most 16 kept.
  assert 0 < kept.sum() <= 16
  dropped = 1.0 - kept.sum() / layer.slot.size
  np.testing.assert_allclose(dropped, extras['moe'][1]['dropped'], rtol=1e-6)
  assert jnp.all((layer.slot >= 0) == (layer.combine_weight > 0))
