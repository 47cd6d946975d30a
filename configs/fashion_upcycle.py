r"""Sparse upcycling: a trained dense Fashion-MNIST ViT continued as an MoE.

  # Upstream: python -m vmoe_jax.main --config=configs/fashion_vit.py --workdir=/tmp/fashion_vit
  python -m vmoe_jax.main --config=configs/fashion_upcycle.py --workdir=/tmp/upcycled \
      --config.init_from=/tmp/fashion_vit
  # The baseline: the same dense model continued for the same steps.
  python -m vmoe_jax.main --config=configs/fashion_upcycle.py:dense --workdir=/tmp/dense_more \
      --config.init_from=/tmp/fashion_vit

The dense model with the MLPs of blocks 0 and 2 replaced by 8 experts, every
expert an exact copy of its block's dense MLP (Komatsuzaki et al. 2023,
"Sparse Upcycling") and a fresh router. The MoE starts as exactly the dense
function: the router is dropless top-2 with renormalised combine weights
(each token's two weights sum to 1, and no token is dropped for capacity),
so at step 0 every token gets 1 x MLP(x), in training and in evaluation
(`tests/mapping_test.py`). Top-1 would not do: its renormalised weight is
always 1, so the task would never train the router. The MoE layers run two
experts per token: twice the dense MLP's FLOPs there. Then `num_steps` more
steps at a lower learning rate (5e-4, 50 warmup steps, cosine), evaluated
every 100 steps and at step 0.

Expected: at step 0, the upstream's test accuracy exactly
(`tests/mapping_test.py`, `tests/warm_start_test.py`); the accuracy after
training is not measured yet.
"""

from vmoe_jax.schema import defaults

# ':dense' continues the dense model instead; ':val' and ':w8' ... ':w128' as
# configs/fashion_vit.py (comma-separated, e.g. ':w32,val').
ARGS = ('dense', 'val', 'w8', 'w16', 'w32', 'w64', 'w128')


def get_config(arg=None):
  args = defaults.config_args(arg, ARGS, __file__)
  base = ','.join(sorted(args - {'dense'}))
  config = defaults.sibling_config(__file__, 'fashion_vit.py', base)
  if 'dense' not in args:
    defaults.apply_moe_preset(config, 'switch')
    moe = config.model.moe
    moe.num_experts = 8
    moe.layers = '0,2'
    moe.router = 'dropless'
    moe.num_selected = 2
    moe.renormalize = True
    moe.block_size = 32
    config.init.upcycle_noise_std = 0.0  # Exact copies: the dense function at step 0.
  config.optimizer.learning_rate = 5e-4
  config.schedule.warmup_steps = 50
  config.train.num_steps = 300
  config.train.eval_every = 100
  config.train.checkpoint_every = 0
  return config
