r"""Switch-ViT on CIFAR-10: the seed's model, 32 experts in every block, top-1 routing.

On a GPU/TPU host with CIFAR-10 prepared for TFDS:

  python -m vmoe_jax.main --config=configs/cifar10_switch.py --workdir=/tmp/cifar10_switch \
      --config.input.data_dir=$HOME/tensorflow_datasets

Sweep the number of experts with an override, e.g.

  python -m vmoe_jax.main --config=configs/cifar10_switch.py --workdir=/tmp/switch64 \
      --config.model.moe.num_experts=64

Run locally (2 CPU cores):

  python -m vmoe_jax.main --config=configs/cifar10_switch.py:local --workdir=/tmp/c10s_local

configs/cifar10_vit.py with an MoE in every block: 32 experts, K=1, capacity
factor 1.0 (2.0 at evaluation), Switch load balancing loss 0.01, routing
groups of 8 images; 240.9M parameters at 32 experts (see README, "Parameter
counts").

Expected: not measured yet (the offline benchmark is Fashion-MNIST; this
config needs the CIFAR-10 download).
"""

from vmoe_jax.schema import defaults


def get_config(arg=None):
  arg = defaults.config_arg(arg, ('local',), __file__)
  config = defaults.sibling_config(__file__, 'cifar10_vit.py')

  # Mixture of experts: Switch (Fedus et al. 2021) in every block; the seed
  # trains at capacity 1.0 (the preset's 1.25 is the paper's).
  defaults.apply_moe_preset(config, 'switch')
  moe = config.model.moe
  moe.num_experts = 32
  moe.layers = 'all'
  moe.capacity_factor = 1.0
  moe.group_size = 8  # Images per routing group (V-MoE paper): independent of the devices.

  if arg == 'local':  # A tiny run to check the setup on a laptop-class CPU.
    defaults.shrink_for_local_run(config)
  return config
