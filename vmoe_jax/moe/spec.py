"""The MoE spec: every setting of the MoE layers of a model, in one frozen object.

`vmoe_jax.models.factory.moe_spec(config)` builds it from `config.model.moe`
(see `vmoe_jax/schema/defaults.py` for the keys), after
`vmoe_jax.schema.validation` has checked them, and resolves what depends on
other settings (the blocks that hold MoE layers, the expert width, the expert
dropout, the capacity rounding of the backend). The frozen spec is what the
model (`vmoe_jax.models.vit.ViT(moe=spec)`), the FLOP counts, the
benchmarks, the profiler and the evaluation read; nothing else lists the MoE
settings field by field. It imports nothing of the package: the lists of
allowed values here are those the schema's rules check.

Routing at training and at evaluation differ in two settings, the capacity
factor and Batch Prioritized Routing: `spec.capacity_factor_for(train)` and
`spec.batch_priority_for(train)`; `spec.at_eval(capacity_factor, batch_priority)`
gives the spec of another evaluation setting (the capacity sweeps).
"""

from __future__ import annotations

import dataclasses
import re

# Names of the auxiliary losses of MoE layers and the spec field of their weight.
AUX_LOSS_WEIGHTS = {
  'load_balancing_loss': 'load_balance_weight',
  'importance_loss': 'importance_weight',
  'load_loss': 'load_weight',
  'z_loss': 'z_loss_weight',
}
DISPATCHES = ('indices', 'einsum')
LOAD_THRESHOLDS = ('vmoe', 'shazeer')
GROUPED_MATMULS = ('auto', 'ragged', 'blocks')
# The forms of model.moe.layers (`moe_layer_indices`).
LAYERS_SYNTAX = r'none|all|every_\d+|last_\d+|\d+(,\d+)*|'
# Defaults that depend on the router (docs/design.md, "Routing contract").
DEFAULT_GROUP_SIZE = 8  # Images per routing group, as the V-MoE paper's configs.
DEFAULT_EVAL_CAPACITY_FACTOR = 2.0  # Token-choice routers (Switch Transformer).


def moe_layer_indices(layers: str | int | tuple | list, depth: int) -> tuple[int, ...]:
  """Which of `depth` blocks hold an MoE MLP (0-based), from `model.moe.layers`.

  'none' -> (); 'all' -> every block; 'every_2' -> blocks 1, 3, 5, ... (every
  other block, ending with the last one when depth is even, as in V-MoE);
  'last_3' -> the last 3 blocks; '0,5,11' or a tuple -> those blocks. A
  ValueError for another form or a block outside the model (the config's
  one-line errors are `vmoe_jax.schema.validation`'s).
  """
  if isinstance(layers, int):
    layers = (layers,)
  if isinstance(layers, (tuple, list)):
    indices = tuple(int(i) for i in layers)
  elif layers in ('none', ''):
    indices = ()
  elif layers == 'all':
    indices = tuple(range(depth))
  elif match := re.fullmatch(r'every_(\d+)', layers):
    step = int(match.group(1))
    indices = tuple(range(step - 1, depth, step)) if step > 0 else ()
  elif match := re.fullmatch(r'last_(\d+)', layers):
    indices = tuple(range(max(0, depth - int(match.group(1))), depth))
  elif re.fullmatch(r'\d+(,\d+)*', layers):
    indices = tuple(int(i) for i in layers.split(','))
  else:
    raise ValueError(
      f"moe layers {layers!r} not understood; use 'all', 'every_N', 'last_N', 'none' or a "
      "comma-separated list of block indices such as '1,3,5'."
    )
  if any(not 0 <= i < depth for i in indices):
    raise ValueError(f'moe layers {indices} fall outside the {depth} blocks (0..{depth - 1}).')
  return tuple(sorted(set(indices)))


def default_group_size(router: str) -> int:
  """Images per routing group when model.moe.group_size is unset.

  Soft MoE routes one image per group, as its paper's code does: its slots
  mix the tokens of a group, so a larger group makes an image's output depend
  on the other images of its batch.
  """
  return 1 if router == 'soft' else DEFAULT_GROUP_SIZE


def default_eval_capacity_factor(router: str, capacity_factor: float) -> float:
  """The evaluation capacity factor when model.moe.eval_capacity_factor is unset.

  Expert Choice keeps its training capacity: there the capacity factor is the
  mean number of experts per token, part of the function the model learned.
  """
  return capacity_factor if router == 'expert_choice' else DEFAULT_EVAL_CAPACITY_FACTOR


