r"""V-MoE on CIFAR-10: top-2 routing in every other block with Batch Prioritized Routing.

On a GPU/TPU host with CIFAR-10 prepared for TFDS:

  python -m vmoe_jax.main --config=configs/cifar10_vmoe.py --workdir=/tmp/cifar10_vmoe \
      --config.input.data_dir=$HOME/tensorflow_datasets

Evaluate at a lower capacity (BPR drops the least confident patches first):

  python -m vmoe_jax.main --config=configs/cifar10_vmoe.py --workdir=/tmp/cifar10_vmoe \
      --config.model.moe.eval_capacity_factor=0.5

Run locally (2 CPU cores):

  python -m vmoe_jax.main --config=configs/cifar10_vmoe.py:local --workdir=/tmp/c10v_local

configs/cifar10_vit.py with MoE layers in blocks 1, 3, ..., 11, as in
Riquelme et al. 2021: 32 experts, K=2, capacity factor 1.05, trained without
and evaluated with BPR, router noise std 1/E, importance and load losses
0.005 each, routing groups of 8 images.

Expected: not measured yet (the offline benchmark is Fashion-MNIST; this
config needs the CIFAR-10 download).
"""

from vmoe_jax.schema import defaults


def get_config(arg=None):
  arg = defaults.config_arg(arg, ('local',), __file__)
  config = defaults.sibling_config(__file__, 'cifar10_vit.py')

  # V-MoE (Riquelme et al. 2021): K=2, capacity 1.05, BPR at evaluation,
  # noise 1/E, importance and load losses, every other block.
  defaults.apply_moe_preset(config, 'vmoe')
  moe = config.model.moe
  moe.num_experts = 32
  moe.group_size = 8  # Images per routing group (V-MoE paper): independent of the devices.

  if arg == 'local':  # A tiny run to check the setup on a laptop-class CPU.
    defaults.shrink_for_local_run(config)
  return config
