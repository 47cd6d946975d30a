"""Checks every value of a config before anything runs: `validate(config, ...)`.

`vmoe_jax.schema.rules.RULES` is an explicit table from every key of
`defaults.get_config()` to what its value must be (a type and a range
or a set of choices); a test checks that it covers every key of the schema,
so a new key needs a rule.
Cross-field checks follow: the model size, the patch size against the image
size, K against E, Soft MoE slots and dropless blocks against the tokens
there are, batch sizes against devices, processes, gradient
accumulation and routing groups, the schedule against the number of steps,
and the transfer / distillation keys.

The config is checked once on its way in: `python -m vmoe_jax.main` runs
`validate(config)` (every check that needs no device) before anything is
written or processes wait for each other, and `train.train_and_evaluate`
runs `validate_devices` once it knows the devices and processes of the run.
The models, the MoE spec and the layers trust what they are given. The
checks that lower modules also need are theirs, called from here, so that
each message has one source: the model size (`models.factory.model_size`),
the conv stem (`models.vit`), the expert mesh axis
(`runtime.sharding.check_expert_axis`), split slices
(`data.input_pipeline.slice_split`), batches over processes
(`errors.check_process_split`).

`validate` is a pure function (no files, no devices: the caller passes the
device and process counts when it knows them). It raises the first problem as
a one-line `UserError` that names the key, the bad value and a fix. None is
accepted exactly where the schema's default is None (placeholders, derived
from other keys); keys that a config lacks (a config.json written before the
key existed) take their defaults.
"""

from __future__ import annotations

from typing import Any

from vmoe_jax.data import input_pipeline
from vmoe_jax.data.input_pipeline import IN_MEMORY_SPLITS
from vmoe_jax.errors import UserError
from vmoe_jax.errors import check_process_split
from vmoe_jax.errors import check_split
from vmoe_jax.models import factory
from vmoe_jax.models import vit
from vmoe_jax.moe import routers
from vmoe_jax.moe import spec as spec_lib
from vmoe_jax.runtime import sharding
from vmoe_jax.schema import defaults
from vmoe_jax.schema.rules import IMAGE_SIDES
from vmoe_jax.schema.rules import RULES
from vmoe_jax.schema.rules import check_key

# --------------------------------------------------------------------------- cross-field checks


def _model_size(values) -> dict[str, int]:
  """`factory.model_size` of the flat config `values`."""
  return factory.model_size(
    {key: values[f'model.{key}'] for key in ('variant', *factory.SIZE_KEYS)}
  )


def _check_model(values, size) -> None:
  """MoE layers within the depth; the conv stem's patch size (`vit.conv_stem_channels`)."""
  spec, depth = values['model.moe.layers'], size['depth']
  try:
    layers = spec_lib.moe_layer_indices(spec, depth)
  except ValueError:
    raise UserError(
      f'model.moe.layers={spec!r} names blocks outside the {depth} blocks of the model '
      f"(0..{depth - 1}); use indices below {depth} or 'all', 'every_N', 'last_N'."
    ) from None
  if values['model.moe.num_experts'] > 0 and not layers:
    raise UserError(
      f'model.moe.layers={spec!r} puts no MoE layer in the {depth} blocks although '
      f'model.moe.num_experts={values["model.moe.num_experts"]}; use e.g. '
      '--config.model.moe.layers=every_2, or --config.model.moe.num_experts=0 for a dense ViT.'
    )
  patch = size['patch_size']
  extra_convs = values['model.stem_extra_convs'].replace(' ', '')
  if values['model.stem'] == 'conv':
    vit.stem_extra_convs_per_stage(extra_convs, len(vit.conv_stem_channels(size['width'], patch)))
  elif any(int(c) for c in extra_convs.split(',')):
    raise UserError(
      f"model.stem_extra_convs={values['model.stem_extra_convs']} needs model.stem='conv' "
      f'(got {values["model.stem"]!r}); add --config.model.stem=conv or drop the extra '
      'convolutions.'
    )


def image_side(values) -> int | None:
  """Side of the square input images, when known without reading the data."""
  dataset = values['input.dataset'].split(':')[0]
  if dataset not in input_pipeline.IN_MEMORY and values['input.image_size'] is not None:
    return values['input.image_size']
  return IMAGE_SIDES.get(dataset)


