r"""V-MoE on CIFAR-10: top-2 routing in every other block with Batch Prioritized Routing.

As in Riquelme et al. 2021: K=2, capacity factor 1.05, BPR, router noise
std 1/E, importance and load losses 0.005 each; 32 experts. On a GPU/TPU host:

  python -m vmoe_jax.main --config=configs/cifar10_vmoe.py --workdir=/tmp/cifar10_vmoe \
      --config.input.data_dir=$HOME/tensorflow_datasets

Evaluate at a lower capacity (BPR drops the least confident patches first):

  python -m vmoe_jax.main --config=configs/cifar10_vmoe.py --workdir=/tmp/cifar10_vmoe \
      --config.model.moe.eval_capacity_factor=0.5

Run locally (2 CPU cores):

  python -m vmoe_jax.main --config=configs/cifar10_vmoe.py:local --workdir=/tmp/c10v_local
"""

from vmoe_jax.schema import defaults


def get_config(arg=None):
  arg = defaults.config_arg(arg, ('local',), __file__)
  config = defaults.get_config()

  # Model: the seed's ViT size, MoE in blocks 1, 3, ..., 11.
  config.model.patch_size = 4
  config.model.width = 300
  config.model.depth = 12
  config.model.num_heads = 12
  config.model.mlp_dim = 1024
  config.model.classifier = 'token'
  config.model.dropout = 0.1
  config.model.dtype = 'bfloat16'

  # V-MoE (Riquelme et al. 2021): K=2, capacity 1.05, BPR, noise 1/E,
  # importance and load losses, every other block.
  defaults.apply_moe_preset(config, 'vmoe')
  moe = config.model.moe
  moe.num_experts = 32
  moe.group_size = 8  # Images per routing group (V-MoE paper): independent of the devices.

  # Input.
  config.input.dataset = 'cifar10'
  config.input.batch_size = 256
  config.input.eval_batch_size = 1024
  config.input.crop_padding = 4
  config.input.flip = True

  # Optimizer and schedule.
  config.optimizer.name = 'adafactor'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.head_weight_decay = 1e-3
  config.schedule.decay = 'rsqrt'
  config.schedule.timescale = 10_000
  config.train.num_epochs = 200
  config.train.warmup_epochs = 5
  config.train.cooldown_epochs = 20
  config.train.log_every = 100
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000

  if arg == 'local':  # A tiny run to check the setup on a laptop-class CPU.
    defaults.shrink_for_local_run(config)
  return config
