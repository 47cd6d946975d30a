r"""Dense ViT on Fashion-MNIST (the benchmark of these machines; recipe being tuned).

python -m vmoe_jax.main --config=configs/fashion_vit.py --workdir=/tmp/fashion_vit
"""

from vmoe_jax import config_defaults


def get_config(arg=None):
  arg = config_defaults.config_arg(arg, ('val',), __file__)
  config = config_defaults.get_config()

  config.model.patch_size = 4
  config.model.stem = 'conv'
  config.model.width = 128
  config.model.depth = 6
  config.model.num_heads = 4
  config.model.mlp_dim = 512
  config.model.classifier = 'gap'

  config.input.dataset = 'fashion_mnist'
  config.input.batch_size = 128
  config.input.eval_batch_size = 500
  config.input.crop_padding = 2
  config.input.flip = True
  if arg == 'val':
    config.input.train_split = 'train[:54000]'
    config.input.test_split = 'train[54000:]'

  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 5e-5
  config.optimizer.head_weight_decay = 5e-5
  config.optimizer.label_smoothing = 0.1
  config.schedule.decay = 'cosine'
  config.schedule.warmup_steps = 200
  config.train.num_steps = 2000
  config.train.log_every = 100
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  return config