def _check_input(values, size) -> None:
  """Image size and patch size; split names and slices of in-memory datasets."""
  dataset = values['input.dataset']
  if dataset in input_pipeline.IN_MEMORY and values['input.image_size'] is not None:
    raise UserError(
      f'input.image_size={values["input.image_size"]} does not apply to {dataset} (its images keep '
      f'their {IMAGE_SIDES[dataset]}x{IMAGE_SIDES[dataset]} pixels); remove the override.'
    )
  side, patch = image_side(values), size['patch_size']
  if side is not None and patch > side:
    where = (
      f' (from model.variant={values["model.variant"]!r})'
      if values['model.patch_size'] is None
      else ''
    )
    suggestion = next(p for p in (16, 8, 4, 2, 1) if side % p == 0 and (p < side or p == 1))
    raise UserError(
      f'model.patch_size={patch}{where} is larger than the {side}x{side} images of {dataset}; '
      f'use a patch size of at most {side}, e.g. --config.model.patch_size={suggestion}.'
    )
  if values.get('input.random_erase', 0) and dataset not in IN_MEMORY_SPLITS:
    raise UserError(
      f'input.random_erase={values["input.random_erase"]} applies to the in-memory datasets '
      f'{sorted(IN_MEMORY_SPLITS)}, not {dataset!r}; remove it (--config.input.random_erase=0).'
    )
  if values.get('input.train_per_class', 0) and dataset not in IN_MEMORY_SPLITS:
    raise UserError(
      f'input.train_per_class={values["input.train_per_class"]} applies to the in-memory datasets '
      f'{sorted(IN_MEMORY_SPLITS)}, not {dataset!r}; slice the split instead '
      "(--config.input.train_split='train[:1000]')."
    )
  if dataset in IN_MEMORY_SPLITS:
    splits = {name: (range(n), range(n)) for name, n in IN_MEMORY_SPLITS[dataset].items()}
    for key in ('input.train_split', 'input.test_split'):
      try:
        input_pipeline.slice_split(values[key], splits)
      except UserError as e:
        raise UserError(f'{key}: {e}') from None


def _check_moe(values) -> None:
  """K against E; losses and options that would do nothing."""
  experts, selected = values['model.moe.num_experts'], values['model.moe.num_selected']
  if experts == 0:
    return
  if selected > experts:
    raise UserError(
      f'model.moe.num_selected={selected} exceeds model.moe.num_experts={experts}; choose K '
      f'between 1 and {experts} (--config.model.moe.num_selected) or add experts.'
    )
  if values['model.moe.load_weight'] > 0 and values['model.moe.noise_std'] == 0:
    raise UserError(
      f'model.moe.load_weight={values["model.moe.load_weight"]} needs router noise (the load loss '
      'is 0 without it); set --config.model.moe.noise_std=1.0 or '
      '--config.model.moe.load_weight=0.'
    )
  slots, router = values['model.moe.slots_per_expert'], values['model.moe.router']
  if selected != 1 and router not in routers.SELECTS_K:
    raise UserError(
      f'model.moe.num_selected={selected} does not apply to model.moe.router={router!r} '
      '(its experts per token follow from model.moe.capacity_factor); remove it '
      '(--config.model.moe.num_selected=1) or use a top-k router (topk, image_topk, dropless).'
    )
  if slots is not None and router != 'soft':
    raise UserError(
      f'model.moe.slots_per_expert={slots} applies to the soft router only, not '
      f'model.moe.router={router!r}; remove it or use --config.model.moe.router=soft.'
    )
  if router == 'soft' and values['model.moe.group_size'] == 0 and slots is None:
    raise UserError(
      'model.moe.group_size=0 does not fix the Soft MoE slot count (it would follow the device '
      'batch); set model.moe.group_size > 0 or model.moe.slots_per_expert.'
    )