@dataclasses.dataclass(frozen=True)
class MoeSpec:
  """The MoE layers of a model (hashable: a Flax module attribute).

  Attributes (config.model.moe keys, resolved):
    num_experts: E.
    layers: 0-based indices of the blocks whose MLP is an MoE layer.
    mlp_dim: hidden width H of every expert.
    router: name in `vmoe_jax.moe.routers.ROUTERS`.
    num_selected: K, experts per token (top-k routers) or per image (image_topk).
    capacity_factor, eval_capacity_factor: buffer slots relative to an even
      share, at training and at evaluation (None: `default_eval_capacity_factor`).
    capacity_multiple: round every capacity up to a multiple of this.
    batch_priority, eval_batch_priority: Batch Prioritized Routing.
    renormalize: divide the K combine weights by their sum.
    combine_scale: multiply the layer's output (every combine weight) by this;
      num_experts / num_selected makes a uniform top-k router's weights 1,
      the weight of the dense MLP a layer replaces (cf. DeepSeek-V2's routed
      scaling factor). 1.0: the Switch / V-MoE combine.
    noise_std: router noise std in units of 1/E (the noise std is noise_std / E).
    group_size: images per routing group; 0: all images of a device (then
      routing depends on the number of devices); None: `default_group_size`
      (1 for Soft MoE, 8 for the others).
    dispatch: 'indices' or 'einsum' (the one-hot reference).
    dropout: dropout rate inside the experts.
    load_threshold: 'vmoe' or 'shazeer', see `losses.load_loss`.
    slots_per_expert: Soft MoE slots per expert; None: from capacity_factor.
    block_size: dropless: rows per block of the block-padded grouped matmul.
    grouped_matmul: dropless: 'ragged' (`jax.lax.ragged_dot`), 'blocks' (the
      block-padded batched matmul) or 'auto' (blocks on the CPU, ragged on
      GPU/TPU).
    *_weight: weights of the auxiliary losses (`AUX_LOSS_WEIGHTS`).
  """

  num_experts: int
  layers: tuple[int, ...]
  mlp_dim: int
  router: str = 'topk'
  num_selected: int = 1
  capacity_factor: float = 1.25
  eval_capacity_factor: float | None = None
  capacity_multiple: int = 1
  batch_priority: bool = False
  eval_batch_priority: bool = False
  renormalize: bool = False
  combine_scale: float = 1.0
  noise_std: float = 0.0
  group_size: int | None = None
  dispatch: str = 'indices'
  dropout: float = 0.0
  load_threshold: str = 'vmoe'
  slots_per_expert: int | None = None
  block_size: int = 128
  grouped_matmul: str = 'auto'
  load_balance_weight: float = 0.0
  importance_weight: float = 0.0
  load_weight: float = 0.0
  z_loss_weight: float = 0.0

  def __post_init__(self):
    # Router-dependent defaults (the dataclass is frozen: set them once, here).
    if self.group_size is None:
      object.__setattr__(self, 'group_size', default_group_size(self.router))
    if self.eval_capacity_factor is None:
      value = default_eval_capacity_factor(self.router, self.capacity_factor)
      object.__setattr__(self, 'eval_capacity_factor', value)

  def capacity_factor_for(self, train: bool) -> float:
    return self.capacity_factor if train else self.eval_capacity_factor

  def batch_priority_for(self, train: bool) -> bool:
    return self.batch_priority if train else self.eval_batch_priority

  def at_eval(self, capacity_factor: float, batch_priority: bool) -> MoeSpec:
    """This spec with another evaluation setting (training is unchanged)."""
    return dataclasses.replace(
      self, eval_capacity_factor=float(capacity_factor), eval_batch_priority=bool(batch_priority)
    )

  def images_per_group(self, images_per_device: int) -> int:
    return self.group_size or images_per_device

  @property
  def family(self) -> str:
    """'Switch-ViT', 'V-MoE' or the router's name, for tables."""
    if self.router == 'topk':
      return 'Switch-ViT' if self.num_selected == 1 else 'V-MoE'
    return {
      'expert_choice': 'Expert Choice',
      'soft': 'Soft MoE',
      'image_topk': 'image-level MoE',
      'dropless': 'dropless MoE',
    }.get(self.router, self.router)
