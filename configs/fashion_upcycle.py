r"""Sparse upcycling: a trained dense Fashion-MNIST ViT continued as a Switch-ViT.

  # Upstream: python -m vmoe_jax.main --config=configs/fashion_vit.py --workdir=/tmp/fashion_vit
  python -m vmoe_jax.main --config=configs/fashion_upcycle.py --workdir=/tmp/upcycled \
      --config.init_from=/tmp/fashion_vit
  # The baseline: the same dense model continued for the same steps.
  python -m vmoe_jax.main --config=configs/fashion_upcycle.py:dense --workdir=/tmp/dense_more \
      --config.init_from=/tmp/fashion_vit

configs/fashion_switch.py's model (8 experts of the dense MLP's width in
blocks 1 and 3, top-1) with every expert a copy of its block's dense MLP
(Komatsuzaki et al. 2022), a fresh router and 1% noise on the copies; then
`num_steps` more steps at a lower learning rate (5e-4, 50 warmup steps,
cosine), evaluated every 100 steps and at step 0 (what the transfer starts
from). Measured figures: the README, "Transfer".
"""

from vmoe_jax import config_defaults


def get_config(arg=None):
  arg = config_defaults.config_arg(arg, ('dense',), __file__)
  name = 'fashion_vit.py' if arg == 'dense' else 'fashion_switch.py'
  config = config_defaults.sibling_config(__file__, name)
  if arg != 'dense':
    config.init.upcycle_noise_std = 0.01
  config.optimizer.learning_rate = 5e-4
  config.schedule.warmup_steps = 50
  config.train.num_steps = 300
  config.train.eval_every = 100
  config.train.checkpoint_every = 0
  return config
