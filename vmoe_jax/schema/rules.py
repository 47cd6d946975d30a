"""What every config key's value must be: the `RULES` table that `validation.validate` checks.

`RULES` is an explicit table from every key of `defaults.get_config()`
to what its value must be (a type and a range or a set of choices); a test
checks that it covers every key of the schema, so a new key needs a rule.
`check_key` raises the one-line UserError for a value its rule refuses. The
cross-field checks are in `vmoe_jax.schema.validation`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
from collections.abc import Callable
from typing import Any

import numpy as np

from vmoe_jax.errors import UserError
from vmoe_jax.models import vit
from vmoe_jax.moe import routers
from vmoe_jax.moe.spec import DISPATCHES
from vmoe_jax.moe.spec import GROUPED_MATMULS
from vmoe_jax.moe.spec import LAYERS_SYNTAX
from vmoe_jax.moe.spec import LOAD_THRESHOLDS
from vmoe_jax.optim import optimizers
from vmoe_jax.optim import schedules
from vmoe_jax.storage import checkpointing

# The routers of model.moe.router: the router table of vmoe_jax.moe.routers.
ROUTER_NAMES = tuple(routers.ROUTERS)

ON_NONFINITE = ('stop', 'skip')

# Side of the (square) images of datasets whose size is known without reading
# them; TFDS datasets take input.image_size when it is set.
IMAGE_SIDES = {'digits': 8, 'fashion_mnist': 28, 'cifar10': 32, 'cifar100': 32}


# --------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class Rule:
  """What the value of one key must be.

  Attributes:
    accepts: value -> whether it is valid (None never reaches it).
    domain: completes 'must be ...', e.g. 'an integer >= 0'.
    note: what special values mean, e.g. '0: a dense ViT'.
    example: a valid value for the fix; None: the schema default.
  """

  accepts: Callable[[Any], bool]
  domain: str
  note: str = ''
  example: Any = None


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
  return (_is_int(value) or isinstance(value, (float, np.floating))) and math.isfinite(value)


def _bounds_text(ge=None, gt=None, le=None, lt=None) -> str:
  low = f'{ge:g}' if ge is not None else (f'{gt:g}' if gt is not None else None)
  high = f'{le:g}' if le is not None else (f'{lt:g}' if lt is not None else None)
  if low is not None and high is not None:
    return f' in {"[" if ge is not None else "("}{low}, {high}{"]" if le is not None else ")"}'
  if low is not None:
    return f' {">=" if ge is not None else ">"} {low}'
  if high is not None:
    return f' {"<=" if le is not None else "<"} {high}'
  return ''


def _in_bounds(value, ge=None, gt=None, le=None, lt=None) -> bool:
  return (
    (ge is None or value >= ge)
    and (gt is None or value > gt)
    and (le is None or value <= le)
    and (lt is None or value < lt)
  )


def integer(ge=None, le=None, also=(), note='', example=None) -> Rule:
  """An int (not a bool) in [ge, le], or one of the special values `also`."""
  domain = f'an integer{_bounds_text(ge=ge, le=le)}'
  if also:
    domain = ' or '.join(str(a) for a in also) + f' or {domain}'
  return Rule(
    lambda v: _is_int(v) and (v in also or _in_bounds(v, ge=ge, le=le)), domain, note, example
  )


def number(ge=None, gt=None, le=None, lt=None, note='', example=None) -> Rule:
  """A finite int or float (not a bool) within the bounds."""
  domain = f'a number{_bounds_text(ge=ge, gt=gt, le=le, lt=lt)}'
  return Rule(lambda v: _is_number(v) and _in_bounds(v, ge, gt, le, lt), domain, note, example)


def choice(options: tuple[str, ...], note='') -> Rule:
  return Rule(lambda v: v in options, 'one of ' + ', '.join(repr(o) for o in options), note)


def boolean(note='', example=None) -> Rule:
  return Rule(lambda v: isinstance(v, (bool, np.bool_)), 'True or False', note, example)


def string(note='', nonempty=False, example=None) -> Rule:
  def accepts(value):
    return isinstance(value, str) and (bool(value.strip()) or not nonempty)

  return Rule(accepts, 'a non-empty string' if nonempty else 'a string', note, example)


def positive_tuple(item: Rule, what: str) -> Rule:
  """A non-empty tuple (or list) whose items `item` accepts."""

  def accepts(value):
    return isinstance(value, (tuple, list)) and bool(value) and all(item.accepts(x) for x in value)

  return Rule(accepts, f'a non-empty tuple of {what}')


def _decodes_variant(value) -> bool:
  if not isinstance(value, str):
    return False
  try:
    vit.decode_variant(value)
  except UserError:
    return False
  return True


def _layers_syntax(value) -> bool:
  """The forms of `spec.moe_layer_indices` (the blocks are checked against the depth later)."""
  return isinstance(value, str) and re.fullmatch(LAYERS_SYNTAX, value) is not None


def _compiles(value) -> bool:
  if not isinstance(value, str):
    return False
  try:
    re.compile(value)
  except re.error:
    return False
  return True


RULES: dict[str, Rule] = {
  'seed': integer(ge=0),
  # Model.
  'model.variant': Rule(
    _decodes_variant,
    f'a size NAME/PATCH with NAME in {", ".join(vit.VARIANTS)}',
    'None: width, depth, num_heads, mlp_dim and patch_size given one by one',
    'S/16',
  ),
  'model.width': integer(ge=1, note='None: from model.variant', example=64),
  'model.depth': integer(ge=1, note='None: from model.variant', example=4),
  'model.num_heads': integer(ge=1, note='None: from model.variant', example=4),
  'model.mlp_dim': integer(ge=1, note='None: from model.variant', example=256),
  'model.patch_size': integer(ge=1, note='None: from model.variant', example=4),
  'model.classifier': choice(vit.CLASSIFIERS),
  'model.stem': choice(vit.STEMS),
  'model.stem_extra_convs': Rule(
    lambda v: isinstance(v, str) and re.fullmatch(r'\d+(,\d+)*', v.replace(' ', '')) is not None,
    "a count of stride-1 convolutions for every stage such as '1', or one per stage such as '0,2'",
    "with model.stem='conv'",
    '1',
  ),
  'model.dropout': number(ge=0, lt=1),
  'model.attention_dropout': number(ge=0, lt=1),
  'model.dtype': choice(vit.DTYPES),
  # Mixture of experts.
  'model.moe.num_experts': integer(ge=0, note='0: a dense ViT'),
  'model.moe.layers': Rule(
    _layers_syntax, "'all', 'every_N', 'last_N', 'none' or block indices such as '1,3,5'"
  ),
  'model.moe.router': choice(ROUTER_NAMES),
  'model.moe.num_selected': integer(ge=1, note='K, the experts per token'),
  'model.moe.capacity_factor': number(gt=0),
  'model.moe.eval_capacity_factor': number(
    gt=0, note='None: 2.0, or the training factor for expert_choice', example=2.0
  ),
  'model.moe.capacity_multiple': integer(ge=1, note='None: 4 on GPU/TPU, 1 on CPU', example=4),
  'model.moe.batch_priority': boolean(),
  'model.moe.eval_batch_priority': boolean('None: as model.moe.batch_priority', True),
  'model.moe.renormalize': boolean(),
  'model.moe.combine_scale': number(gt=0, note='num_experts / num_selected: uniform gates weigh 1'),
  'model.moe.noise_std': number(ge=0, note='in units of 1/num_experts'),
  'model.moe.group_size': integer(
    ge=0, note='images per routing group; 0: all of a device; None: 1 for soft, else 8', example=8
  ),
  'model.moe.dispatch': choice(DISPATCHES),
  'model.moe.mlp_dim': integer(ge=1, note='None: model.mlp_dim', example=256),
  'model.moe.dropout': number(ge=0, lt=1, note='None: model.dropout', example=0.1),
  'model.moe.load_balance_weight': number(ge=0),
  'model.moe.importance_weight': number(ge=0),
  'model.moe.load_weight': number(ge=0),
  'model.moe.z_loss_weight': number(ge=0),
  'model.moe.load_threshold': choice(LOAD_THRESHOLDS),
  'model.moe.slots_per_expert': integer(ge=1, note='None: from capacity_factor', example=1),
  'model.moe.block_size': integer(ge=1, note='rows per block of the dropless matmul'),
  'model.moe.grouped_matmul': choice(GROUPED_MATMULS),
  # Devices.
  'mesh.expert': integer(ge=1, also=(-1,), note='-1: chosen from the device count'),
  # Input.
  'input.dataset': string("'digits', 'fashion_mnist' or a TFDS name", nonempty=True),
  'input.data_dir': string('None: the default place', example='DIR'),
  'input.train_split': string("optionally sliced, e.g. 'train[:54000]'", nonempty=True),
  'input.test_split': string("optionally sliced, e.g. 'train[54000:]'", nonempty=True),
  'input.batch_size': integer(ge=1),
  'input.eval_batch_size': integer(ge=1),
  'input.shuffle_buffer': integer(ge=1),
  'input.image_size': integer(ge=1, note='None: the native size', example=224),
  'input.crop_padding': integer(ge=0),
  'input.flip': boolean(),
  'input.random_erase': number(ge=0, le=1, note='share of training images; 0: off', example=0.25),
  'input.num_eval_examples': integer(ge=1, also=(-1,), note='-1: all'),
  'input.train_per_class': integer(ge=0, note='0: all'),
  # Optimizer.
  'optimizer.name': choice(optimizers.OPTIMIZERS),
  'optimizer.learning_rate': number(gt=0, note='the peak learning rate'),
  'optimizer.beta1': number(ge=0, lt=1),
  'optimizer.beta2': number(ge=0, lt=1),
  'optimizer.weight_decay': number(ge=0),
  'optimizer.head_weight_decay': number(ge=0),
  'optimizer.grad_clip_norm': number(note='<= 0 disables clipping'),
  'optimizer.factored_min_dim': integer(ge=1),
  'optimizer.label_smoothing': number(ge=0, lt=1),
  'optimizer.frozen': Rule(
    _compiles,
    "a Python regular expression over '/'-joined parameter paths",
    "'' freezes nothing",
    '^(?!head/)',
  ),
  # Schedule.
  'schedule.decay': choice(schedules.DECAYS),
  'schedule.warmup_steps': integer(ge=0),
  'schedule.cooldown_steps': integer(ge=0),
  'schedule.timescale': number(note='> 0 for rsqrt'),
  'schedule.end_value': number(ge=0),
  # Training loop.
  'train.num_steps': integer(note='> 0 unless train.num_epochs is set'),
  'train.num_epochs': number(ge=0, note='0: train.num_steps'),
  'train.warmup_epochs': number(ge=0, note='0: schedule.warmup_steps'),
  'train.cooldown_epochs': number(ge=0, note='0: schedule.cooldown_steps'),
  'train.grad_accum_steps': integer(ge=1),
  'train.log_every': integer(ge=1),
  'train.eval_every': integer(note='<= 0: only at the end'),
  'train.checkpoint_every': integer(note='<= 0: only at the end'),
  'train.keep_checkpoints': integer(ge=1),
  'train.on_nonfinite': choice(ON_NONFINITE),
  'train.max_skipped_share': number(ge=0, le=1),
  'train.on_corrupt': choice(checkpointing.ON_CORRUPT),
  # Transfer and distillation.
  'init_from': string("a workdir or checkpoint directory; '' none", example='DIR'),
  'init.step': integer(ge=0, also=(-1,), note='-1: the latest'),
  'init.upcycle_noise_std': number(ge=0),
  'distill.teacher': string("a teacher's workdir; '' none", example='DIR'),
  'distill.temperature': number(gt=0),
  'distill.alpha': number(ge=0, le=1, note='the weight of the label cross-entropy'),
  'distill.init_from_teacher': boolean(),
  # Few-shot evaluation.
  'fewshot.every': integer(note='> 0: every N steps; 0: at the end; < 0: never'),
  'fewshot.shots': positive_tuple(integer(ge=1), 'integers >= 1'),
  'fewshot.l2_regs': positive_tuple(number(gt=0), 'numbers > 0'),
  'fewshot.seed': integer(ge=0),
  'fewshot.num_trials': integer(ge=1),
  'fewshot.val_per_class': integer(ge=0),
  'fewshot.max_train_examples': integer(note='<= 0: all'),
  # Profiling.
  'profile.start_step': integer(ge=0, also=(-1,), note='-1: no profile'),
  'profile.num_steps': integer(ge=1),
}


def _cli(value) -> str:
  """`value` as it is written after --config.key= on a command line."""
  if isinstance(value, (tuple, list)):
    return shlex.quote('(' + ','.join(_cli(v) for v in value) + (',)' if len(value) == 1 else ')'))
  if isinstance(value, str):
    return shlex.quote(value)
  return str(value)


def _shown(value) -> str:
  return repr(value.item() if isinstance(value, np.generic) else value)


def check_key(key: str, value, default) -> None:
  """Raises UserError unless RULES[key] accepts `value` (None: only for placeholders)."""
  rule = RULES[key]
  if value is None and default is None:
    return
  if value is not None and rule.accepts(value):
    return
  domain = rule.domain if default is not None else f'None or {rule.domain}'
  note = f' ({rule.note})' if rule.note else ''
  example = rule.example if rule.example is not None else default
  raise UserError(
    f'{key}={_shown(value)} must be {domain}{note}; pass e.g. --config.{key}={_cli(example)}.'
  )
