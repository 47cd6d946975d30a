"""Checks every value of a config before anything runs: `validate(config, ...)`.

`RULES` is an explicit table from every key of `config_defaults.get_config()`
to what its value must be (a type and a range or a set of choices); a test
checks that it covers every key of the schema, so a new key needs a rule.
Cross-field checks follow: the model size, the patch size against the image
size, K against E, batch sizes against devices, processes, gradient
accumulation and routing groups, the schedule against the number of steps,
and the transfer / distillation keys.

`validate` is a pure function (no files, no devices: the caller passes the
device and process counts when it knows them). It raises the first problem as
a one-line `UserError` that names the key, the bad value and a fix. None is
accepted exactly where the schema's default is None (placeholders, derived
from other keys); keys that a config lacks (a config.json written before the
key existed) take their defaults.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from vmoe_jax import config_defaults
from vmoe_jax import input_pipeline
from vmoe_jax import optim
from vmoe_jax import schedules
from vmoe_jax.errors import UserError
from vmoe_jax.models import vit
from vmoe_jax.moe import routers

# The routers of model.moe.router: the router table of vmoe_jax.moe.routers.
ROUTER_NAMES = tuple(routers.ROUTERS)

CLASSIFIERS = ('token', 'gap', 'map')
DTYPES = ('float32', 'bfloat16', 'float16')
DISPATCHES = ('indices', 'einsum')
LOAD_THRESHOLDS = ('vmoe', 'shazeer')
ON_NONFINITE = ('stop', 'skip')
ON_CORRUPT = ('fail', 'previous')
# The forms of model.moe.layers that vit.moe_layer_indices reads.
LAYERS_SYNTAX = r'none|all|every_\d+|last_\d+|\d+(,\d+)*|'
SIZE_KEYS = ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size')

# Side of the (square) images of datasets whose size is known without reading
# them; TFDS datasets take input.image_size when it is set.
IMAGE_SIDES = {'digits': 8, 'fashion_mnist': 28, 'cifar10': 32, 'cifar100': 32}
# Examples per split of the in-memory datasets (for checking split slices).
IN_MEMORY_SPLITS = {
  'digits': {'train': 1438, 'test': 359},
  'fashion_mnist': {'train': 60_000, 'test': 10_000},
}


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
  """The forms of `vit.moe_layer_indices` (the blocks are checked against the depth later)."""
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
  'model.classifier': choice(CLASSIFIERS),
  'model.stem': choice(vit.STEMS),
  'model.dropout': number(ge=0, lt=1),
  'model.attention_dropout': number(ge=0, lt=1),
  'model.dtype': choice(DTYPES),
  # Mixture of experts.
  'model.moe.num_experts': integer(ge=0, note='0: a dense ViT'),
  'model.moe.layers': Rule(
    _layers_syntax, "'all', 'every_N', 'last_N', 'none' or block indices such as '1,3,5'"
  ),
  'model.moe.router': choice(ROUTER_NAMES),
  'model.moe.num_selected': integer(ge=1, note='K, the experts per token'),
  'model.moe.capacity_factor': number(gt=0),
  'model.moe.eval_capacity_factor': number(gt=0),
  'model.moe.capacity_multiple': integer(ge=1, note='None: 4 on GPU/TPU, 1 on CPU', example=4),
  'model.moe.batch_priority': boolean(),
  'model.moe.eval_batch_priority': boolean('None: as model.moe.batch_priority', True),
  'model.moe.renormalize': boolean(),
  'model.moe.noise_std': number(ge=0, note='in units of 1/num_experts'),
  'model.moe.group_size': integer(ge=0, note='images per routing group; 0: all of a device'),
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
  'input.num_eval_examples': integer(ge=1, also=(-1,), note='-1: all'),
  # Optimizer.
  'optimizer.name': choice(optim.OPTIMIZERS),
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
  'train.on_corrupt': choice(ON_CORRUPT),
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


def _check_key(key: str, value, default) -> None:
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


# --------------------------------------------------------------------------- cross-field checks


def _flatten(config, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def model_size(v: Mapping[str, Any]) -> dict[str, int]:
  """Width, depth, num_heads, mlp_dim and patch_size of the flat config `v`."""
  size = vit.decode_variant(v['model.variant']) if v['model.variant'] else {}
  size.update({k: v[f'model.{k}'] for k in SIZE_KEYS if v[f'model.{k}'] is not None})
  missing = [f'model.{k}' for k in SIZE_KEYS if k not in size]
  if missing:
    raise UserError(
      f'the model size is incomplete ({", ".join(missing)} unset); set --config.model.variant '
      f'(e.g. S/16) or {", ".join("--config." + k for k in missing)}.'
    )
  width, heads = size['width'], size['num_heads']
  if width % heads:
    divisors = [d for d in range(1, width + 1) if width % d == 0]
    closest = min(divisors, key=lambda d: (abs(d - heads), d))
    raise UserError(
      f'model.width={width} is not divisible by model.num_heads={heads}; use a head count that '
      f'divides {width}, e.g. --config.model.num_heads={closest}.'
    )
  return size


def _check_model(v, size) -> None:
  """MoE layers within the depth; the conv stem's patch size."""
  spec, depth = v['model.moe.layers'], size['depth']
  try:
    layers = vit.moe_layer_indices(spec, depth)
  except UserError:
    raise UserError(
      f'model.moe.layers={spec!r} names blocks outside the {depth} blocks of the model '
      f"(0..{depth - 1}); use indices below {depth} or 'all', 'every_N', 'last_N'."
    ) from None
  if v['model.moe.num_experts'] > 0 and not layers:
    raise UserError(
      f'model.moe.layers={spec!r} puts no MoE layer in the {depth} blocks although '
      f'model.moe.num_experts={v["model.moe.num_experts"]}; use e.g. '
      '--config.model.moe.layers=every_2, or --config.model.moe.num_experts=0 for a dense ViT.'
    )
  patch = size['patch_size']
  if v['model.stem'] == 'conv' and (patch < 2 or patch & (patch - 1)):
    raise UserError(
      f"model.patch_size={patch} with model.stem='conv' must be a power of 2 (2, 4, 8, 16); "
      'change --config.model.patch_size or use --config.model.stem=patch.'
    )


