"""Small configs shared by the tests (tests/ is on sys.path under pytest)."""

from vmoe_jax.schema import defaults


def tiny_config(num_experts=8, steps=2):
  config = defaults.get_config()
  config.model.patch_size = 4
  config.model.width = 16
  config.model.depth = 2
  config.model.num_heads = 2
  config.model.mlp_dim = 32
  config.model.moe.num_experts = num_experts
  config.model.moe.layers = 'every_2'
  config.model.moe.group_size = 2
  config.input.batch_size = 16
  config.input.eval_batch_size = 128
  config.input.crop_padding = 1
  config.input.flip = False
  config.schedule.warmup_steps = 1
  config.train.num_steps = steps
  config.train.log_every = 1
  config.train.eval_every = 0
  config.train.checkpoint_every = 0
  return config
