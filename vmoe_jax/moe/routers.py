"""The routers of the MoE layer: pure functions in an explicit table, `ROUTERS`.

Axis letters: G groups, S tokens per group (N images of T tokens), E experts,
K selected, C buffer slots per expert and group, R router logits per token
(E, or E * P for Soft MoE's P slots per expert).

The contract. A router is `route(inputs: RouterInputs, spec: MoeSpec) ->
RouterOutput`:
  in:  float32 router logits (G, S, R) before noise, the noise to add (or
       None), the padding mask (G, S) (or None), T and train/eval;
  out: a dispatch plan (`plans.SlotPlan`, `plans.DensePlan`, or
       `dropless.SortedPlan`: which token goes to which expert buffer slot,
       with which combine weight), float32 metrics -- the four auxiliary
       losses (`spec.AUX_LOSS_WEIGHTS`, zero where one does not apply),
       'dropped' (share of real assignments no expert processed),
       'expert_load' (E,) and 'top1_gate' -- and a per-token view
       (`routing.Routing` (G, S, K')) for the routing maps.
Padding tokens (mask False) take no capacity, displace no real token and
are left out of the metrics. Routing is per group, so a plan is the same
whether the groups sit on one device or many (`vmoe_jax.moe.layer`).

Adding a router is a change to this table (and its test): a `Router` with
its `route` function and, when its logits are not one per expert, `num_logits`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vmoe_jax.errors import UserError
from vmoe_jax.moe import dropless
from vmoe_jax.moe import losses
from vmoe_jax.moe import plans
from vmoe_jax.moe import routing
from vmoe_jax.moe.spec import AUX_LOSS_WEIGHTS
from vmoe_jax.moe.spec import MoeSpec


class RouterInputs(NamedTuple):
  logits: jax.Array  # (G, S, R) float32, before noise.
  noise: jax.Array | None  # (G, S, R) float32 noise to add at training, or None.
  mask: jax.Array | None  # (G, S) bool, False for padding; None: all real.
  tokens_per_image: int  # T.
  train: bool


class RouterOutput(NamedTuple):
  plan: Any  # plans.SlotPlan | plans.DensePlan | dropless.SortedPlan
  metrics: dict[str, jax.Array]
  view: routing.Routing  # (G, S, K') per token, for analysis.
  # The denominator of every metric that is a ratio over this device's groups
  # (e.g. 'dropped': real tokens): across devices such a metric is
  # sum(metric * weight) / sum(weight), not a plain mean, so that a padded
  # batch gives the unsharded value. Metrics not named here are per-group
  # means (the losses) and are averaged over devices.
  weights: dict[str, jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class Router:
  """One entry of `ROUTERS`.

  route: (RouterInputs, MoeSpec) -> RouterOutput.
  num_logits: (spec, S) -> R, router logits per token (default E).
  normalized: the logits are cosine similarities times a learned scale
    (Soft MoE's normalisation) instead of x @ W.
  capacity: (spec, S, T, train) -> C, buffer slots per expert and group (for
    FLOP counts and profiles; None for dropless, which has no buffers).
  uses_noise: the router adds `spec.noise_std` noise to its logits at training.
  """

  route: Callable[[RouterInputs, MoeSpec], RouterOutput]
  num_logits: Callable[[MoeSpec, int], int] = lambda spec, num_tokens: spec.num_experts
  normalized: bool = False
  capacity: Callable[[MoeSpec, int, int, bool], int] | None = None
  uses_noise: bool = True


# --------------------------------------------------------------------------- shared


def _noisy(inputs: RouterInputs) -> jax.Array:
  return inputs.logits if inputs.noise is None else inputs.logits + inputs.noise


def _real_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean of (G, S, ...) values over real tokens (and trailing axes)."""
  if mask is None:
    return jnp.mean(values)
  weights = jnp.broadcast_to(
    mask.reshape(*mask.shape, *([1] * (values.ndim - mask.ndim))), values.shape
  ).astype(jnp.float32)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def gate_losses(inputs: RouterInputs, gates: jax.Array, spec: MoeSpec, noise_std: float) -> dict:
  """The four auxiliary losses of (G, S, E) logits/gates (float32 scalars).

  Load balancing on the gates that route (noisy at training, as V-MoE's code);
  importance on the clean gates softmax(logits); load on clean and noisy
  logits (zero without noise); z-loss on the clean logits.
  """
  logits, mask = inputs.logits, inputs.mask
  top1 = jnp.argmax(gates, axis=-1)
  return {
    'load_balancing_loss': losses.load_balancing_loss(gates, top1, mask),
    'importance_loss': losses.importance_loss(jax.nn.softmax(logits, axis=-1), mask),
    'load_loss': losses.load_loss(
      logits, _noisy(inputs), noise_std, spec.num_selected, mask, spec.load_threshold
    ),
    'z_loss': losses.z_loss(logits, mask),
  }


def _zero_losses() -> dict:
  return {name: jnp.zeros((), jnp.float32) for name in AUX_LOSS_WEIGHTS}


def real_count(mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
  """Real tokens (or images) of (G, S) routing units: the weight of per-token metrics."""
  if mask is None:
    return jnp.asarray(float(shape[0] * shape[1]), jnp.float32)
  return jnp.sum(mask.astype(jnp.float32))


def token_weights(mask: jax.Array | None, shape: tuple[int, ...]) -> dict[str, jax.Array]:
  """`RouterOutput.weights` of metrics that are means over real tokens (or images)."""
  count = real_count(mask, shape)
  return {name: count for name in ('dropped', 'expert_load', 'top1_gate')}


def assignment_metrics(view: routing.Routing, gates, mask, num_experts: int) -> dict:
  """'dropped', 'expert_load' (E,) and 'top1_gate' of a (G, S, K) view."""
  chosen = jax.nn.one_hot(view.expert_index, num_experts, dtype=jnp.float32)  # (G, S, K, E)
  if mask is not None:
    chosen = chosen * mask[..., None, None]
    count = jnp.maximum(jnp.sum(mask.astype(jnp.float32)) * view.slot.shape[-1], 1.0)
  else:
    count = float(view.slot[..., 0].size * view.slot.shape[-1])
  return {
    # Counted directly, not as 1 - kept, so that none dropped is exactly 0.
    'dropped': _real_mean((view.slot < 0).astype(jnp.float32), mask),
    'expert_load': jnp.sum(chosen, axis=(0, 1, 2)) / count,
    'top1_gate': _real_mean(jnp.max(gates, axis=-1), mask),
  }


def _noise_std(inputs: RouterInputs, spec: MoeSpec) -> float:
  return spec.noise_std / spec.num_experts if inputs.noise is not None else 0.0


# --------------------------------------------------------------------------- top-k


def topk_capacity(spec: MoeSpec, num_tokens: int, tokens_per_image: int, train: bool) -> int:
  del tokens_per_image
  return routing.compute_capacity(
    num_tokens,
    spec.num_experts,
    spec.num_selected,
    spec.capacity_factor_for(train),
    spec.capacity_multiple,
  )


def route_topk(inputs: RouterInputs, spec: MoeSpec) -> RouterOutput:
  """Tokens choose: the K largest gates of every token, slots in priority order.

  Softmax before top-k; capacity C = ceil(K * S * cf / E); vanilla priority
  is token order, Batch Prioritized Routing the top-1 gate (Riquelme et al.
  2021, Sec. 4.1). See `vmoe_jax.moe.routing.route`.
  """
  gates = jax.nn.softmax(_noisy(inputs), axis=-1)
  num_tokens = gates.shape[1]
  capacity = topk_capacity(spec, num_tokens, inputs.tokens_per_image, inputs.train)
  factor = spec.capacity_factor_for(inputs.train)
  limit = routing.effective_capacity(
    inputs.mask, spec.num_experts, spec.num_selected, factor, spec.capacity_multiple
  )
  view = routing.route(
    gates,
    num_selected=spec.num_selected,
    capacity=capacity if limit is None else limit,
    batch_priority=spec.batch_priority_for(inputs.train),
    renormalize=spec.renormalize,
    mask=inputs.mask,
  )
  metrics = gate_losses(inputs, gates, spec, _noise_std(inputs, spec))
  metrics.update(assignment_metrics(view, gates, inputs.mask, spec.num_experts))
  plan = plans.from_routing(view, spec.num_experts, capacity)
  return RouterOutput(plan, metrics, view, token_weights(inputs.mask, gates.shape))


# --------------------------------------------------------------------------- image-level


def images_per_expert(spec: MoeSpec, num_images: int, train: bool) -> int:
  """C_img = ceil(K * N * cf / E) images per expert and group, never rounded up.

  `capacity_multiple` aligns buffers, not routing decisions: rounding a count
  of images up to a multiple of 4 would give N=8 images, E=8, cf=1.25 a
  capacity of 4 images instead of 2 (an effective capacity factor of 4.0).
  """
  return routing.compute_capacity(
    num_images, spec.num_experts, spec.num_selected, spec.capacity_factor_for(train)
  )


def image_capacity(spec: MoeSpec, num_tokens: int, tokens_per_image: int, train: bool) -> int:
  """Buffer slots per expert and group: C_img * T, rounded up to `capacity_multiple`."""
  slots = tokens_per_image * images_per_expert(spec, num_tokens // tokens_per_image, train)
  return spec.capacity_multiple * -(-slots // spec.capacity_multiple)


def route_image_topk(inputs: RouterInputs, spec: MoeSpec) -> RouterOutput:
  """Images choose: one routing decision per image, all its tokens follow it.

  The router sees each image's mean token (its logits are the mean of the
  token logits, the router being linear); the K largest gates of the image
  pick its experts; capacity counts images (C_img = ceil(K * N * cf / E));
  BPR orders images by their top-1 gate. Expert buffers hold C_img * T
  token slots (rounded up to `capacity_multiple`; the image count itself is
  never rounded). Noise: one draw per image (the noise of its first token).
  """
  num_groups, num_tokens, num_experts = inputs.logits.shape
  tokens_per_image = inputs.tokens_per_image
  num_images = num_tokens // tokens_per_image

  def per_image(array):
    if array is None:
      return None
    return array.reshape(num_groups, num_images, tokens_per_image, *array.shape[2:])

  image_mask = None if inputs.mask is None else per_image(inputs.mask)[:, :, 0]
  image_inputs = RouterInputs(
    logits=jnp.mean(per_image(inputs.logits), axis=2),
    noise=None if inputs.noise is None else per_image(inputs.noise)[:, :, 0],
    mask=image_mask,
    tokens_per_image=1,
    train=inputs.train,
  )
  gates = jax.nn.softmax(_noisy(image_inputs), axis=-1)
  capacity = images_per_expert(spec, num_images, inputs.train)
  factor = spec.capacity_factor_for(inputs.train)
  limit = routing.effective_capacity(image_mask, num_experts, spec.num_selected, factor)
  images = routing.route(
    gates,
    num_selected=spec.num_selected,
    capacity=capacity if limit is None else limit,
    batch_priority=spec.batch_priority_for(inputs.train),
    renormalize=spec.renormalize,
    mask=image_mask,
  )  # (G, N, K)
  token = jnp.arange(tokens_per_image, dtype=jnp.int32)[None, None, :, None]

  def to_tokens(array):
    shape = (num_groups, num_images, tokens_per_image, array.shape[-1])
    return jnp.broadcast_to(array[:, :, None], shape).reshape(num_groups, num_tokens, -1)

  image_slot = images.slot[:, :, None]
  slot = jnp.where(image_slot >= 0, image_slot * tokens_per_image + token, -1)
  view = routing.Routing(
    expert_index=to_tokens(images.expert_index),
    slot=slot.reshape(num_groups, num_tokens, -1),
    combine_weight=to_tokens(images.combine_weight),
  )
  metrics = gate_losses(image_inputs, gates, spec, _noise_std(inputs, spec))
  metrics.update(assignment_metrics(images, gates, image_mask, num_experts))
  buffer_capacity = image_capacity(spec, num_tokens, tokens_per_image, inputs.train)
  plan = plans.from_routing(view, num_experts, buffer_capacity)
  return RouterOutput(plan, metrics, view, token_weights(image_mask, gates.shape))


# --------------------------------------------------------------------------- expert choice


def expert_choice_capacity(
  spec: MoeSpec, num_tokens: int, tokens_per_image: int, train: bool
) -> int:
  """C = ceil(S * cf / E) tokens per expert (at most S)."""
  single = dataclasses.replace(spec, num_selected=1)
  return min(num_tokens, topk_capacity(single, num_tokens, tokens_per_image, train))


def route_expert_choice(inputs: RouterInputs, spec: MoeSpec) -> RouterOutput:
  """Experts choose (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

  Every expert takes the C tokens of the group with the largest gates for it
  (C = ceil(S * cf / E)); a token may be taken by 0..E experts; outputs are
  combined with the gates. Nothing is dropped for capacity, but tokens that
  no expert takes pass on through the residual ('dropped' counts them). The
  capacity factor is the mean number of experts per token, so it is part of
  the function: evaluation uses the training one unless asked otherwise
  (`MoeSpec.eval_capacity_factor`). No auxiliary loss.
  """
  gates = jax.nn.softmax(_noisy(inputs), axis=-1)
  num_groups, num_tokens, num_experts = gates.shape
  capacity = expert_choice_capacity(spec, num_tokens, inputs.tokens_per_image, inputs.train)
  scores = gates if inputs.mask is None else jnp.where(inputs.mask[..., None], gates, -1.0)
  values, tokens = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), capacity)  # (G, E, C)
  valid = values >= 0
  limit = routing.effective_capacity(
    inputs.mask, num_experts, 1, spec.capacity_factor_for(inputs.train), spec.capacity_multiple
  )
  if limit is not None:
    valid = valid & (jnp.arange(capacity)[None, None] < limit[:, None, None])
  source = jnp.where(valid, tokens, num_tokens).astype(jnp.int32)
  plan = plans.SlotPlan(source=source, slot_weight=jnp.where(valid, values, 0.0))
  # The view: every token's experts in order of its gates, slot -1 where not taken.
  rows = jnp.arange(num_groups)[:, None, None]
  taken = jnp.full((num_groups, num_experts, num_tokens + 1), -1, jnp.int32)
  taken = taken.at[rows, jnp.arange(num_experts)[None, :, None], source].set(
    jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), source.shape)
  )[..., :num_tokens]  # (G, E, S): slot of token s in expert e.
  order = jnp.argsort(-gates, axis=-1).astype(jnp.int32)  # (G, S, E)
  slot = jnp.take_along_axis(jnp.swapaxes(taken, 1, 2), order, axis=-1)
  weight = jnp.where(slot >= 0, jnp.take_along_axis(gates, order, axis=-1), 0.0)
  view = routing.Routing(expert_index=order, slot=slot, combine_weight=weight)
  # No auxiliary loss (Zhou et al. 2022, Sec. 3: every expert takes exactly C
  # tokens, so the load is balanced by construction; V-MoE's Expert Choice
  # router returns a zero auxiliary loss too).
  metrics = _zero_losses()
  kept = (slot >= 0).astype(jnp.float32)
  kept_per_expert = jnp.sum(jnp.swapaxes(taken, 1, 2) >= 0, axis=(0, 1)).astype(jnp.float32)
  total_kept = jnp.sum(kept_per_expert)
  metrics.update(
    dropped=_real_mean((jnp.sum(kept, axis=-1) == 0).astype(jnp.float32), inputs.mask),
    expert_load=kept_per_expert / jnp.maximum(total_kept, 1.0),
    top1_gate=_real_mean(jnp.max(gates, axis=-1), inputs.mask),
  )
  weights = token_weights(inputs.mask, gates.shape)
  weights['expert_load'] = total_kept  # A share of the assignments made, not of tokens.
  return RouterOutput(plan, metrics, view, weights)


