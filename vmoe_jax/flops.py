"""Analytic FLOP counts of the ViT / MoE ViT forward pass, per image.

A multiply-add counts as 2 FLOPs; only matmuls are counted (norms, softmax,
GELU and routing bookkeeping are a few percent at these sizes). Training is
taken as 3x the forward pass (forward + two matmuls per matmul backward).

Expert FLOPs can be counted two ways:
  * active: every token runs through K experts (what the model "uses");
  * buffers: every expert processes its full capacity C per group, padding
    included (what the hardware does): E * C * (4 D H) per group of N images.
"""

from __future__ import annotations

import math

from vmoe_jax.moe import routing


def forward_flops(
  model,
  image_shape: tuple[int, int, int],
  *,
  capacity_factor: float | None = None,
  images_per_group: int | None = None,
) -> dict[str, float]:
  """FLOPs of one image through `model` (a `vmoe_jax.models.vit.ViT`), by part.

  Args:
    model: the ViT definition (only its sizes are read).
    image_shape: (H, W, C).
    capacity_factor: None counts active expert FLOPs (K per token); a value
      counts the capacity buffers of groups of `images_per_group` images.
    images_per_group: N, needed with `capacity_factor`.
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
    'experts': 0.0,
    'head': 2.0 * d * model.num_classes,
  }
  moe = dict(model.moe or {})
  expert_h = moe.get('mlp_dim', h)
  for block in range(model.depth):
    out['attention'] += 2.0 * 4 * tokens * d * d + 2.0 * 2 * tokens * tokens * d
    if block not in model.moe_layers or not moe:
      out['mlp'] += 2.0 * 2 * tokens * d * h
      continue
    num_experts, k = moe['num_experts'], moe.get('num_selected', 1)
    out['router'] += 2.0 * tokens * d * num_experts
    per_assignment = 2.0 * 2 * d * expert_h
    if capacity_factor is None:
      out['experts'] += k * tokens * per_assignment
    else:
      if not images_per_group:
        raise ValueError('images_per_group is needed to count capacity buffers.')
      group_tokens = images_per_group * tokens
      capacity = routing.compute_capacity(
        group_tokens, num_experts, k, capacity_factor, moe.get('capacity_multiple', 1)
      )
      out['experts'] += num_experts * capacity * per_assignment / images_per_group
  out['total'] = math.fsum(out.values())
  return out


def _embedding_flops(model, height: int, width_px: int, channels: int) -> float:
  """The patch embedding, or the conv stem's 3x3 stride-2 convolutions and 1x1 projection."""
  d, p = model.width, model.patch_size
  if getattr(model, 'stem', 'patch') != 'conv':
    return 2.0 * (height // p) * (width_px // p) * p * p * channels * d
  from vmoe_jax.models import vit  # pylint: disable=g-import-not-at-top

  total, rows, cols, in_channels = 0.0, height, width_px, channels
  for out_channels in vit.conv_stem_channels(d, p):
    rows, cols = -(-rows // 2), -(-cols // 2)  # SAME padding, stride 2.
    total += 2.0 * rows * cols * 9 * in_channels * out_channels
    in_channels = out_channels
  return total + 2.0 * rows * cols * in_channels * d


def expert_flops_per_image(model, kept_assignments_per_image: float) -> float:
  """Expert FLOPs actually spent on `kept_assignments_per_image` (token, choice) pairs."""
  moe = dict(model.moe or {})
  return kept_assignments_per_image * 2.0 * 2 * model.width * moe.get('mlp_dim', model.mlp_dim)