def image_side(v) -> int | None:
  """Side of the square input images, when known without reading the data."""
  dataset = v['input.dataset'].split(':')[0]
  if dataset not in input_pipeline.IN_MEMORY and v['input.image_size'] is not None:
    return v['input.image_size']
  return IMAGE_SIDES.get(dataset)


def _check_input(v, size) -> None:
  """Image size and patch size; split names and slices of in-memory datasets."""
  dataset = v['input.dataset']
  if dataset in input_pipeline.IN_MEMORY and v['input.image_size'] is not None:
    raise UserError(
      f'input.image_size={v["input.image_size"]} does not apply to {dataset} (its images keep '
      f'their {IMAGE_SIDES[dataset]}x{IMAGE_SIDES[dataset]} pixels); remove the override.'
    )
  side, patch = image_side(v), size['patch_size']
  if side is not None and patch > side:
    where = f' (from model.variant={v["model.variant"]!r})' if v['model.patch_size'] is None else ''
    suggestion = next(p for p in (16, 8, 4, 2, 1) if side % p == 0 and (p < side or p == 1))
    raise UserError(
      f'model.patch_size={patch}{where} is larger than the {side}x{side} images of {dataset}; '
      f'use a patch size of at most {side}, e.g. --config.model.patch_size={suggestion}.'
    )
  if dataset in IN_MEMORY_SPLITS:
    splits = {name: (range(n), range(n)) for name, n in IN_MEMORY_SPLITS[dataset].items()}
    for key in ('input.train_split', 'input.test_split'):
      try:
        input_pipeline.slice_split(v[key], splits)
      except UserError as e:
        raise UserError(f'{key}: {e}') from None


