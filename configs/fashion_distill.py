r"""Distillation: a Switch-ViT teacher into the dense Fashion-MNIST ViT.

  # Teacher: python -m vmoe_jax.main --config=configs/fashion_switch.py \
  #     --workdir=/tmp/fashion_switch
  python -m vmoe_jax.main --config=configs/fashion_distill.py --workdir=/tmp/student \
      --config.distill.teacher=/tmp/fashion_switch

configs/fashion_vit.py trained on 0.5 * CE(labels) + 0.5 * T^2 * KL(teacher
|| student) at temperature T = 2, the teacher frozen in the same jitted
step; its baseline is configs/fashion_vit.py itself (same steps, seed).
`--config.distill.init_from_teacher=True` starts the student from the
teacher's non-expert weights (the Switch paper's initialisation).

Expected: not measured yet.
"""

from vmoe_jax.schema import defaults

ARGS = ('val', 'w8', 'w16', 'w32', 'w64', 'w128')  # As configs/fashion_vit.py.


def get_config(arg=None):
  defaults.config_args(arg, ARGS, __file__)
  config = defaults.sibling_config(__file__, 'fashion_vit.py', arg)
  config.distill.alpha = 0.5
  config.distill.temperature = 2.0
  return config
