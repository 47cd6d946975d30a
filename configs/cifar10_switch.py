r"""Switch-ViT on CIFAR-10: the seed's model, 32 experts in every block, top-1 routing.

Width 300, depth 12, 12 heads, MLP 1024, patch 4; K=1, capacity factor 1.0
(2.0 at evaluation), Switch load balancing loss 0.01. On a GPU/TPU host:

  python -m vmoe_jax.main --config=configs/cifar10_switch.py --workdir=/tmp/cifar10_switch \
      --config.input.data_dir=$HOME/tensorflow_datasets

Sweep the number of experts with an override, e.g.

  python -m vmoe_jax.main --config=configs/cifar10_switch.py --workdir=/tmp/switch64 \
      --config.model.moe.num_experts=64

Run locally (2 CPU cores):

  python -m vmoe_jax.main --config=configs/cifar10_switch.py:local --workdir=/tmp/c10s_local
"""

from vmoe_jax.schema import defaults


def get_config(arg=None):
  arg = defaults.config_arg(arg, ('local',), __file__)
  config = defaults.get_config()

  # Model: 240.9M parameters at 32 experts (see README, "Parameter counts").
  config.model.patch_size = 4
  config.model.width = 300
  config.model.depth = 12
  config.model.num_heads = 12
  config.model.mlp_dim = 1024
  config.model.classifier = 'token'
  config.model.dropout = 0.1
  config.model.dtype = 'bfloat16'

  # Mixture of experts: Switch (Fedus et al. 2021) in every block; the seed
  # trains at capacity 1.0 (the preset's 1.25 is the paper's).
  defaults.apply_moe_preset(config, 'switch')
  moe = config.model.moe
  moe.num_experts = 32
  moe.layers = 'all'
  moe.capacity_factor = 1.0
  moe.group_size = 8  # Images per routing group (V-MoE paper): independent of the devices.

  # Input: random crop after 4-pixel padding, horizontal flips.
  config.input.dataset = 'cifar10'
  config.input.batch_size = 256
  config.input.eval_batch_size = 1024
  config.input.crop_padding = 4
  config.input.flip = True

  # Optimizer: Adafactor as in Scaling Vision Transformers.
  config.optimizer.name = 'adafactor'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.head_weight_decay = 1e-3
  config.optimizer.grad_clip_norm = 1.0

  # Schedule: warmup 5 epochs -> rsqrt -> linear cooldown over the last 20.
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