def tokens_per_image(values, size) -> int | None:
  """T, the tokens of an image (patches, plus the class token), when the image size is known."""
  side = image_side(values)
  if side is None:
    return None
  patch = size['patch_size']
  conv = values['model.stem'] == 'conv'
  rows = -(-side // patch) if conv else side // patch  # SAME convolutions round up.
  return rows * rows + (1 if values['model.classifier'] == 'token' else 0)


def _images_per_device(values, num_devices: int | None) -> int | None:
  """The most images a device holds in one step (training micro-batch or evaluation)."""
  if num_devices is None:
    return None
  micro = values['input.batch_size'] // values['train.grad_accum_steps']
  return max(micro, values['input.eval_batch_size']) // num_devices


def _check_moe_sizes(values, size, num_devices: int | None) -> None:
  """Soft MoE slots and dropless blocks that cannot be right: more than there are tokens.

  Such sizes only make buffers of padding, often larger than any memory
  (146 GB for 100,000 slots per expert on digits); see `vmoe_jax.models.memory` for
  the estimate of what fits.
  """
  experts, router = values['model.moe.num_experts'], values['model.moe.router']
  tokens = tokens_per_image(values, size)
  if experts == 0 or tokens is None or router not in ('soft', 'dropless'):
    return
  group, per_device = values['model.moe.group_size'], _images_per_device(values, num_devices)
  if group is None:
    group = spec_lib.default_group_size(router)
  if router == 'soft':
    images = group or per_device
    if images is None:
      return
    where = f'model.moe.group_size={group} images' if group else f'{images} images per device'
    group_tokens = images * tokens
    slots, factor = values['model.moe.slots_per_expert'], values['model.moe.capacity_factor']
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
  block, selected = values['model.moe.block_size'], values['model.moe.num_selected']
  rows = per_device * tokens * selected * num_devices  # What a device may receive from all.
  source = f', from each of {num_devices} devices' if num_devices > 1 else ''
  if block > rows:
    raise UserError(
      f'model.moe.block_size={block} exceeds the {rows} (token, expert) rows that a device can '
      f'receive in a step ({per_device} images of {tokens} tokens, K={selected}{source}), so '
      f'its blocks would be padding; use at most {rows}, e.g. --config.model.moe.block_size=128.'
    )


def _check_processes(values, process_count: int) -> None:
  for key in ('input.batch_size', 'input.eval_batch_size'):
    check_process_split(key, values[key], process_count)


def _check_devices(values, num_devices: int) -> None:
  """Batches over the devices, routing groups within a device, the expert mesh axis."""
  batch, accum = values['input.batch_size'], values['train.grad_accum_steps']
  for key in ('input.batch_size', 'input.eval_batch_size'):
    check_split(
      values[key],
      num_devices,
      f'{key}={values[key]}',
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
  group, experts = values['model.moe.group_size'], values['model.moe.num_experts']
  if group is None:
    group = spec_lib.default_group_size(values['model.moe.router'])
  if experts > 0 and group > 0:
    for what, size in (
      ('input.batch_size / train.grad_accum_steps', micro),
      ('input.eval_batch_size', values['input.eval_batch_size']),
    ):
      per_device = size // num_devices
      if per_device % group:
        raise UserError(
          f'model.moe.group_size={group} does not divide the {per_device} images per device of '
          f'{what}={size} on {num_devices} devices; use a divisor of {per_device} '
          '(--config.model.moe.group_size), or 0 for all images of a device.'
        )
  sharding.check_expert_axis(values['mesh.expert'], num_devices, experts)


def _check_batches(values, num_devices: int | None, process_count: int) -> None:
  batch, accum = values['input.batch_size'], values['train.grad_accum_steps']
  if batch % accum:
    raise UserError(
      f'train.grad_accum_steps={accum} does not divide input.batch_size={batch} into '
      'equal micro-batches; use a divisor of the batch size (--config.train.grad_accum_steps).'
    )
  _check_processes(values, process_count)
  if num_devices is not None:
    _check_devices(values, num_devices)


def _ignored(key: str, value, by: str, fix: str) -> UserError:
  return UserError(f'{key}={value} is ignored because {by}; {fix}.')


def _check_schedule(values, default_values) -> None:
  """The run's length, values that another key overrides, decay parameters."""
  steps, epochs = values['train.num_steps'], values['train.num_epochs']
  if epochs == 0 and steps <= 0:
    raise UserError(
      f'train.num_steps={steps} must be > 0 when train.num_epochs=0; pass e.g. '
      '--config.train.num_steps=1000 or set --config.train.num_epochs.'
    )
  if epochs > 0 and steps != default_values['train.num_steps']:
    raise _ignored(
      'train.num_steps',
      steps,
      f'train.num_epochs={epochs:g} sets the length of the run',
      f'pass --config.train.num_epochs=0 as well to train {steps} steps',
    )
  for what in ('warmup', 'cooldown'):
    key, epoch_key = f'schedule.{what}_steps', f'train.{what}_epochs'
    if values[epoch_key] > 0 and values[key] != default_values[key]:
      raise _ignored(
        key,
        values[key],
        f'{epoch_key}={values[epoch_key]:g} takes over',
        f'pass --config.{epoch_key}=0 as well to count the {what} in steps',
      )
  decay = values['schedule.decay']
  if decay == 'rsqrt' and values['schedule.timescale'] <= 0:
    raise UserError(
      f"schedule.timescale={values['schedule.timescale']} must be > 0 for schedule.decay='rsqrt'; "
      'pass e.g. --config.schedule.timescale=10000.'
    )
  peak, end = values['optimizer.learning_rate'], values['schedule.end_value']
  if decay in ('cosine', 'linear') and end > peak:
    raise UserError(
      f'schedule.end_value={end} exceeds the peak optimizer.learning_rate={peak}, so the '
      f'{decay} decay would rise; use an end value below {peak} (--config.schedule.end_value).'
    )
  start = values['profile.start_step']
  if epochs == 0 and start >= steps:
    raise UserError(
      f'profile.start_step={start} is never reached in train.num_steps={steps} steps; use a '
      f'step below {steps} (--config.profile.start_step), or -1 for no profile.'
    )


def _check_transfer(values) -> None:
  """init_from / init.* / distill.*, and few-shot settings that cannot choose an L2."""
  if values['init.step'] != -1 and not values['init_from']:
    raise UserError(
      f"init.step={values['init.step']} applies to init_from, which is ''; set "
      '--config.init_from=DIR or remove the init.step override.'
    )
  if values['distill.init_from_teacher'] and not values['distill.teacher']:
    raise UserError(
      "distill.init_from_teacher=True needs a teacher, but distill.teacher=''; set "
      '--config.distill.teacher=DIR (a trained run) or drop init_from_teacher.'
    )
  if values['distill.init_from_teacher'] and values['init_from']:
    raise UserError(
      f'init_from={values["init_from"]!r} and distill.init_from_teacher=True both choose the '
      'starting parameters; keep one of them.'
    )
  if values['fewshot.val_per_class'] == 0 and len(values['fewshot.l2_regs']) > 1:
    raise UserError(
      'fewshot.val_per_class=0 leaves no held-out images to choose among the '
      f'{len(values["fewshot.l2_regs"])} fewshot.l2_regs; pass e.g. '
      '--config.fewshot.val_per_class=20 or a single L2 value.'
    )


# --------------------------------------------------------------------------- entry points


def _flat_values(config) -> tuple[dict[str, Any], dict[str, Any]]:
  """(the flat values of `config` over the defaults, the flat defaults)."""
  default_values = defaults.flatten(defaults.get_config())
  return {**default_values, **defaults.flatten(config)}, default_values


def validate(config, num_devices: int | None = None, process_count: int = 1) -> None:
  """Raises a one-line UserError for the first nonsense value of `config`.

  Args:
    config: a ConfigDict (or nested mapping) of the schema in `vmoe_jax.schema.defaults`.
    num_devices: all devices of the run, when known; the batch, group and
      mesh checks against the devices are skipped when None.
    process_count: processes of the run (global batches split over them).
  """
  if num_devices is not None and num_devices < 1 or process_count < 1:
    raise ValueError(f'num_devices={num_devices}, process_count={process_count}: need >= 1.')
  defaults.check_keys(config)
  values, default_values = _flat_values(config)
  for key in RULES:
    check_key(key, values[key], default_values[key])
  size = _model_size(values)
  _check_model(values, size)
  _check_input(values, size)
  _check_moe(values)
  _check_moe_sizes(values, size, num_devices)
  _check_batches(values, num_devices, process_count)
  _check_schedule(values, default_values)
  _check_transfer(values)


def validate_devices(config, num_devices: int, process_count: int) -> None:
  """The checks of `validate` against the devices and processes of the run, and those only.

  For a config that `validate(config)` has passed (the entry point's check),
  once the run knows its devices: batches over processes and devices,
  micro-batches, routing groups and the expert mesh axis.
  """
  values, _ = _flat_values(config)
  _check_processes(values, process_count)
  _check_devices(values, num_devices)
  _check_moe_sizes(values, _model_size(values), num_devices)
