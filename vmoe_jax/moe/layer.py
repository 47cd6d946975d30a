"""The sparse MoE MLP layer, with experts sharded over the `expert` mesh axis.

Axis letters: B images, T tokens per image, G groups, S = N * T tokens per
group (N images per group), E experts, K selected, C capacity, D width,
H expert hidden width, R router logits per token, n expert shards (size of
the `expert` mesh axis).

Data flow of one layer (docs/design.md, "Dispatch and expert parallelism"):

  outside shard_map: router noise (B, T, R), drawn for the global batch so
  that a sharded run sees the same noise as an unsharded one.
  inside shard_map, on every device with its local images:
    (B_l, T, D) -> groups (G_l, S, D)
    -> router logits (float32) -> the router of `spec.router`
       (`vmoe_jax.moe.routers`): a dispatch plan, losses and metrics
    -> dispatch (G_l, E, C, D) -> (E, G_l*C, D)
    -> all_to_all over `expert` -> (E/n, n*G_l*C, D)   [each device: its experts]
    -> expert MLPs (in `dtype`)
    -> all_to_all back -> (E, G_l*C, D) -> combine -> (B_l, T, D)
  The dropless router has no capacity buffers: its assignments are sorted by
  expert and run as a grouped matmul (`vmoe_jax.moe.dropless`).

Without a mesh, the same function runs on the whole batch with no collective:
this is the unsharded reference that the sharded layer must match.
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from vmoe_jax.errors import UserError
from vmoe_jax.errors import check_split
from vmoe_jax.moe import dropless
from vmoe_jax.moe import plans
from vmoe_jax.moe import routers
from vmoe_jax.moe import routing as routing_lib
from vmoe_jax.moe.spec import MoeSpec
from vmoe_jax.runtime.sharding import BATCH_AXES
from vmoe_jax.runtime.sharding import DATA_AXIS
from vmoe_jax.runtime.sharding import EXPERT_AXIS
from vmoe_jax.runtime.sharding import check_expert_axis

EXPERT_PARAMS = ('wi', 'bi', 'wo', 'bo')


def group_tokens(x, mask, group_size: int):
  """(B_l, T, D), (B_l,) -> (G, N*T, D), (G, N*T) with N = group_size images (0: all B_l)."""
  batch, tokens, width = x.shape
  images_per_group = group_size or batch
  if batch % images_per_group:
    raise UserError(
      f'model.moe.group_size={group_size} images does not divide the {batch} images of a '
      'device; set --config.model.moe.group_size to a divisor of the per-device batch.'
    )
  num_groups = batch // images_per_group
  xg = x.reshape(num_groups, images_per_group * tokens, width)
  if mask is None:
    return xg, None
  token_mask = jnp.broadcast_to(mask.astype(jnp.bool_)[:, None], (batch, tokens))
  return xg, token_mask.reshape(num_groups, images_per_group * tokens)


def router_logits(xg, params, router: routers.Router):
  """(G, S, D) -> (G, S, R) float32, whatever the model dtype.

  x @ W_r, or for normalised routers (Soft MoE, Puigcerver et al. 2023,
  Sec. 2.3) scale * <x / |x|, w_r / |w_r|>.
  """
  x = xg.astype(jnp.float32)
  weights = params['router'].astype(jnp.float32)
  if router.normalized:
    x = x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-6)
    weights = weights * jax.lax.rsqrt(jnp.sum(jnp.square(weights), axis=0, keepdims=True) + 1e-6)
    weights = weights * params['router_scale'].astype(jnp.float32)
  return jnp.einsum('gsd,dr->gsr', x, weights)


def exchange(buffers, num_shards: int, to_experts: bool):
  """all_to_all over the expert axis.

  to_experts: (E, M, D) -> (E/n, n*M, D), every device receives the buffers of
  its own experts from the n devices of its expert group; else the inverse.
  """
  if num_shards == 1:
    return buffers
  if to_experts:
    return jax.lax.all_to_all(buffers, EXPERT_AXIS, 0, 1, tiled=True)
  return jax.lax.all_to_all(buffers, EXPERT_AXIS, 1, 0, tiled=True)


def expert_mlp(buffers, params, dropout_key, rate, dtype):
  """Runs each expert on its buffer: (E_l, M, D) -> (E_l, M, D), matmuls in `dtype`."""
  wi = params['wi'].astype(dtype)
  wo = params['wo'].astype(dtype)
  h = jnp.einsum('emd,edh->emh', buffers, wi) + params['bi'][:, None, :].astype(dtype)
  h = nn.gelu(h)
  if dropout_key is not None and rate > 0:
    keep = jax.random.bernoulli(dropout_key, 1.0 - rate, h.shape)
    h = jnp.where(keep, h / (1.0 - rate), 0).astype(dtype)
  return jnp.einsum('emh,ehd->emd', h, wo) + params['bo'][:, None, :].astype(dtype)


def run_buffers(xg, plan, params, dropout_key, *, spec: MoeSpec, dtype, num_shards: int):
  """Dispatch, experts (across shards), combine: (G, S, D) -> (G, S, D)."""
  num_groups, num_tokens, _ = xg.shape
  if spec.dispatch == 'einsum' and isinstance(plan, plans.SlotPlan):
    plan = plans.to_dense(plan, num_tokens)
  with jax.named_scope('moe_dispatch'):
    buffers = plans.dispatch(xg, plan)  # (G, E, C, D)
    buffers = einops.rearrange(buffers, 'g e c d -> e (g c) d')
  with jax.named_scope('moe_all_to_all'):
    buffers = exchange(buffers, num_shards, to_experts=True)  # (E/n, n*G*C, D)
  with jax.named_scope('moe_experts'):
    out = expert_mlp(buffers, params, dropout_key, spec.dropout, dtype)
  with jax.named_scope('moe_all_to_all'):
    out = exchange(out, num_shards, to_experts=False)  # (E, G*C, D)
  with jax.named_scope('moe_combine'):
    out = einops.rearrange(out, 'e (g c) d -> g e c d', g=num_groups)
    return plans.combine(out, plan, num_tokens)


def moe_forward(x, mask, params, noise, dropout_key, *, spec: MoeSpec, train: bool, mesh_axes):
  """The MoE MLP on the images of one device (or all images when unsharded).

  Args:
    x: (B_l, T, D) in the model dtype.
    mask: (B_l,) bool/float, 0 for padding images, or None.
    params: router (D, R) float32 (and router_scale for normalised routers);
      wi (E_l, D, H), bi (E_l, H), wo (E_l, H, D), bo (E_l, D): the experts
      this device holds.
    noise: (B_l, T, R) float32 router noise, or None.
    dropout_key: PRNG key for the expert dropout, or None.
    spec: the MoE spec; train: training or evaluation routing.
    mesh_axes: None when unsharded; else {'expert': n, 'data': m}, the sizes
      of the mesh axes (the function then runs inside shard_map).

  Returns:
    y: (B_l, T, D); a dict of float32 metrics (scalars and (E,) vectors),
    averaged over all devices; and the router's per-token view, a `Routing`
    of (B_l, T, K') arrays (slots count within the token's group).
  """
  batch, tokens, width = x.shape
  xg, token_mask = group_tokens(x, mask, spec.group_size)
  num_shards = mesh_axes[EXPERT_AXIS] if mesh_axes else 1
  router = routers.get(spec.router)
  with jax.named_scope('moe_route'):
    logits = router_logits(xg, params, router)
    inputs = routers.RouterInputs(
      logits=logits,
      noise=None if noise is None else noise.reshape(logits.shape),
      mask=token_mask,
      tokens_per_image=tokens,
      train=train,
    )
    routed = router.route(inputs, spec)
    plan, metrics, view = routed.plan, routed.metrics, routed.view
  if dropout_key is not None and mesh_axes:
    device = jax.lax.axis_index(DATA_AXIS) * num_shards + jax.lax.axis_index(EXPERT_AXIS)
    dropout_key = jax.random.fold_in(dropout_key, device)
  expert_params = {k: params[k] for k in EXPERT_PARAMS}
  xg = xg.astype(x.dtype)
  if isinstance(plan, dropless.SortedPlan):
    with jax.named_scope('moe_experts'):
      y = dropless.forward(
        xg,
        plan,
        expert_params,
        impl=None if spec.grouped_matmul == 'auto' else spec.grouped_matmul,
        block_size=spec.block_size,
        dtype=x.dtype,
        dropout_key=dropout_key,
        rate=spec.dropout,
        num_shards=num_shards,
      )
  else:
    y = run_buffers(
      xg, plan, expert_params, dropout_key, spec=spec, dtype=x.dtype, num_shards=num_shards
    )
  y = y.reshape(batch, tokens, width)
  if spec.combine_scale != 1.0:  # Linear in the combine weights: the same as scaling each.
    y = y * jnp.asarray(spec.combine_scale, y.dtype)
  y = y.astype(x.dtype)
  if mesh_axes:
    metrics = combine_metrics(metrics, routed.weights or {})
  per_token = routing_lib.Routing(*(a.reshape(batch, tokens, -1) for a in view))
  return y, metrics, per_token


def combine_metrics(metrics: dict, weights: dict) -> dict:
  """The metrics of all devices' groups, from those of each device (inside shard_map).

  A metric with a weight (its denominator on this device, e.g. the real
  tokens) is sum(metric * weight) / sum(weight) over devices, so that a padded
  batch, whose devices hold different numbers of real tokens, gives the
  unsharded value; the others (per-group means: every device holds as many
  groups) are averaged.
  """
  out = {}
  for name, value in metrics.items():
    if name in weights:
      weight = weights[name]
      total = jax.lax.psum(weight, BATCH_AXES)
      out[name] = jax.lax.psum(value * weight, BATCH_AXES) / jnp.maximum(total, 1e-9)
    else:
      out[name] = jax.lax.pmean(value, BATCH_AXES)
  return out


class MoeMlp(nn.Module):
  """Sparse Mixture-of-Experts MLP: (B, T, D) -> (B, T, D), plus metrics.

  `spec` holds every setting (`vmoe_jax.moe.spec.MoeSpec`). With a `mesh`,
  expert weights are sharded over its `expert` axis and the layer runs in
  `jax.shard_map`; without one it runs unsharded.
  """

  spec: MoeSpec
  dtype: Any = jnp.float32
  mesh: Mesh | None = None

  def _params(self, width: int, num_logits: int, router: routers.Router) -> dict:
    spec = self.spec
    experts = spec.num_experts
    expert_axes = (EXPERT_AXIS, None, None)
    kernel_init = nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
    bias_init = nn.with_partitioning(nn.initializers.normal(1e-6), (EXPERT_AXIS, None))
    if router.normalized:  # Soft MoE: unit-norm slot parameters and a learned scale.
      # The (D, E * P) slot parameters are initialised as the paper's code does
      # its (D, E, P) ones, LeCun normal with fan-in E * D (variance 1 / (E * D)):
      # the forward pass normalises them, but the step size relative to their
      # norm, and so how fast the slots move, depends on the initial scale.
      slot_init = nn.initializers.variance_scaling(1.0 / experts, 'fan_in', 'truncated_normal')
      params = {
        'router': self.param('router', slot_init, (width, num_logits), jnp.float32),
        'router_scale': self.param('router_scale', nn.initializers.ones, (), jnp.float32),
      }
    else:
      # Truncated normal with a 10x smaller scale than usual (Fedus et al. 2021,
      # "Switch Transformers", Sec. 2.4: s = 0.1 of the fan-in variance).
      router_init = nn.initializers.variance_scaling(0.1, 'fan_in', 'truncated_normal')
      params = {'router': self.param('router', router_init, (width, num_logits), jnp.float32)}
    params['wi'] = self.param(
      'wi', nn.with_partitioning(kernel_init, expert_axes), (experts, width, spec.mlp_dim)
    )
    params['bi'] = self.param('bi', bias_init, (experts, spec.mlp_dim))
    params['wo'] = self.param(
      'wo', nn.with_partitioning(kernel_init, expert_axes), (experts, spec.mlp_dim, width)
    )
    params['bo'] = self.param('bo', bias_init, (experts, width))
    return params

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, mask=None) -> tuple[jax.Array, dict]:
    """x (B, T, D), mask (B,) (0 for padding rows) -> (B, T, D), metrics.

    `train`: training routing (noise, dropout, the training capacity), as
    `vmoe_jax.models.vit.ViT(..., train=)`; else evaluation routing.
    """
    batch, tokens, width = x.shape
    spec = self.spec
    if self.mesh is not None:
      check_expert_axis(self.mesh.shape[EXPERT_AXIS], self.mesh.size, spec.num_experts)
    router = routers.get(spec.router)
    devices = self.mesh.size if self.mesh is not None else 1
    group_tokens_count = spec.images_per_group(max(1, batch // devices)) * tokens
    num_logits = router.num_logits(spec, group_tokens_count)
    params = self._params(width, num_logits, router)
    noise = None
    if train and spec.noise_std > 0 and router.uses_noise:
      noise = (spec.noise_std / spec.num_experts) * jax.random.normal(
        self.make_rng('router'), (batch, tokens, num_logits), jnp.float32
      )
    dropout_key = None
    if train and spec.dropout > 0:
      dropout_key = self.make_rng('dropout')
    x = x.astype(self.dtype)
    if self.mesh is None or self.mesh.size == 1:  # One device: no collectives to run.
      y, metrics, per_token = moe_forward(
        x, mask, params, noise, dropout_key, spec=spec, train=train, mesh_axes=None
      )
    else:
      y, metrics, per_token = _sharded_forward(
        x, mask, params, noise, dropout_key, spec=spec, train=train, mesh=self.mesh
      )
    # Kept for analysis (routing maps): apply(..., mutable=['intermediates']).
    self.sow('intermediates', 'routing', per_token)
    return y, metrics


def _sharded_forward(x, mask, params, noise, dropout_key, *, spec, train, mesh: Mesh):
  """`moe_forward` in shard_map: batch over ('data', 'expert'), experts over 'expert'."""
  num_devices = mesh.size
  check_split(
    x.shape[0],
    num_devices,
    f'the batch of {x.shape[0]} images',
    f'the {num_devices} devices of the mesh {dict(mesh.shape)}',
    f'use a batch size that is a multiple of {num_devices}.',
  )
  batch_spec = P(BATCH_AXES)
  param_specs = {k: (P(EXPERT_AXIS) if k in EXPERT_PARAMS else P()) for k in params}
  # Optional inputs are bound outside the mapped function so that the
  # argument pytree and its specs always match.
  optional = {'mask': mask, 'noise': noise, 'dropout_key': dropout_key}
  present = [name for name, value in optional.items() if value is not None]
  args = [x, params, *(optional[name] for name in present)]
  specs = [batch_spec, param_specs, *(P() if n == 'dropout_key' else batch_spec for n in present)]
  mesh_axes = dict(mesh.shape)

  def local(x_l, params_l, *rest):
    values = dict(zip(present, rest))
    return moe_forward(
      x_l,
      values.get('mask'),
      params_l,
      values.get('noise'),
      values.get('dropout_key'),
      spec=spec,
      train=train,
      mesh_axes=mesh_axes,
    )

  mapped = jax.shard_map(
    local, mesh=mesh, in_specs=tuple(specs), out_specs=(batch_spec, P(), batch_spec), check_vma=True
  )
  return mapped(*args)
