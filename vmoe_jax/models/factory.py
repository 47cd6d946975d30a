"""Building the model of a config: `create_model(config, num_classes, mesh)`.

The trainer, the evaluation, inference, the benchmarks and the profiler all
build their model here, from `config.model` (sizes, stem, head, dtype) and
the one `MoeSpec` of `config.model.moe` (`moe_spec`). The config is the one
`vmoe_jax.schema.validation` has checked: nothing here checks it again,
except that the size must be complete (`model_size`, whose messages the
validation gives).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from vmoe_jax.errors import UserError
from vmoe_jax.models import vit
from vmoe_jax.moe.spec import AUX_LOSS_WEIGHTS
from vmoe_jax.moe.spec import MoeSpec
from vmoe_jax.moe.spec import moe_layer_indices
from vmoe_jax.runtime import sharding

SIZE_KEYS = ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size')


def model_size(model) -> dict[str, int]:
  """Width, depth, num_heads, mlp_dim and patch_size of `config.model` (or a mapping like it).

  `model.variant` (e.g. 'S/16') gives all five; the keys set one by one
  override it. An incomplete size, or a width the heads do not divide, is a
  one-line UserError.
  """
  size = vit.decode_variant(model['variant']) if model['variant'] else {}
  size.update({key: model[key] for key in SIZE_KEYS if model[key] is not None})
  missing = [f'model.{key}' for key in SIZE_KEYS if key not in size]
  if missing:
    raise UserError(
      f'the model size is incomplete ({", ".join(missing)} unset); set --config.model.variant '
      f'(e.g. S/16) or {", ".join("--config." + key for key in missing)}.'
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


def moe_spec(config, backend: str | None = None) -> MoeSpec | None:
  """The spec of `config.model.moe`; None for a dense model (num_experts == 0).

  Resolved here: `layers` against the model depth, `mlp_dim` (default: the
  dense MLP's), `dropout` (default: model.dropout, so that dense and MoE
  models regularise alike), `capacity_multiple` (default: 4 on GPU/TPU, as
  V-MoE, 1 on the CPU) and `eval_batch_priority` (default: batch_priority);
  `group_size` and `eval_capacity_factor` default by router (`MoeSpec`).
  """
  moe = config.model.moe
  if moe.num_experts == 0:
    return None
  size = model_size(config.model)
  multiple = moe.capacity_multiple
  if multiple is None:
    multiple = 1 if (backend or jax.default_backend()) == 'cpu' else 4
  eval_bpr = moe.eval_batch_priority
  dropout = moe.dropout
  return MoeSpec(
    num_experts=moe.num_experts,
    layers=moe_layer_indices(moe.layers, size['depth']),
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


def _float_or_none(value) -> float | None:
  return None if value is None else float(value)


def create_model(config, num_classes: int, mesh=None, moe: MoeSpec | None = None) -> vit.ViT:
  """The ViT of `config.model`; MoE layers get `mesh` for expert parallelism.

  `moe` replaces the spec built from `config.model.moe` (e.g. another
  evaluation capacity).
  """
  if moe is None:
    moe = moe_spec(config)
  return vit.ViT(
    num_classes=num_classes,
    classifier=config.model.classifier,
    stem=config.model.stem,
    stem_extra_convs=config.model.stem_extra_convs,
    dropout_rate=config.model.dropout,
    attention_dropout_rate=config.model.attention_dropout,
    dtype=jnp.dtype(config.model.dtype),
    moe=moe,
    mesh=mesh if moe is not None else None,
    **model_size(config.model),
  )


def count_params(params: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def param_init(model: vit.ViT, image_shape):
  """(init_params(key), boxed abstract params) of the unsharded twin of `model`.

  The params are the sharded model's; they are initialised unsharded, on one
  routing group of dummy images.
  """
  images = model.moe.group_size if model.moe is not None else 1
  dummy = jnp.zeros((max(1, images), *image_shape), jnp.float32)
  model = model.clone(mesh=None)

  def init_params(key):
    return model.init({'params': key}, dummy, train=False)['params']

  return init_params, jax.eval_shape(init_params, jax.random.key(0))


def abstract_params(model: vit.ViT, mesh, image_shape):
  """Shapes, dtypes and shardings on `mesh` of the params of `model`."""
  _, boxed = param_init(model, image_shape)
  specs = sharding.param_specs(boxed)
  return jax.tree.map(
    lambda a, spec: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec)),
    nn.meta.unbox(boxed),
    specs,
  )
