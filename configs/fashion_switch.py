r"""Switch-ViT on Fashion-MNIST at the active FLOPs of configs/fashion_vit.py.

  python -m vmoe_jax.main --config=configs/fashion_switch.py --workdir=/tmp/fashion_switch

The dense recipe with 8 experts in blocks 0 and 2, each expert as wide as
the dense MLP (512): top-1 routing, so every kept token runs exactly the
dense MLP's FLOPs (plus the router's 128x8 matmul). Capacity factor 1.25 at
training, 2.0 at evaluation, load-balancing loss 0.01, groups of 8 images.
The blocks were chosen on `:val`; that choice and earlier results are in
docs/experiments/config_history.md.

Expected: 91.83 +- 0.25% test accuracy (seeds 0, 1, 2; +0.11 +- 0.28 paired
against configs/fashion_vit.py), about 1.08x the dense run's time (commit
2eea35d, 2026-12-07).
"""

from vmoe_jax.schema import defaults

ARGS = ('val', 'w8', 'w16', 'w32', 'w64', 'w128')  # As configs/fashion_vit.py.


def get_config(arg=None):
  defaults.config_args(arg, ARGS, __file__)
  config = defaults.sibling_config(__file__, 'fashion_vit.py', arg)
  defaults.apply_moe_preset(config, 'switch')
  moe = config.model.moe
  moe.num_experts = 8
  moe.layers = '0,2'  # Chosen on :val over blocks 1, 3 (docs/experiments/fashion_mnist.md).
  return config
