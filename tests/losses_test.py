"""Auxiliary losses against hand-worked values."""

import jax
import jax.numpy as jnp
import numpy as np
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
  # Expert 0 is chosen: threshold = 2nd largest noisy = 0.3 -> Phi(1 - 0.3).
  # Experts 1, 2 not chosen: threshold = largest noisy = 1.2.
  p = np.array([norm.cdf(0.7), norm.cdf(-1.2), norm.cdf(-2.2)])
  expected = p.var() / p.mean() ** 2
  np.testing.assert_allclose(losses.load_loss(logits, noisy, 1.0, 1), expected, rtol=1e-5)
  assert float(losses.load_loss(logits, noisy, 0.0, 1)) == 0.0


def test_losses_are_differentiable():
  logits = jax.random.normal(jax.random.key(0), (2, 16, 4))
  grad = jax.grad(lambda z: losses.importance_loss(jax.nn.softmax(z)) + losses.z_loss(z))(logits)
  assert np.all(np.isfinite(grad)) and float(jnp.abs(grad).sum()) > 0
