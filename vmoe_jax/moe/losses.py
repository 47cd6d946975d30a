"""Auxiliary losses of MoE routers, all computed in float32.

Axis letters as in `vmoe_jax.moe.routing`: G groups, S tokens, E experts,
K selected experts. Every loss is computed per group and averaged over groups,
so its value does not depend on how the groups are spread over devices. An
optional `mask` (G, S) leaves padding tokens out (evaluation batches).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr


def _cv_squared(values: jax.Array) -> jax.Array:
  """Squared coefficient of variation along the last axis (population variance)."""
  mean = jnp.mean(values, axis=-1)
  var = jnp.var(values, axis=-1)
  return var / (mean**2 + 1e-10)


def _token_weights(shape, mask: jax.Array | None) -> jax.Array:
  """(G, S, 1) float32: 1 for real tokens (all without a mask), 0 for padding."""
  if mask is None:
    return jnp.ones((*shape[:2], 1), jnp.float32)
  return mask.astype(jnp.float32)[..., None]


def _token_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean over the tokens axis (-2) of (G, S, E) values with (G, S, 1) weights."""
  return jnp.sum(values * weights, axis=-2) / jnp.maximum(jnp.sum(weights, axis=-2), 1.0)


def load_balancing_loss(
  gates: jax.Array, top1_index: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """Switch Transformer load balancing: E * sum_e f_e * P_e (Fedus et al. 2021, eq. 4).

  Args:
    gates: (G, S, E) router probabilities.
    top1_index: (G, S) int, the first choice of every token.
    mask: optional (G, S), False for padding.

  Returns:
    Scalar; 1.0 when both token shares f and mean gates P are uniform.
  """
  num_experts = gates.shape[-1]
  weights = _token_weights(gates.shape, mask)
  share = _token_mean(jax.nn.one_hot(top1_index, num_experts, dtype=jnp.float32), weights)
  mean_gate = _token_mean(gates, weights)  # (G, E)
  return jnp.mean(num_experts * jnp.sum(share * mean_gate, axis=-1))


def importance_loss(gates: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """V-MoE importance loss: CV(sum_s gates)^2 (Riquelme et al. 2021, Appendix A).

  V-MoE computes it on the clean gates, softmax(logits) without router noise.
  """
  importance = jnp.sum(gates * _token_weights(gates.shape, mask), axis=-2)  # (G, E)
  return jnp.mean(_cv_squared(importance))


def load_loss(
  logits: jax.Array,
  noisy_logits: jax.Array,
  noise_std: float,
  num_selected: int,
  mask: jax.Array | None = None,
  threshold: str = 'vmoe',
) -> jax.Array:
  """Load loss: CV(expected load)^2 under the router noise.

  p_e(x) is the probability that expert e is among the K chosen when its
  noise is drawn again, p = 1 - Phi((t - logit_e) / std) = Phi((logit_e - t) / std),
  with `logits` before noise, and the load of e is the mean of p_e over the
  group's tokens. The threshold t:
    'vmoe' (Riquelme et al. 2021, Appendix A, as in their code): the K-th
      largest noisy logit of the token, the same for every expert;
    'shazeer' (Shazeer et al. 2017, "Outrageously Large Neural Networks",
      Appendix A): the K-th largest noisy logit among the *other* experts,
      i.e. the (K+1)-th overall when e is chosen, the K-th otherwise.

  Args:
    logits: (G, S, E) logits before noise.
    noisy_logits: (G, S, E) logits after noise (those the gates come from).
    noise_std: std of the noise added to the logits; 0 gives 0.
    num_selected: K.
    mask: optional (G, S), False for padding.
    threshold: 'vmoe' or 'shazeer'.
  """
  num_experts = logits.shape[-1]
  if noise_std <= 0 or num_selected >= num_experts:
    return jnp.zeros((), jnp.float32)
  top_values, top_index = jax.lax.top_k(noisy_logits, num_selected + 1)
  kth = top_values[..., num_selected - 1 : num_selected]  # (G, S, 1)
  if threshold == 'vmoe':
    t = kth
  elif threshold == 'shazeer':
    k_plus_1th = top_values[..., num_selected : num_selected + 1]
    chosen = jnp.any(
      jax.nn.one_hot(top_index[..., :num_selected], num_experts, dtype=jnp.bool_), axis=-2
    )  # (G, S, E)
    t = jnp.where(chosen, k_plus_1th, kth)
  else:
    raise ValueError(f"threshold={threshold!r}; use 'vmoe' or 'shazeer'.")
  prob = ndtr((logits - t) / noise_std)
  return jnp.mean(_cv_squared(_token_mean(prob, _token_weights(logits.shape, mask))))


def z_loss(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Router z-loss: mean(logsumexp(logits)^2) (Zoph et al. 2022, ST-MoE, eq. 5)."""
  squared = jnp.square(jax.nn.logsumexp(logits, axis=-1))[..., None]  # (G, S, 1)
  return jnp.mean(_token_mean(squared, _token_weights(logits.shape, mask)))
