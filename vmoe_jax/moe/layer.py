"""The sparse MoE MLP layer, with experts sharded over the `expert` mesh axis.

Axis letters: B images, T tokens per image, G groups, S = N * T tokens per
group (N images per group), E experts, K selected, C capacity, D width,
H expert hidden width, n expert shards (size of the `expert` mesh axis).

Data flow of one layer (DESIGN.md, "Dispatch and expert parallelism"):

  outside shard_map: router noise (B, T, E), drawn for the global batch so
  that a sharded run sees the same noise as an unsharded one.
  inside shard_map, on every device with its local images:
    (B_l, T, D) -> groups (G_l, S, D)
    -> router logits (f32) -> gates -> `route` -> losses and metrics
    -> dispatch (G_l, E, C, D) -> (E, G_l*C, D)
    -> all_to_all over `expert` -> (E/n, n*G_l*C, D)   [each device: its experts]
    -> expert MLPs (in `dtype`)
    -> all_to_all back -> (E, G_l*C, D) -> combine -> (B_l, T, D)

Without a mesh, the same function runs on the whole batch with no collective:
this is the unsharded reference that the sharded layer must match.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from vmoe_jax.errors import UserError
from vmoe_jax.moe import dispatch as dispatch_lib
from vmoe_jax.moe import losses
from vmoe_jax.moe import routing as routing_lib

DATA_AXIS = 'data'
EXPERT_AXIS = 'expert'
BATCH_AXES = (DATA_AXIS, EXPERT_AXIS)  # The batch is split over both mesh axes.


class RoutingConfig(NamedTuple):
  """Static settings of one forward pass of the layer."""

  num_experts: int
  num_selected: int
  capacity_factor: float
  capacity_multiple: int
  batch_priority: bool
  renormalize: bool
  group_size: int  # Images per group; 0: all images of a device.
  dispatch: str
  noise_std: float  # Std of the noise added to the logits (already / E).
  dropout_rate: float
  dtype: Any


def route_groups(xg, router, noise, cfg: RoutingConfig):
  """Router and routing of groups: (G, S, D) -> logits, noisy logits, gates, Routing, C.

  The router runs in float32 whatever the model dtype.
  """
  num_groups, group_tokens, _ = xg.shape
  logits = jnp.einsum('gsd,de->gse', xg.astype(jnp.float32), router.astype(jnp.float32))
  noisy_logits = logits if noise is None else logits + noise.reshape(logits.shape)
  gates = jax.nn.softmax(noisy_logits, axis=-1)
  capacity = routing_lib.compute_capacity(
    group_tokens, cfg.num_experts, cfg.num_selected, cfg.capacity_factor, cfg.capacity_multiple
  )
  routing = routing_lib.route(
    gates,
    num_selected=cfg.num_selected,
    capacity=capacity,
    batch_priority=cfg.batch_priority,
    renormalize=cfg.renormalize,
  )
  return logits, noisy_logits, gates, routing, capacity


def dispatch_to_buffers(xg, routing, cfg: RoutingConfig, capacity: int):
  """Tokens into expert buffers, experts first: (G, S, D) -> (E, G*C, D)."""
  dispatch_fn, _ = dispatch_lib.DISPATCHERS[cfg.dispatch]
  buffers = dispatch_fn(xg, routing, cfg.num_experts, capacity)  # (G, E, C, D)
  return einops.rearrange(buffers, 'g e c d -> e (g c) d')


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


def combine_from_buffers(out, routing, cfg: RoutingConfig, num_groups: int):
  """Expert outputs back to tokens: (E, G*C, D) -> (G, S, D)."""
  _, combine_fn = dispatch_lib.DISPATCHERS[cfg.dispatch]
  out = einops.rearrange(out, 'e (g c) d -> g e c d', g=num_groups)
  return combine_fn(out, routing)


def group_tokens(x, group_size: int):
  """(B_l, T, D) -> (G, N*T, D) with N = group_size images (0: all B_l)."""
  batch, tokens, width = x.shape
  images_per_group = group_size or batch
  if batch % images_per_group:
    raise UserError(
      f'group_size={group_size} images does not divide the {batch} images of a device; '
      'set --config.model.moe.group_size to a divisor of the per-device batch.'
    )
  return x.reshape(batch // images_per_group, images_per_group * tokens, width)


def moe_forward(x, params, noise, dropout_key, *, cfg: RoutingConfig, mesh_axes: dict | None):
  """The MoE MLP on the images of one device (or all images when unsharded).

  Args:
    x: (B_l, T, D) in the model dtype.
    params: router (D, E) float32; wi (E_l, D, H), bi (E_l, H), wo (E_l, H, D),
      bo (E_l, D): the experts this device holds.
    noise: (B_l, T, E) float32 router noise, or None.
    dropout_key: PRNG key for the expert dropout, or None.
    cfg: static routing settings.
    mesh_axes: None when unsharded; else {'expert': n, 'data': m}, the sizes
      of the mesh axes (the function then runs inside shard_map).

  Returns:
    y: (B_l, T, D); a dict of float32 metrics (scalars and (E,) vectors),
    averaged over all devices; and the `Routing` of every token, (B_l, T, K)
    arrays (slots count within the token's group).

  The phases carry named scopes (moe_route, moe_dispatch, moe_all_to_all,
  moe_experts, moe_combine) that show up in profiles.
  """
  batch, tokens, width = x.shape
  xg = group_tokens(x, cfg.group_size)
  num_groups = xg.shape[0]
  num_shards = mesh_axes[EXPERT_AXIS] if mesh_axes else 1
  with jax.named_scope('moe_route'):
    logits, noisy_logits, gates, routing, capacity = route_groups(xg, params['router'], noise, cfg)
  with jax.named_scope('moe_dispatch'):
    buffers = dispatch_to_buffers(xg, routing, cfg, capacity)  # (E, G*C, D)
  with jax.named_scope('moe_all_to_all'):
    buffers = exchange(buffers, num_shards, to_experts=True)  # (E/n, n*G*C, D)
  if dropout_key is not None and mesh_axes:
    device = jax.lax.axis_index(DATA_AXIS) * num_shards + jax.lax.axis_index(EXPERT_AXIS)
    dropout_key = jax.random.fold_in(dropout_key, device)
  with jax.named_scope('moe_experts'):
    out = expert_mlp(buffers, params, dropout_key, cfg.dropout_rate, cfg.dtype)
  with jax.named_scope('moe_all_to_all'):
    out = exchange(out, num_shards, to_experts=False)  # (E, G*C, D)
  with jax.named_scope('moe_combine'):
    y = combine_from_buffers(out, routing, cfg, num_groups)
    y = y.reshape(batch, tokens, width).astype(x.dtype)

  metrics = _metrics(logits, noisy_logits, gates, routing, cfg)
  if mesh_axes:
    metrics = jax.lax.pmean(metrics, BATCH_AXES)
  # Per-token routing, back in image layout: (B_l, T, K) each.
  per_token = routing_lib.Routing(*(a.reshape(batch, tokens, -1) for a in routing))
  return y, metrics, per_token


def _metrics(logits, noisy_logits, gates, routing, cfg: RoutingConfig) -> dict[str, jax.Array]:
  """Auxiliary losses and routing statistics of the local groups (float32)."""
  num_experts = cfg.num_experts
  chosen = jax.nn.one_hot(routing.expert_index, num_experts, dtype=jnp.float32)  # (G, S, K, E)
  return {
    'load_balancing_loss': losses.load_balancing_loss(gates, routing.expert_index[..., 0]),
    'importance_loss': losses.importance_loss(gates),
    'load_loss': losses.load_loss(logits, noisy_logits, cfg.noise_std, cfg.num_selected),
    'z_loss': losses.z_loss(logits),
    # Share of (token, choice) assignments dropped for lack of capacity.
    # (Counted directly, not as 1 - kept, so that none dropped is exactly 0.)
    'dropped': jnp.mean((routing.slot < 0).astype(jnp.float32)),
    # Share of the assignments that chose each expert, before capacity: (E,).
    'expert_load': jnp.mean(chosen, axis=(0, 1, 2)),
    'top1_gate': jnp.mean(jnp.max(gates, axis=-1)),
  }


def check_divisible(num_experts: int, mesh: Mesh | None) -> None:
  """Raises a one-line error when the experts do not split over the expert axis."""
  if mesh is None:
    return
  shards = mesh.shape[EXPERT_AXIS]
  if num_experts % shards:
    raise UserError(
      f'num_experts={num_experts} is not a multiple of the expert mesh axis ({shards} shards); '
      f'use a multiple of {shards} experts or set --config.mesh.expert to a divisor of '
      f'{num_experts}.'
    )


class MoeMlp(nn.Module):
  """Sparse Mixture-of-Experts MLP: (B, T, D) -> (B, T, D), plus metrics.

  Attributes mirror `config.model.moe` (see `vmoe_jax.config_defaults`).
  `noise_std` is in units of 1/E: the noise std is `noise_std / num_experts`.
  With a `mesh`, expert weights are sharded over its `expert` axis and the
  layer runs in `jax.shard_map`; without one it runs unsharded.
  """

  num_experts: int
  mlp_dim: int
  num_selected: int = 1
  capacity_factor: float = 1.25
  eval_capacity_factor: float | None = None
  capacity_multiple: int = 1
  batch_priority: bool = False
  renormalize: bool = False
  noise_std: float = 0.0
  group_size: int = 0
  dispatch: str = 'indices'
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  mesh: Mesh | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> tuple[jax.Array, dict]:
    batch, tokens, width = x.shape
    num_experts = self.num_experts
    if self.dispatch not in dispatch_lib.DISPATCHERS:
      raise UserError(
        f'dispatch={self.dispatch!r} is unknown; use one of {sorted(dispatch_lib.DISPATCHERS)}.'
      )
    check_divisible(num_experts, self.mesh)
    expert_axes = (EXPERT_AXIS, None, None)
    kernel_init = nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
    params = {
      'router': self.param(
        'router',
        nn.initializers.variance_scaling(0.1, 'fan_in', 'truncated_normal'),
        (width, num_experts),
        jnp.float32,
      ),
      'wi': self.param(
        'wi', nn.with_partitioning(kernel_init, expert_axes), (num_experts, width, self.mlp_dim)
      ),
      'bi': self.param(
        'bi',
        nn.with_partitioning(nn.initializers.normal(1e-6), (EXPERT_AXIS, None)),
        (num_experts, self.mlp_dim),
      ),
      'wo': self.param(
        'wo', nn.with_partitioning(kernel_init, expert_axes), (num_experts, self.mlp_dim, width)
      ),
      'bo': self.param(
        'bo',
        nn.with_partitioning(nn.initializers.normal(1e-6), (EXPERT_AXIS, None)),
        (num_experts, width),
      ),
    }
    noise_std = self.noise_std / num_experts
    noise = None
    if not deterministic and noise_std > 0:
      noise = noise_std * jax.random.normal(
        self.make_rng('router'), (batch, tokens, num_experts), jnp.float32
      )
    dropout_key = None
    if not deterministic and self.dropout_rate > 0:
      dropout_key = self.make_rng('dropout')
    capacity_factor = self.capacity_factor
    if deterministic and self.eval_capacity_factor is not None:
      capacity_factor = self.eval_capacity_factor
    cfg = RoutingConfig(
      num_experts=num_experts,
      num_selected=self.num_selected,
      capacity_factor=capacity_factor,
      capacity_multiple=self.capacity_multiple,
      batch_priority=self.batch_priority,
      renormalize=self.renormalize,
      group_size=self.group_size,
      dispatch=self.dispatch,
      noise_std=noise_std if noise is not None else 0.0,
      dropout_rate=self.dropout_rate,
      dtype=self.dtype,
    )
    x = x.astype(self.dtype)
    if self.mesh is None or self.mesh.size == 1:  # One device: no collectives to run.
      y, metrics, per_token = moe_forward(x, params, noise, dropout_key, cfg=cfg, mesh_axes=None)
    else:
      y, metrics, per_token = _sharded_forward(
        x, params, noise, dropout_key, cfg=cfg, mesh=self.mesh
      )
    # Kept for analysis (routing maps): apply(..., mutable=['intermediates']).
    self.sow('intermediates', 'routing', per_token)
    return y, metrics


def _sharded_forward(x, params, noise, dropout_key, *, cfg: RoutingConfig, mesh: Mesh):
  """`moe_forward` in shard_map: batch over ('data', 'expert'), experts over 'expert'."""
  num_devices = mesh.size
  if x.shape[0] % num_devices:
    raise UserError(
      f'the batch of {x.shape[0]} images does not split over the {num_devices} devices of the '
      f'mesh {dict(mesh.shape)}; use a batch size that is a multiple of {num_devices}.'
    )
  batch_spec = P(BATCH_AXES)
  param_specs = {
    'router': P(),
    'wi': P(EXPERT_AXIS),
    'bi': P(EXPERT_AXIS),
    'wo': P(EXPERT_AXIS),
    'bo': P(EXPERT_AXIS),
  }
  # Optional inputs are bound outside the mapped function so that the
  # argument pytree and its specs always match.
  args, specs = [x, params], [batch_spec, param_specs]
  if noise is not None:
    args.append(noise)
    specs.append(batch_spec)
  if dropout_key is not None:
    args.append(dropout_key)
    specs.append(P())
  has_noise, has_key = noise is not None, dropout_key is not None
  mesh_axes = dict(mesh.shape)

  def local(*local_args):
    x_l, params_l, *rest = local_args
    noise_l = rest.pop(0) if has_noise else None
    key_l = rest.pop(0) if has_key else None
    return moe_forward(x_l, params_l, noise_l, key_l, cfg=cfg, mesh_axes=mesh_axes)

  mapped = jax.shard_map(
    local, mesh=mesh, in_specs=tuple(specs), out_specs=(batch_spec, P(), batch_spec), check_vma=True
  )
  return mapped(*args)