def _check_moe(v) -> None:
  """K against E; losses and options that would do nothing."""
  experts, selected = v['model.moe.num_experts'], v['model.moe.num_selected']
  if experts == 0:
    return
  if selected > experts:
    raise UserError(
      f'model.moe.num_selected={selected} exceeds model.moe.num_experts={experts}; choose K '
      f'between 1 and {experts} (--config.model.moe.num_selected) or add experts.'
    )
  if v['model.moe.load_weight'] > 0 and v['model.moe.noise_std'] == 0:
    raise UserError(
      f'model.moe.load_weight={v["model.moe.load_weight"]} needs router noise (the load loss '
      'is 0 without it); set --config.model.moe.noise_std=1.0 or '
      '--config.model.moe.load_weight=0.'
    )
  slots, router = v['model.moe.slots_per_expert'], v['model.moe.router']
  if slots is not None and router != 'soft':
    raise UserError(
      f'model.moe.slots_per_expert={slots} applies to the soft router only, not '
      f'model.moe.router={router!r}; remove it or use --config.model.moe.router=soft.'
    )


def _check_processes(v, process_count: int) -> None:
  for key in ('input.batch_size', 'input.eval_batch_size'):
    if v[key] % process_count:
      raise UserError(
        f'{key}={v[key]} does not split over {process_count} processes; use a multiple of '
        f'{process_count} that is also a multiple of the device count (--config.{key}).'
      )


def _check_devices(v, num_devices: int) -> None:
  """Batches over the devices, routing groups within a device, the expert mesh axis."""
  batch, accum = v['input.batch_size'], v['train.grad_accum_steps']
  for key in ('input.batch_size', 'input.eval_batch_size'):
    if v[key] % num_devices:
      raise UserError(
        f'{key}={v[key]} does not split over the {num_devices} devices; use a multiple of '
        f'{num_devices} (--config.{key}).'
      )
  micro = batch // accum
  if micro % num_devices:
    raise UserError(
      f'input.batch_size={batch} / train.grad_accum_steps={accum} = {micro} images per '
      f'micro-batch do not split over the {num_devices} devices; use fewer accumulation steps '
      '(--config.train.grad_accum_steps).'
    )
  group, experts = v['model.moe.group_size'], v['model.moe.num_experts']
  if experts > 0 and group > 0:
    for what, size in (
      ('input.batch_size / train.grad_accum_steps', micro),
      ('input.eval_batch_size', v['input.eval_batch_size']),
    ):
      per_device = size // num_devices
      if per_device % group:
        raise UserError(
          f'model.moe.group_size={group} does not divide the {per_device} images per device of '
          f'{what}={size} on {num_devices} devices; use a divisor of {per_device} '
          '(--config.model.moe.group_size), or 0 for all images of a device.'
        )
  expert = v['mesh.expert']
  if expert != -1 and num_devices % expert:
    raise UserError(
      f'mesh.expert={expert} does not divide the {num_devices} devices; use a divisor of '
      f'{num_devices} (--config.mesh.expert), or -1 to choose.'
    )
  if expert != -1 and experts > 0 and experts % expert:
    raise UserError(
      f'model.moe.num_experts={experts} is not a multiple of mesh.expert={expert}; use a '
      f'multiple of {expert} experts or a --config.mesh.expert that divides {experts}.'
    )


def _check_batches(v, num_devices: int | None, process_count: int) -> None:
  batch, accum = v['input.batch_size'], v['train.grad_accum_steps']
  if batch % accum:
    raise UserError(
      f'train.grad_accum_steps={accum} does not divide input.batch_size={batch} into '
      'equal micro-batches; use a divisor of the batch size (--config.train.grad_accum_steps).'
    )
  _check_processes(v, process_count)
  if num_devices is not None:
    _check_devices(v, num_devices)


def _ignored(key: str, value, by: str, fix: str) -> UserError:
  return UserError(f'{key}={value} is ignored because {by}; {fix}.')


