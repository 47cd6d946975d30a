"""Analytic FLOP counts of the ViT / MoE ViT forward pass, per image.

A multiply-add counts as 2 FLOPs; only matmuls are counted (norms, softmax,
GELU and routing bookkeeping are a few percent at these sizes). Training is
taken as 3x the forward pass (forward + two matmuls per matmul backward).

Expert FLOPs can be counted two ways:
  * active: the assignments the router makes (K per token for top-k; what the
    model "uses");
  * buffers: every expert processes its full capacity C per group, padding
    included (what the hardware does): E * C * (4 D H) per group of N images.
"""

from __future__ import annotations

import math

from vmoe_jax.models import vit
from vmoe_jax.moe import routers


def forward_flops(
  model,
  image_shape: tuple[int, int, int],
  *,
  capacity_factor: float | None = None,
  images_per_group: int | None = None,
) -> dict[str, float]:
  """FLOPs of one image through `model` (a `vmoe_jax.models.vit.ViT`), by part.

  Args:
    model: the ViT definition (only its sizes and MoE spec are read).
    image_shape: (H, W, C).
    capacity_factor: None counts active expert FLOPs (the assignments the
      router makes at the training capacity); a value counts the expert
      buffers at that evaluation capacity factor, padding included.
    images_per_group: N, the images of a routing group, when the spec's
      group_size is 0 (all images of a device).

  Per router (MoE layers), assignments per image: top-k, image-level and
  dropless K * T; Expert Choice E * C / N; Soft MoE E * P / N slots, plus
  its dispatch and combine mixing, 2 * 2 * T * E * P * D ('dispatch').
  """
  height, width_px, channels = image_shape
  d, h, p = model.width, model.mlp_dim, model.patch_size
  patches = (height // p) * (width_px // p)
  tokens = patches + (1 if model.classifier == 'token' else 0)
  out = {
    'embedding': _embedding_flops(model, height, width_px, channels),
    'attention': 0.0,
    'mlp': 0.0,
    'router': 0.0,
    'dispatch': 0.0,
    'experts': 0.0,
    'head': 2.0 * d * model.num_classes,
  }
  if model.classifier == 'map':  # Probe query, keys and values of all tokens, output, MLP.
    out['head'] += 2.0 * (2 * d * d + 2 * tokens * d * d + 2 * tokens * d + 2 * d * h)
  spec = model.moe
  for block in range(model.depth):
    out['attention'] += 2.0 * 4 * tokens * d * d + 2.0 * 2 * tokens * tokens * d
    if spec is None or block not in spec.layers:
      out['mlp'] += 2.0 * 2 * tokens * d * h
      continue
    images = spec.group_size or images_per_group
    logits, mixing, rows = moe_layer_work(spec, tokens, images, capacity_factor)
    out['router'] += 2.0 * d * logits
    out['dispatch'] += 2.0 * 2 * d * mixing
    out['experts'] += 2.0 * 2 * d * spec.mlp_dim * rows
  out['total'] = math.fsum(out.values())
  return out


def moe_layer_work(spec, tokens: int, images: int | None, capacity_factor: float | None):
  """(router logits, dense mixing products, expert rows) per image of one MoE layer.

  `capacity_factor` None: the active rows at the training capacity; else the
  buffer rows at that evaluation capacity factor. `images`: N per group (None
  when unknown: Expert Choice and Soft MoE then take the even share, cf * T).
  """
  router = routers.get(spec.router)
  train = capacity_factor is None
  if not train:
    spec = spec.at_eval(capacity_factor, spec.eval_batch_priority)
  factor = spec.capacity_factor_for(train)
  group = None if not images else images * tokens
  logits = tokens * (router.num_logits(spec, group) if group else spec.num_experts)
  if spec.router == 'soft':
    slots = factor * tokens
    if group:
      slots = spec.num_experts * router.capacity(spec, group, tokens, train) / images
    return logits, tokens * slots, slots
  if spec.router == 'dropless':
    rows = spec.num_selected * tokens
    if not train and group:  # The block-padded rows of the grouped matmul.
      rows = spec.block_size * (math.ceil(rows * images / spec.block_size) + spec.num_experts)
      rows /= images
    return logits, 0.0, rows
  if train and spec.router != 'expert_choice':
    return logits, 0.0, spec.num_selected * tokens
  if not group:
    if train:  # Expert Choice: the even share.
      return logits, 0.0, factor * tokens
    raise ValueError('images_per_group is needed to count capacity buffers.')
  return logits, 0.0, spec.num_experts * router.capacity(spec, group, tokens, train) / images


def _embedding_flops(model, height: int, width_px: int, channels: int) -> float:
  """The patch embedding, or the conv stem's 3x3 convolutions and 1x1 projection."""
  d, p = model.width, model.patch_size
  if getattr(model, 'stem', 'patch') != 'conv':
    return 2.0 * (height // p) * (width_px // p) * p * p * channels * d
  total, rows, cols, in_channels = 0.0, height, width_px, channels
  stages = vit.conv_stem_channels(d, p)
  extra_per_stage = vit.stem_extra_convs_per_stage(
    getattr(model, 'stem_extra_convs', 0), len(stages)
  )
  for out_channels, extra in zip(stages, extra_per_stage):
    rows, cols = -(-rows // 2), -(-cols // 2)  # SAME padding, stride 2.
    total += 2.0 * rows * cols * 9 * in_channels * out_channels
    total += extra * 2.0 * rows * cols * 9 * out_channels * out_channels  # Stride 1.
    in_channels = out_channels
  return total + 2.0 * rows * cols * in_channels * d


def expert_flops_per_image(model, kept_assignments_per_image: float) -> float:
  """Expert FLOPs actually spent on `kept_assignments_per_image` (token, expert) pairs."""
  return kept_assignments_per_image * 2.0 * 2 * model.width * model.moe.mlp_dim
