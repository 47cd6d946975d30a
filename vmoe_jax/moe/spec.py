"""The MoE spec: every setting of the MoE layers of a model, built and checked once.

`MoeSpec.from_config(config)` reads `config.model.moe` (see
`vmoe_jax/schema/defaults.py` for the keys), resolves what depends on other
settings (the blocks that hold MoE layers, the expert width, the expert
dropout, the capacity rounding of the backend) and validates the result. The
frozen spec is what the model (`vmoe_jax.models.vit.ViT(moe=spec)`), the FLOP
counts, the benchmarks, the profiler and the evaluation read; nothing else
lists the MoE settings field by field.

Routing at training and at evaluation differ in two settings, the capacity
factor and Batch Prioritized Routing: `spec.capacity_factor_for(train)` and
`spec.batch_priority_for(train)`; `spec.at_eval(capacity_factor, batch_priority)`
gives the spec of another evaluation setting (the capacity sweeps).
"""

from __future__ import annotations

import dataclasses

from vmoe_jax.errors import UserError

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
# Defaults that depend on the router (docs/design.md, "Routing contract").
DEFAULT_GROUP_SIZE = 8  # Images per routing group, as the V-MoE paper's configs.
DEFAULT_EVAL_CAPACITY_FACTOR = 2.0  # Token-choice routers (Switch Transformer).


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
    from vmoe_jax.moe import routers  # pylint: disable=g-import-not-at-top  (routers import spec)

    def bad(key, value, fix):
      raise UserError(f'model.moe.{key}={value!r} {fix}')

    # Router-dependent defaults (the dataclass is frozen: set them once, here).
    if self.group_size is None:
      object.__setattr__(self, 'group_size', default_group_size(self.router))
    if self.eval_capacity_factor is None:
      value = default_eval_capacity_factor(self.router, self.capacity_factor)
      object.__setattr__(self, 'eval_capacity_factor', value)

    if self.num_experts < 1:
      bad('num_experts', self.num_experts, 'must be >= 1 for an MoE model (0 gives a dense ViT).')
    if self.router not in routers.ROUTERS:
      bad('router', self.router, f'is unknown; use one of {sorted(routers.ROUTERS)}.')
    if self.router in routers.SELECTS_K and not 1 <= self.num_selected <= self.num_experts:
      bad('num_selected', self.num_selected, f'must be in [1, num_experts={self.num_experts}].')
    for key in ('capacity_factor', 'eval_capacity_factor'):
      if not getattr(self, key) > 0:
        bad(key, getattr(self, key), 'must be > 0 (1.0: an even share of the tokens).')
    if self.capacity_multiple < 1:
      bad('capacity_multiple', self.capacity_multiple, 'must be >= 1.')
    if self.group_size < 0:
      bad('group_size', self.group_size, 'must be >= 0 images (0: all images of a device).')
    if not self.combine_scale > 0:
      bad('combine_scale', self.combine_scale, 'must be > 0 (1.0: the Switch / V-MoE combine).')
    if self.noise_std < 0:
      bad('noise_std', self.noise_std, 'must be >= 0.')
    if not 0 <= self.dropout < 1:
      bad('dropout', self.dropout, 'must be in [0, 1).')
    if self.dispatch not in DISPATCHES:
      bad('dispatch', self.dispatch, f'is unknown; use one of {DISPATCHES}.')
    if self.load_threshold not in LOAD_THRESHOLDS:
      bad('load_threshold', self.load_threshold, f'is unknown; use one of {LOAD_THRESHOLDS}.')
    if self.slots_per_expert is not None and self.slots_per_expert < 1:
      bad('slots_per_expert', self.slots_per_expert, 'must be >= 1 (or unset).')
    if self.router == 'soft' and self.group_size == 0 and self.slots_per_expert is None:
      bad(
        'group_size',
        0,
        'does not fix the Soft MoE slot count (it would follow the device batch); set '
        'model.moe.group_size > 0 or model.moe.slots_per_expert.',
      )
    if self.block_size < 1:
      bad('block_size', self.block_size, 'must be >= 1.')
    if self.grouped_matmul not in GROUPED_MATMULS:
      bad('grouped_matmul', self.grouped_matmul, f'is unknown; use one of {GROUPED_MATMULS}.')
    if self.mlp_dim < 1:
      bad('mlp_dim', self.mlp_dim, 'must be >= 1.')
    for weight in AUX_LOSS_WEIGHTS.values():
      if getattr(self, weight) < 0:
        bad(weight, getattr(self, weight), 'must be >= 0.')

  @classmethod
  def from_config(cls, config, backend: str | None = None) -> MoeSpec | None:
    """The spec of `config.model.moe`; None for a dense model (num_experts == 0).

    Resolved here: `layers` against the model depth, `mlp_dim` (default: the
    dense MLP's), `dropout` (default: model.dropout, so that dense and MoE
    models regularise alike), `capacity_multiple` (default: 4 on GPU/TPU, as
    V-MoE, 1 on the CPU) and `eval_batch_priority` (default: batch_priority);
    `group_size` and `eval_capacity_factor` default by router (`__post_init__`).
    """
    from vmoe_jax.models import factory  # pylint: disable=g-import-not-at-top
    from vmoe_jax.models import vit  # pylint: disable=g-import-not-at-top

    moe = config.model.moe
    if moe.num_experts == 0:
      return None
    if moe.num_experts < 0:
      raise UserError(
        f'model.moe.num_experts={moe.num_experts} must be >= 0 (0: a dense ViT); use e.g. 8.'
      )
    size = factory.model_size(config)
    multiple = moe.capacity_multiple
    if multiple is None:
      multiple = 1 if (backend or _default_backend()) == 'cpu' else 4
    eval_bpr = moe.eval_batch_priority
    dropout = moe.dropout
    return cls(
      num_experts=moe.num_experts,
      layers=vit.moe_layer_indices(moe.layers, size['depth']),
      mlp_dim=moe.mlp_dim if moe.mlp_dim is not None else size['mlp_dim'],
      router=moe.router,
      num_selected=moe.num_selected,
      capacity_factor=float(moe.capacity_factor),
      eval_capacity_factor=_float_or_none(moe.eval_capacity_factor),
      capacity_multiple=int(multiple),
      batch_priority=bool(moe.batch_priority),
      eval_batch_priority=bool(moe.batch_priority if eval_bpr is None else eval_bpr),
      renormalize=bool(moe.renormalize),
      combine_scale=float(moe.get('combine_scale', 1.0)),
      noise_std=float(moe.noise_std),
      group_size=None if moe.group_size is None else int(moe.group_size),
      dispatch=moe.dispatch,
      dropout=float(config.model.dropout if dropout is None else dropout),
      load_threshold=moe.load_threshold,
      slots_per_expert=moe.slots_per_expert,
      block_size=int(moe.block_size),
      grouped_matmul=moe.get('grouped_matmul', 'auto'),
      **{weight: float(moe[weight]) for weight in AUX_LOSS_WEIGHTS.values()},
    )

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


def _float_or_none(value) -> float | None:
  return None if value is None else float(value)


def _default_backend() -> str:
  import jax  # pylint: disable=g-import-not-at-top

  return jax.default_backend()