def _check_schedule(v, defaults) -> None:
  """The run's length, values that another key overrides, decay parameters."""
  steps, epochs = v['train.num_steps'], v['train.num_epochs']
  if epochs == 0 and steps <= 0:
    raise UserError(
      f'train.num_steps={steps} must be > 0 when train.num_epochs=0; pass e.g. '
      '--config.train.num_steps=1000 or set --config.train.num_epochs.'
    )
  if epochs > 0 and steps != defaults['train.num_steps']:
    raise _ignored(
      'train.num_steps',
      steps,
      f'train.num_epochs={epochs:g} sets the length of the run',
      f'pass --config.train.num_epochs=0 as well to train {steps} steps',
    )
  for what in ('warmup', 'cooldown'):
    key, epoch_key = f'schedule.{what}_steps', f'train.{what}_epochs'
    if v[epoch_key] > 0 and v[key] != defaults[key]:
      raise _ignored(
        key,
        v[key],
        f'{epoch_key}={v[epoch_key]:g} takes over',
        f'pass --config.{epoch_key}=0 as well to count the {what} in steps',
      )
  decay = v['schedule.decay']
  if decay == 'rsqrt' and v['schedule.timescale'] <= 0:
    raise UserError(
      f"schedule.timescale={v['schedule.timescale']} must be > 0 for schedule.decay='rsqrt'; "
      'pass e.g. --config.schedule.timescale=10000.'
    )
  peak, end = v['optimizer.learning_rate'], v['schedule.end_value']
  if decay in ('cosine', 'linear') and end > peak:
    raise UserError(
      f'schedule.end_value={end} exceeds the peak optimizer.learning_rate={peak}, so the '
      f'{decay} decay would rise; use an end value below {peak} (--config.schedule.end_value).'
    )
  start = v['profile.start_step']
  if epochs == 0 and start >= steps:
    raise UserError(
      f'profile.start_step={start} is never reached in train.num_steps={steps} steps; use a '
      f'step below {steps} (--config.profile.start_step), or -1 for no profile.'
    )


def _check_transfer(v) -> None:
  """init_from / init.* / distill.*, and few-shot settings that cannot choose an L2."""
  if v['init.step'] != -1 and not v['init_from']:
    raise UserError(
      f"init.step={v['init.step']} applies to init_from, which is ''; set "
      '--config.init_from=DIR or remove the init.step override.'
    )
  if v['distill.init_from_teacher'] and not v['distill.teacher']:
    raise UserError(
      "distill.init_from_teacher=True needs a teacher, but distill.teacher=''; set "
      '--config.distill.teacher=DIR (a trained run) or drop init_from_teacher.'
    )
  if v['distill.init_from_teacher'] and v['init_from']:
    raise UserError(
      f'init_from={v["init_from"]!r} and distill.init_from_teacher=True both choose the '
      'starting parameters; keep one of them.'
    )
  if v['fewshot.val_per_class'] == 0 and len(v['fewshot.l2_regs']) > 1:
    raise UserError(
      'fewshot.val_per_class=0 leaves no held-out images to choose among the '
      f'{len(v["fewshot.l2_regs"])} fewshot.l2_regs; pass e.g. --config.fewshot.val_per_class=20 '
      'or a single L2 value.'
    )


# --------------------------------------------------------------------------- entry point


def validate(config, num_devices: int | None = None, process_count: int = 1) -> None:
  """Raises a one-line UserError for the first nonsense value of `config`.

  Args:
    config: a ConfigDict (or nested mapping) of the schema in config_defaults.
    num_devices: all devices of the run, when known; the batch, group and
      mesh checks against the devices are skipped when None.
    process_count: processes of the run (global batches split over them).
  """
  if num_devices is not None and num_devices < 1 or process_count < 1:
    raise ValueError(f'num_devices={num_devices}, process_count={process_count}: need >= 1.')
  defaults = _flatten(config_defaults.get_config())
  given = _flatten(config)
  for key in given:
    if key not in defaults:
      raise UserError(config_defaults.unknown_key_message(key, list(defaults)))
  v = {**defaults, **given}
  for key in RULES:
    _check_key(key, v[key], defaults[key])
  size = model_size(v)
  _check_model(v, size)
  _check_input(v, size)
  _check_moe(v)
  _check_batches(v, num_devices, process_count)
  _check_schedule(v, defaults)
  _check_transfer(v)
