r"""Dense ViT on CIFAR-10: the seed's baseline (width 300, depth 12, 12 heads, MLP 1024, patch 4).

On a GPU/TPU host with CIFAR-10 prepared for TFDS:

  python -m vmoe_jax.main --config=configs/cifar10_vit.py --workdir=/tmp/cifar10_vit \
      --config.input.data_dir=$HOME/tensorflow_datasets

Run locally (2 CPU cores, a few minutes, on mocked-size settings):

  python -m vmoe_jax.main --config=configs/cifar10_vit.py:local --workdir=/tmp/c10_local

11.8M parameters, class-token head, dropout 0.1, bfloat16; random crops and
flips; Adafactor, 200 epochs of batch 256 (5 warmup, rsqrt decay, 20
cooldown). configs/cifar10_switch.py and cifar10_vmoe.py are its MoE
siblings.

Expected: not measured yet (the offline benchmark is Fashion-MNIST; this
config needs the CIFAR-10 download).
"""

from vmoe_jax.schema import defaults


def get_config(arg=None):
  arg = defaults.config_arg(arg, ('local',), __file__)
  config = defaults.get_config()

  # Model: 11.8M parameters (see README, "Parameter counts").
  config.model.patch_size = 4
  config.model.width = 300
  config.model.depth = 12
  config.model.num_heads = 12
  config.model.mlp_dim = 1024
  config.model.classifier = 'token'
  config.model.dropout = 0.1
  config.model.dtype = 'bfloat16'
  config.model.moe.num_experts = 0

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
