"""The ('data', 'expert') device mesh and how arrays are laid out on it.

  batch:          split over both axes, P(('data', 'expert'))
  expert weights: (E, ...) split over 'expert' (each device holds E / n)
  everything else (and optimizer statistics of non-expert params): replicated

Expert weights are marked with `nn.with_partitioning` in the model; the
shardings of parameters and optimizer state are derived from those marks.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vmoe_jax.errors import UserError

DATA_AXIS = 'data'
EXPERT_AXIS = 'expert'
BATCH_AXES = (DATA_AXIS, EXPERT_AXIS)  # The batch is split over both mesh axes.


def default_expert_axis(num_devices: int, num_experts: int) -> int:
  """Largest divisor of the device count that also divides num_experts (1 if dense)."""
  if num_experts <= 0:
    return 1
  return max(d for d in range(1, num_devices + 1) if num_devices % d == 0 and num_experts % d == 0)


def check_expert_axis(expert: int, num_devices: int, num_experts: int = 0) -> None:
  """The expert mesh axis (`expert` shards, -1: to choose) must divide the devices and experts.

  The one check of both, for the config (`vmoe_jax.schema.validation`), the
  mesh (`create_mesh`) and the MoE layer: one-line UserErrors in the config's
  terms (mesh.expert, model.moe.num_experts).
  """
  if expert != -1 and (expert < 1 or num_devices % expert):
    raise UserError(
      f'mesh.expert={expert} does not divide the {num_devices} devices; use a divisor of '
      f'{num_devices} (--config.mesh.expert), or -1 to choose.'
    )
  if expert > 0 and num_experts > 0 and num_experts % expert:
    raise UserError(
      f'model.moe.num_experts={num_experts} is not a multiple of mesh.expert={expert}; use a '
      f'multiple of {expert} experts or a --config.mesh.expert that divides {num_experts}.'
    )


def create_mesh(expert: int, num_experts: int, devices=None) -> Mesh:
  """A ('data', 'expert') mesh over `devices` (default: all) with `expert` shards."""
  devices = list(jax.devices() if devices is None else devices)
  num_devices = len(devices)
  if expert == -1:
    expert = default_expert_axis(num_devices, num_experts)
  check_expert_axis(expert, num_devices, num_experts)
  grid = np.asarray(devices).reshape(num_devices // expert, expert)
  return Mesh(grid, (DATA_AXIS, EXPERT_AXIS), axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_specs(boxed_params: Any) -> Any:
  """PartitionSpecs of (abstract) params that carry `nn.Partitioned` boxes."""
  return nn.get_partition_spec(boxed_params)


def expert_mask(specs: Any) -> Any:
  """True for parameters whose axis 0 is split over the expert axis."""
  return jax.tree.map(
    lambda s: len(s) > 0 and s[0] == EXPERT_AXIS, specs, is_leaf=lambda x: isinstance(x, P)
  )


def state_shardings(abstract_state: Any, params: Any, specs: Any, mesh: Mesh) -> Any:
  """Shardings for a pytree holding params-shaped subtrees (e.g. optimizer state).

  A subtree with the structure of `params` gets, leaf by leaf: the param's
  sharding when the shapes agree; P('expert') when the param is an expert
  weight and the leaf keeps its experts axis (factored statistics);
  replicated otherwise. Leaves outside such subtrees are replicated.
  """
  params_def = jax.tree.structure(params)
  spec_leaves = params_def.flatten_up_to(specs)

  def for_subtree(sub):
    leaves = params_def.flatten_up_to(sub)
    out = []
    for leaf, param, spec in zip(leaves, params_def.flatten_up_to(params), spec_leaves):
      if tuple(leaf.shape) == tuple(param.shape):
        out.append(NamedSharding(mesh, spec))
      elif len(spec) and spec[0] == EXPERT_AXIS and leaf.ndim and leaf.shape[0] == param.shape[0]:
        out.append(NamedSharding(mesh, P(EXPERT_AXIS)))
      else:
        out.append(replicated(mesh))
    return params_def.unflatten(out)

  def is_params_like(x):
    try:
      return jax.tree.structure(x) == params_def
    except Exception:  # pylint: disable=broad-except
      return False

  return jax.tree.map(
    lambda x: for_subtree(x) if is_params_like(x) else replicated(mesh),
    abstract_state,
    is_leaf=is_params_like,
  )


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays split over the batch axes of `mesh`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