# --------------------------------------------------------------------------- soft


def soft_slots(spec: MoeSpec, num_tokens: int) -> int:
  """P slots per expert: slots_per_expert, else round(cf * S / E), at least 1."""
  if spec.slots_per_expert is not None:
    return spec.slots_per_expert
  return max(1, round(spec.capacity_factor * num_tokens / spec.num_experts))


def route_soft(inputs: RouterInputs, spec: MoeSpec) -> RouterOutput:
  """Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

  Logits (G, S, E, P) between tokens and the E * P slots (L2-normalised
  tokens and slot parameters times a learned scale, see the layer); the
  dispatch weights are a softmax over the tokens of the group (every slot a
  convex mix of tokens), the combine weights a softmax over all slots (every
  token a convex mix of slot outputs). Nothing is dropped; no capacity, no
  priority (BPR does not apply); no auxiliary loss.
  """
  num_groups, num_tokens, _ = inputs.logits.shape
  num_experts = spec.num_experts
  logits = inputs.logits.reshape(num_groups, num_tokens, num_experts, -1)
  dispatch_logits = logits
  if inputs.mask is not None:
    # A finite floor, not -inf: in a group of padding only (the last evaluation
    # batch) every dispatch weight would be NaN, and NaN * 0 is NaN in the combine.
    floor = jnp.finfo(logits.dtype).min
    dispatch_logits = jnp.where(inputs.mask[..., None, None], logits, floor)
  dispatch = jax.nn.softmax(dispatch_logits, axis=1)
  combine = jax.nn.softmax(logits.reshape(num_groups, num_tokens, -1), axis=-1).reshape(
    logits.shape
  )
  if inputs.mask is not None:
    combine = combine * inputs.mask[..., None, None]
  mass = jnp.sum(combine, axis=-1)  # (G, S, E): each token's weight on each expert.
  view = routing.Routing(
    expert_index=jnp.argmax(mass, axis=-1).astype(jnp.int32)[..., None],
    slot=jnp.zeros((num_groups, num_tokens, 1), jnp.int32),
    combine_weight=jnp.max(mass, axis=-1)[..., None],
  )
  metrics = _zero_losses()
  metrics.update(
    dropped=jnp.zeros((), jnp.float32),
    expert_load=jnp.sum(mass, axis=(0, 1)) / jnp.maximum(jnp.sum(mass), 1e-9),
    top1_gate=_real_mean(jnp.max(mass, axis=-1), inputs.mask),
  )
  plan = plans.DensePlan(dispatch=dispatch, combine=combine)
  return RouterOutput(plan, metrics, view, token_weights(inputs.mask, mass.shape))


