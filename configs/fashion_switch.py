r"""Switch-ViT on Fashion-MNIST at the active FLOPs of configs/fashion_vit.py.

  python -m vmoe_jax.main --config=configs/fashion_switch.py --workdir=/tmp/fashion_switch

The dense recipe with 8 experts in blocks 1 and 3 (every other block), each
expert as wide as the dense MLP (512): top-1 routing, so every kept token runs
exactly the dense MLP's FLOPs (plus the router's 128x8 matmul). Capacity
factor 1.25 at training, 2.0 at evaluation, load-balancing loss 0.01, groups
of 8 images.

Measured (2 CPU cores, one device, seed 0, alone on the machine): 89.78%
test accuracy (dense: 89.42%); 20.2 min training (1.13x the dense 17.9),
21.6 min for the command; 141 training images/s; 0.3% of the test
assignments dropped; 2.92M parameters, 0.1201 GFLOPs/image.
"""

from vmoe_jax import config_defaults


def get_config(arg=None):
  arg = config_defaults.config_arg(arg, ('val',), __file__)
  config = config_defaults.sibling_config(__file__, 'fashion_vit.py', arg)
  config_defaults.apply_moe_preset(config, 'switch')
  moe = config.model.moe
  moe.num_experts = 8
  moe.layers = '0,2'  # Chosen on :val over blocks 1, 3 (docs/fashion_mnist.md).
  moe.group_size = 8
  return config
