r"""Switch-ViT on the offline digits data: the README quick start.

8 experts in every other block (blocks 1 and 3), top-1 routing, capacity
factor 1.25 (2.0 at evaluation); trains in about two minutes on 2 CPU cores:

  python -m vmoe_jax.main --config=configs/digits_switch.py --workdir=/tmp/digits_switch

Data: 1,438 train / 359 test images (fixed split, see input_pipeline.py).
"""

from vmoe_jax.schema import defaults


def get_config(arg=None):
  defaults.config_arg(arg, (), __file__)  # This file takes no argument.
  config = defaults.get_config()

  # Model: 2x2 patches -> 16 tokens, global average pooling.
  config.model.patch_size = 2
  config.model.width = 64
  config.model.depth = 4
  config.model.num_heads = 4
  config.model.mlp_dim = 128
  config.model.classifier = 'gap'
  config.model.dropout = 0.1

  # Mixture of experts: Switch routing (K=1, capacity 1.25 / 2.0 at
  # evaluation, load balancing 0.01) in blocks 1 and 3.
  defaults.apply_moe_preset(config, 'switch')
  moe = config.model.moe
  moe.num_experts = 8
  moe.layers = 'every_2'
  moe.group_size = 8  # Images per routing group (V-MoE paper): independent of the devices.

  # Input: shifts of up to 1 pixel; no flips (digits are not mirror-symmetric).
  config.input.dataset = 'digits'
  config.input.batch_size = 128
  config.input.eval_batch_size = 384  # All 359 test images, padded; 8 devices x 6 groups.
  config.input.crop_padding = 1
  config.input.flip = False

  # Optimizer and schedule.
  config.optimizer.name = 'adafactor'
  config.optimizer.learning_rate = 6e-3
  config.optimizer.weight_decay = 1e-3
  config.optimizer.head_weight_decay = 1e-3
  config.schedule.decay = 'rsqrt'
  config.schedule.timescale = 200
  config.schedule.warmup_steps = 100
  config.schedule.cooldown_steps = 300

  config.train.num_steps = 1500
  config.train.log_every = 100
  config.train.eval_every = 500
  config.train.checkpoint_every = 500
  return config
