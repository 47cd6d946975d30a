"""Checks every value of a config before anything runs: `validate(config, ...)`.

`vmoe_jax.validation_rules.RULES` is an explicit table from every key of
`config_defaults.get_config()` to what its value must be (a type and a range
or a set of choices); a test checks that it covers every key of the schema,
so a new key needs a rule.
Cross-field checks follow: the model size, the patch size against the image
size, K against E, Soft MoE slots and dropless blocks against the tokens
there are, batch sizes against devices, processes, gradient
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

from collections.abc import Mapping
from typing import Any

import ml_collections

from vmoe_jax import config_defaults
from vmoe_jax import input_pipeline
from vmoe_jax.errors import UserError
from vmoe_jax.errors import check_process_split
from vmoe_jax.errors import check_split
from vmoe_jax.models import vit
from vmoe_jax.validation_rules import IMAGE_SIDES
from vmoe_jax.validation_rules import IN_MEMORY_SPLITS
from vmoe_jax.validation_rules import RULES
from vmoe_jax.validation_rules import SIZE_KEYS
from vmoe_jax.validation_rules import check_key

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
  extra_convs = v['model.stem_extra_convs'].replace(' ', '')
  if v['model.stem'] == 'conv':
    vit.stem_extra_convs_per_stage(extra_convs, len(vit.conv_stem_channels(size['width'], patch)))
  elif any(int(c) for c in extra_convs.split(',')):
    raise UserError(
      f"model.stem_extra_convs={v['model.stem_extra_convs']} needs model.stem='conv' "
      f'(got {v["model.stem"]!r}); add --config.model.stem=conv or drop the extra convolutions.'
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
  if v.get('input.train_per_class', 0) and dataset not in IN_MEMORY_SPLITS:
    raise UserError(
      f'input.train_per_class={v["input.train_per_class"]} applies to the in-memory datasets '
      f'{sorted(IN_MEMORY_SPLITS)}, not {dataset!r}; slice the split instead '
      "(--config.input.train_split='train[:1000]')."
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


def tokens_per_image(v, size) -> int | None:
  """T, the tokens of an image (patches, plus the class token), when the image size is known."""
  side = image_side(v)
  if side is None:
    return None
  patch = size['patch_size']
  rows = -(-side // patch) if v['model.stem'] == 'conv' else side // patch  # SAME convs round up.
  return rows * rows + (1 if v['model.classifier'] == 'token' else 0)


def _images_per_device(v, num_devices: int | None) -> int | None:
  """The most images a device holds in one step (training micro-batch or evaluation)."""
  if num_devices is None:
    return None
  micro = v['input.batch_size'] // v['train.grad_accum_steps']
  return max(micro, v['input.eval_batch_size']) // num_devices


def _check_moe_sizes(v, size, num_devices: int | None) -> None:
  """Soft MoE slots and dropless blocks that cannot be right: more than there are tokens.

  Such sizes only make buffers of padding, often larger than any memory
  (146 GB for 100,000 slots per expert on digits); see `vmoe_jax.memory` for
  the estimate of what fits.
  """
  experts, router = v['model.moe.num_experts'], v['model.moe.router']
  tokens = tokens_per_image(v, size)
  if experts == 0 or tokens is None or router not in ('soft', 'dropless'):
    return
  group, per_device = v['model.moe.group_size'], _images_per_device(v, num_devices)
  if router == 'soft':
    images = group or per_device
    if images is None:
      return
    where = f'model.moe.group_size={group} images' if group else f'{images} images per device'
    group_tokens = images * tokens
    slots, factor = v['model.moe.slots_per_expert'], v['model.moe.capacity_factor']
    even = max(1, round(group_tokens / experts))
    if slots is not None and slots > group_tokens:
      raise UserError(
        f'model.moe.slots_per_expert={slots} exceeds the {group_tokens} tokens of a routing group '
        f"({where} of {tokens} tokens); a slot is a mix of the group's tokens, so use at most "
        f'{group_tokens} (e.g. --config.model.moe.slots_per_expert={even}, one slot per token '
        f'over the {experts} experts).'
      )
    if slots is None and round(factor * group_tokens / experts) > group_tokens:
      raise UserError(
        f'model.moe.capacity_factor={factor} gives Soft MoE '
        f'{round(factor * group_tokens / experts)} slots per expert, more than the '
        f'{group_tokens} tokens of a routing group ({where} of {tokens} tokens); use a capacity '
        f'factor of at most {experts} (1.0: one slot per token over the experts).'
      )
    return
  if per_device is None:
    return
  block, selected = v['model.moe.block_size'], v['model.moe.num_selected']
  rows = per_device * tokens * selected * num_devices  # What a device may receive from all.
  source = f', from each of {num_devices} devices' if num_devices > 1 else ''
  if block > rows:
    raise UserError(
      f'model.moe.block_size={block} exceeds the {rows} (token, expert) rows that a device can '
      f'receive in a step ({per_device} images of {tokens} tokens, K={selected}{source}), so '
      f'its blocks would be padding; use at most {rows}, e.g. --config.model.moe.block_size=128.'
    )


def _check_processes(v, process_count: int) -> None:
  for key in ('input.batch_size', 'input.eval_batch_size'):
    check_process_split(key, v[key], process_count)


def _check_devices(v, num_devices: int) -> None:
  """Batches over the devices, routing groups within a device, the expert mesh axis."""
  batch, accum = v['input.batch_size'], v['train.grad_accum_steps']
  for key in ('input.batch_size', 'input.eval_batch_size'):
    check_split(
      v[key],
      num_devices,
      f'{key}={v[key]}',
      f'the {num_devices} devices',
      f'use a multiple of {num_devices} (--config.{key}).',
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
    check_key(key, v[key], defaults[key])
  size = model_size(v)
  _check_model(v, size)
  _check_input(v, size)
  _check_moe(v)
  _check_moe_sizes(v, size, num_devices)
  _check_batches(v, num_devices, process_count)
  _check_schedule(v, defaults)
  _check_transfer(v)
