"""Auxiliary losses of MoE routers, all computed in float32.

Axis letters as in `vmoe_jax.moe.routing`: G groups, S tokens, E experts,
K selected experts. Every loss is computed per group and averaged over groups,
so its value does not depend on how the groups are spread over devices.
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


def load_balancing_loss(gates: jax.Array, top1_index: jax.Array) -> jax.Array:
  """Switch Transformer load balancing: E * sum_e f_e * P_e (Fedus et al. 2021, eq. 4).

  Args:
    gates: (G, S, E) router probabilities.
    top1_index: (G, S) int, the first choice of every token.

  Returns:
    Scalar; 1.0 when both token shares f and mean gates P are uniform.
  """
  num_experts = gates.shape[-1]
  share = jnp.mean(jax.nn.one_hot(top1_index, num_experts, dtype=jnp.float32), axis=-2)  # (G, E)
  mean_gate = jnp.mean(gates, axis=-2)  # (G, E)
  return jnp.mean(num_experts * jnp.sum(share * mean_gate, axis=-1))


def importance_loss(gates: jax.Array) -> jax.Array:
  """V-MoE importance loss: CV(sum_s gates)^2 (Riquelme et al. 2021, Appendix A)."""
  importance = jnp.sum(gates, axis=-2)  # (G, E)
  return jnp.mean(_cv_squared(importance))


def load_loss(
  logits: jax.Array, noisy_logits: jax.Array, noise_std: float, num_selected: int
) -> jax.Array:
  """V-MoE load loss: CV(expected load)^2 under the router noise (Appendix A).

  p_e(x) is the probability that expert e is among the K chosen when its
  noise is drawn again: P(logit_e + eps >= t_e) = Phi((logit_e - t_e) / std),
  where t_e is the K-th largest noisy logit among the other experts (the
  (K+1)-th overall when e is chosen, the K-th otherwise).

  Args:
    logits: (G, S, E) logits before noise.
    noisy_logits: (G, S, E) logits after noise (those the gates come from).
    noise_std: std of the noise added to the logits; must be > 0.
    num_selected: K.
  """
  num_experts = logits.shape[-1]
  if noise_std <= 0 or num_selected >= num_experts:
    return jnp.zeros((), jnp.float32)
  top_values, top_index = jax.lax.top_k(noisy_logits, num_selected + 1)
  kth = top_values[..., num_selected - 1 : num_selected]  # (G, S, 1)
  k_plus_1th = top_values[..., num_selected : num_selected + 1]
  chosen = jnp.sum(
    jax.nn.one_hot(top_index[..., :num_selected], num_experts, dtype=jnp.bool_), axis=-2
  ).astype(jnp.bool_)  # (G, S, E)
  threshold = jnp.where(chosen, k_plus_1th, kth)
  prob = ndtr((logits - threshold) / noise_std)
  return jnp.mean(_cv_squared(jnp.sum(prob, axis=-2)))


def z_loss(logits: jax.Array) -> jax.Array:
  """Router z-loss: mean(logsumexp(logits)^2) (Zoph et al. 2022, ST-MoE, eq. 5)."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