# --------------------------------------------------------------------------- dropless


def route_dropless(inputs: RouterInputs, spec: MoeSpec) -> RouterOutput:
  """Top-K without capacity: every assignment is processed (MegaBlocks-style).

  The K largest gates choose the experts as in `route_topk`; instead of
  capacity buffers, the layer sorts the assignments by expert and runs the
  experts as a grouped matmul (`vmoe_jax.moe.dropless`).
  """
  gates = jax.nn.softmax(_noisy(inputs), axis=-1)
  values, expert_index = routing.top_k_gates(gates, spec.num_selected)
  weight = values
  if spec.renormalize:
    weight = values / jnp.sum(values, axis=-1, keepdims=True)
  if inputs.mask is not None:
    weight = weight * inputs.mask[..., None]
  view = routing.Routing(
    expert_index=expert_index,
    slot=jnp.zeros_like(expert_index),  # Every assignment is processed.
    combine_weight=weight.astype(jnp.float32),
  )
  metrics = gate_losses(inputs, gates, spec, _noise_std(inputs, spec))
  metrics.update(assignment_metrics(view, gates, inputs.mask, spec.num_experts))
  plan = dropless.SortedPlan(
    expert_index=expert_index, weight=view.combine_weight, mask=inputs.mask
  )
  return RouterOutput(plan, metrics, view, token_weights(inputs.mask, gates.shape))


ROUTERS: dict[str, Router] = {
  'topk': Router(route_topk, capacity=topk_capacity),
  'image_topk': Router(route_image_topk, capacity=image_capacity),
  'expert_choice': Router(route_expert_choice, capacity=expert_choice_capacity),
  'soft': Router(
    route_soft,
    num_logits=lambda spec, num_tokens: spec.num_experts * soft_slots(spec, num_tokens),
    normalized=True,
    uses_noise=False,
    capacity=lambda spec, num_tokens, tokens_per_image, train: soft_slots(spec, num_tokens),
  ),
  'dropless': Router(route_dropless),
}
# Routers whose num_selected (K) is a number of experts per token or image.
SELECTS_K = ('topk', 'image_topk', 'dropless')


def get(name: str) -> Router:
  """The router `name` of `ROUTERS`; a one-line UserError naming the routers for another name."""
  if name not in ROUTERS:
    raise UserError(f'model.moe.router={name!r} is unknown; use one of {sorted(ROUTERS)}.')
  return ROUTERS[name]
