"""Auxiliary losses against hand-worked values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import norm

from vmoe_jax.moe import losses


def test_load_balancing_uniform_is_one():
  gates = jnp.full((1, 8, 4), 0.25)
  top1 = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3]])
  np.testing.assert_allclose(losses.load_balancing_loss(gates, top1), 1.0, rtol=1e-6)


def test_load_balancing_hand_worked():
  # 2 tokens, 2 experts: both tokens choose expert 0.
  gates = jnp.array([[[0.8, 0.2], [0.6, 0.4]]])
  top1 = jnp.array([[0, 0]])
  # f = (1, 0), P = (0.7, 0.3): E * sum f P = 2 * 0.7 = 1.4.
  np.testing.assert_allclose(losses.load_balancing_loss(gates, top1), 1.4, rtol=1e-6)


def test_importance_hand_worked():
  gates = jnp.array([[[0.8, 0.2], [0.6, 0.4]]])
  # importance = (1.4, 0.6): mean 1.0, population var 0.16 -> CV^2 = 0.16.
  np.testing.assert_allclose(losses.importance_loss(gates), 0.16, rtol=1e-5)
  assert float(losses.importance_loss(jnp.full((1, 4, 2), 0.5))) == 0.0


def test_z_loss_hand_worked():
  logits = jnp.zeros((1, 3, 4))
  np.testing.assert_allclose(losses.z_loss(logits), np.log(4.0) ** 2, rtol=1e-6)


def test_load_loss_hand_worked():
  # One token, 3 experts, K=1, noise std 1.
  logits = jnp.array([[[1.0, 0.0, -1.0]]])
  noisy = jnp.array([[[1.2, 0.3, -2.0]]])
  # V-MoE: the threshold is the K-th largest noisy logit (1.2) for every expert.
  p = np.array([norm.cdf(1 - 1.2), norm.cdf(0 - 1.2), norm.cdf(-1 - 1.2)])
  np.testing.assert_allclose(
    losses.load_loss(logits, noisy, 1.0, 1), p.var() / p.mean() ** 2, rtol=1e-5
  )
  # Shazeer et al.: expert 0 is chosen, so its threshold is the 2nd largest noisy
  # logit (0.3); experts 1 and 2 are not, theirs is the largest (1.2).
  p = np.array([norm.cdf(0.7), norm.cdf(-1.2), norm.cdf(-2.2)])
  np.testing.assert_allclose(
    losses.load_loss(logits, noisy, 1.0, 1, threshold='shazeer'), p.var() / p.mean() ** 2, rtol=1e-5
  )
  assert float(losses.load_loss(logits, noisy, 0.0, 1)) == 0.0


def vmoe_load_loss_reference(logits, noisy, noise_std, k):
  """The V-MoE paper's code, transcribed in NumPy for one group (S, E), float64."""
  logits, noisy = np.asarray(logits, np.float64), np.asarray(noisy, np.float64)
  threshold = -np.sort(-noisy, axis=-1)[:, k - 1]  # K-th largest noisy logit per token.
  p = 1.0 - norm.cdf((threshold[:, None] - logits) / noise_std)
  p_mean = p.mean(axis=0)
  return (p_mean.std() / p_mean.mean()) ** 2


@pytest.mark.parametrize('k', [1, 2])
@pytest.mark.parametrize('num_experts', [4, 8, 32])
def test_load_loss_equals_the_vmoe_formula(k, num_experts):
  keys = jax.random.split(jax.random.key(num_experts * 10 + k), 2)
  std = 1.0 / num_experts
  logits = 0.1 * jax.random.normal(keys[0], (3, 64, num_experts))
  noisy = logits + std * jax.random.normal(keys[1], logits.shape)
  expected = np.mean([vmoe_load_loss_reference(a, b, std, k) for a, b in zip(logits, noisy)])
  np.testing.assert_allclose(losses.load_loss(logits, noisy, std, k), expected, rtol=1e-5)


def test_masked_tokens_leave_the_losses_unchanged():
  keys = jax.random.split(jax.random.key(3), 3)
  logits = jax.random.normal(keys[0], (2, 12, 4))
  noisy = logits + 0.25 * jax.random.normal(keys[1], logits.shape)
  padded = jnp.concatenate([logits, jax.random.normal(keys[2], (2, 4, 4))], axis=1)
  padded_noisy = jnp.concatenate([noisy, 5.0 + padded[:, 12:]], axis=1)
  mask = jnp.arange(16)[None, :].repeat(2, 0) < 12
  gates, padded_gates = jax.nn.softmax(noisy), jax.nn.softmax(padded_noisy)
  top1, padded_top1 = jnp.argmax(gates, -1), jnp.argmax(padded_gates, -1)
  pairs = [
    (
      losses.load_balancing_loss(gates, top1),
      losses.load_balancing_loss(padded_gates, padded_top1, mask),
    ),
    (losses.importance_loss(gates), losses.importance_loss(padded_gates, mask)),
    (
      losses.load_loss(logits, noisy, 0.25, 1),
      losses.load_loss(padded, padded_noisy, 0.25, 1, mask),
    ),
    (losses.z_loss(logits), losses.z_loss(padded, mask)),
  ]
  for expected, actual in pairs:
    np.testing.assert_allclose(actual, expected, rtol=1e-5)


def test_losses_are_differentiable():
  logits = jax.random.normal(jax.random.key(0), (2, 16, 4))
  grad = jax.grad(lambda z: losses.importance_loss(jax.nn.softmax(z)) + losses.z_loss(z))(logits)
  assert np.all(np.isfinite(grad)) and float(jnp.abs(grad).sum()) > 0
