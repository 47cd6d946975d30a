r"""V-MoE on Fashion-MNIST at the active FLOPs of configs/fashion_vit.py.

  python -m vmoe_jax.main --config=configs/fashion_vmoe.py --workdir=/tmp/fashion_vmoe

The dense recipe with 8 experts in blocks 1 and 3 and the V-MoE paper's
routing (Riquelme et al. 2021): top-2, capacity factor 1.05, router noise
1/E, importance and load losses 0.005 each, groups of 8 images, trained
without and evaluated with Batch Prioritized Routing. Equal active FLOPs:
each expert is HALF as wide as the dense MLP (256), so the two experts a
token visits cost what the dense MLP costs. Earlier results:
docs/experiments/config_history.md.

Expected: 91.64 +- 0.19% test accuracy (seeds 0, 1, 2), 1.05x the dense
step (commit 976303f, 2026-12-06).
"""

from vmoe_jax.schema import defaults

ARGS = ('val', 'w8', 'w16', 'w32', 'w64', 'w128')  # As configs/fashion_vit.py.


def get_config(arg=None):
  defaults.config_args(arg, ARGS, __file__)
  config = defaults.sibling_config(__file__, 'fashion_vit.py', arg)
  defaults.apply_moe_preset(config, 'vmoe')
  moe = config.model.moe
  moe.num_experts = 8
  moe.layers = 'every_2'
  moe.mlp_dim = config.model.mlp_dim // 2
  return config
