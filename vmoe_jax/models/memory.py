"""An estimate of a train step's memory from the shapes, checked before compiling.

`check(run)` refuses, in one line, a run whose train or evaluation step
clearly cannot fit: the estimate of `step_bytes` per device against the
memory of the devices (the host's physical memory for CPU devices, which
share it; `bytes_limit` of an accelerator). Without it such a run compiles
for minutes and then fails with an out-of-memory traceback from XLA (e.g.
Soft MoE with 100,000 slots per expert asks for 146 GB).

The estimate counts the largest arrays only, so it is a lower bound of what
XLA allocates, never a prediction of it:
  * the state on each device (parameters and optimizer state after
    sharding; experts are split over the expert axis, the rest replicated)
    and one gradient of the parameters;
  * the activations kept for the backward pass, per block: the attention
    inputs, outputs and scores (B_l, heads, T, T), the MLP's hidden layer;
  * per MoE layer the router's buffers at the training capacity: the
    dispatched tokens and the expert hidden layer over all buffer rows
    (B_l images times the rows per image of `flops.moe_layer_work`), Soft
    MoE's dispatch and combine weights (G, S, E * P), the one-hot tensors
    (G, S, E, C) of `dispatch='einsum'`, dropless's block-padded rows;
  * the evaluation step at its batch and capacity (forward only, one layer
    at a time).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax

from vmoe_jax.errors import UserError
from vmoe_jax.models import flops
from vmoe_jax.storage.integrity import itemsize


@dataclasses.dataclass
class Estimate:
  """Bytes per device of a train (or evaluation) step, by part."""

  state: int = 0
  activations: int = 0
  moe: int = 0  # Of `activations`: the MoE layers' buffers.
  moe_key: str = ''  # The setting that sizes the largest MoE buffer.
  what: str = 'train step'

  @property
  def total(self) -> int:
    return self.state + self.activations


def state_bytes_per_device(abstract_state: Any) -> int:
  """Bytes of the state on one device: each array's shard (all of it when replicated)."""
  total = 0
  for leaf in jax.tree.leaves(abstract_state):
    shape = leaf.shape
    sharding = getattr(leaf, 'sharding', None)
    if sharding is not None and shape:
      shape = sharding.shard_shape(shape)
    total += int(math.prod(shape)) * itemsize(leaf.dtype)
  return total


def _tokens(model, image_shape) -> int:
  patches = (image_shape[0] // model.patch_size) * (image_shape[1] // model.patch_size)
  return patches + (1 if model.classifier == 'token' else 0)


def _moe_key(spec, train: bool) -> str:
  if spec.router == 'soft':
    return 'model.moe.slots_per_expert' if spec.slots_per_expert else 'model.moe.capacity_factor'
  if spec.router == 'dropless':
    return 'model.moe.block_size'
  return 'model.moe.capacity_factor' if train else 'model.moe.eval_capacity_factor'


def _moe_layer_bytes(spec, model, tokens: int, images: int, shards: int, train: bool) -> int:
  """The buffers of one MoE layer on a device with `images` images."""
  act = itemsize(model.dtype)
  width, hidden = model.width, spec.mlp_dim
  per_group = spec.group_size or images
  if spec.router == 'dropless':
    assignments = images * tokens * spec.num_selected
    block = spec.block_size
    rows = block * (math.ceil(shards * assignments / block) + spec.num_experts)
    exchange = (shards * assignments * width * act) if shards > 1 else 0
    return rows * (2 * width + 2 * hidden) * act + exchange
  factor = spec.capacity_factor if train else spec.eval_capacity_factor
  _, mixing, rows_per_image = flops.moe_layer_work(spec, tokens, per_group, factor)
  rows = rows_per_image * images
  total = rows * (2 * width + 2 * hidden) * act  # Dispatched rows, hidden (pre/post GELU), out.
  total += mixing * images * 4 * 2  # Soft MoE: dispatch and combine weights, float32.
  if spec.dispatch == 'einsum':  # One-hot (G, S, E, C) dispatch and combine tensors.
    total += tokens * rows * 4 * 2
  return int(total)


def step_bytes(model, abstract_state, image_shape, images: int, shards: int, train=True):
  """The `Estimate` of one device's step with `images` images (see the module docstring)."""
  tokens = _tokens(model, image_shape)
  act = itemsize(model.dtype)
  width, heads = model.width, model.num_heads
  spec = model.moe
  estimate = Estimate(what='train step' if train else 'evaluation step')
  state = state_bytes_per_device(abstract_state)
  params = state_bytes_per_device(abstract_state.params)
  estimate.state = state + params if train else params  # A gradient of the params.
  blocks = []  # (bytes of the block, of which MoE buffers)
  for block in range(model.depth):
    attention = images * tokens * 6 * width * act + images * heads * tokens * tokens * 4 * 2
    if spec is not None and block in spec.layers:
      moe = _moe_layer_bytes(spec, model, tokens, images, shards, train)
      estimate.moe_key = _moe_key(spec, train)
      blocks.append((attention + moe, moe))
    else:
      blocks.append((attention + images * tokens * 2 * model.mlp_dim * act, 0))
  if train:  # Every block's activations are kept for the backward pass.
    estimate.activations = int(sum(b for b, _ in blocks))
    estimate.moe = int(sum(m for _, m in blocks))
  elif blocks:  # One block at a time.
    estimate.activations, estimate.moe = map(int, max(blocks))
  return estimate


def device_memory(devices) -> tuple[int, str] | None:
  """(bytes per device, what) of the memory the devices' arrays live in, if known.

  CPU devices share the host's physical memory (`os.sysconf`), so each gets
  its share; an accelerator reports its own `bytes_limit`.
  """
  devices = list(devices)
  if not devices:
    return None
  if devices[0].platform == 'cpu':
    try:
      host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
      return None
    if len(devices) == 1:
      return host, f'the {_gib(host)} of host memory'
    return host // len(devices), f'{_gib(host)} of host memory shared by {len(devices)} CPU devices'
  try:
    limit = min(int(d.memory_stats()['bytes_limit']) for d in devices)
  except (KeyError, TypeError, AttributeError, RuntimeError, NotImplementedError):
    return None
  return limit, f'the {_gib(limit)} of memory of a {devices[0].device_kind}'


def _gib(count: float) -> str:
  return f'{count / 2**30:.1f} GiB'


def check(run) -> None:
  """Refuses (one-line UserError) a run whose step clearly cannot fit in memory."""
  config, mesh = run.config, run.mesh
  memory = device_memory(mesh.local_devices)
  if memory is None:
    return
  available, where = memory
  num_devices = mesh.size
  shards = mesh.shape.get('expert', 1)
  micro = config.input.batch_size // config.train.grad_accum_steps
  image_shape = run.dataset.image_shape
  estimates = [
    step_bytes(run.model, run.abstract_state, image_shape, micro // num_devices, shards),
    step_bytes(
      run.model,
      run.abstract_state,
      image_shape,
      config.input.eval_batch_size // num_devices,
      shards,
      train=False,
    ),
  ]
  worst = max(estimates, key=lambda e: e.total)
  if worst.total <= available:
    return
  if worst.moe > worst.total / 2:
    fix = f'lower --config.{worst.moe_key}'
    part = f'MoE buffers {_gib(worst.moe)}, sized by {worst.moe_key}'
  else:
    fix = 'use a smaller batch, model or more devices'
    part = f'parameters, gradients and optimizer state {_gib(worst.state)}'
  raise UserError(
    f'the {worst.what} needs an estimated {_gib(worst.total)} per device ({part}), more than '
    f'{where}; {fix} (the estimate counts the largest arrays only, from their shapes).'
  )
