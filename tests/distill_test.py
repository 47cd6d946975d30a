"""Distillation loss with numbers checkable by hand, and a dense student from an MoE teacher."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vmoe_jax.errors import UserError
from vmoe_jax.models import vit
from vmoe_jax.moe.spec import MoeSpec
from vmoe_jax.transfer import distill
from vmoe_jax.transfer import mapping

LOGITS = jax.random.normal(jax.random.key(0), (6, 5)) * 2
TEACHER = jax.random.normal(jax.random.key(1), (6, 5)) * 3
LABELS = jnp.array([0, 1, 2, 3, 4, 0])


def loss_fn(s, t, labels=LABELS, **kwargs):
  return distill.distillation_loss(s, t, labels, **kwargs)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_alpha_one_is_plain_cross_entropy(smoothing):
  loss, metrics = loss_fn(LOGITS, TEACHER, temperature=3.0, alpha=1.0, label_smoothing=smoothing)
  targets = optax.smooth_labels(jax.nn.one_hot(LABELS, 5), smoothing)
  expected = optax.softmax_cross_entropy(LOGITS, targets).mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics['hard_xent'], expected, rtol=1e-6)


@pytest.mark.parametrize('temperature', [0.5, 1.0, 4.0, 20.0])
def test_student_equal_to_teacher_has_no_soft_term(temperature):
  loss, metrics = loss_fn(TEACHER, TEACHER, temperature=temperature, alpha=0.0)
  assert abs(float(loss)) < 1e-5 and abs(float(metrics['soft_kl'])) < 1e-6
  assert float(metrics['agreement']) == 1.0


def test_soft_term_by_hand():
  # Teacher [log 3, 0] -> p = (3/4, 1/4) at T=1; the student [0, 0] -> q = (1/2, 1/2).
  s, t = jnp.zeros((1, 2)), jnp.array([[math.log(3.0), 0.0]])
  kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # 0.130812
  loss, metrics = loss_fn(s, t, jnp.array([0]), temperature=1.0, alpha=0.0)
  np.testing.assert_allclose([loss, metrics['soft_kl']], [kl, kl], rtol=1e-5)
  # T = 2: p = (sqrt 3, 1) / (sqrt 3 + 1), q still uniform; the loss is 2^2 KL.
  p = np.array([math.sqrt(3.0), 1.0]) / (math.sqrt(3.0) + 1)
  kl2 = float(np.sum(p * np.log(2 * p)))
  loss, metrics = loss_fn(s, t, jnp.array([0]), temperature=2.0, alpha=0.0)
  np.testing.assert_allclose([loss, metrics['soft_kl']], [4 * kl2, kl2], rtol=1e-5)
  # The mixture: alpha CE + (1 - alpha) T^2 KL, CE = log 2 for the uniform student.
  loss, _ = loss_fn(s, t, jnp.array([0]), temperature=2.0, alpha=0.25)
  np.testing.assert_allclose(loss, 0.25 * math.log(2) + 0.75 * 4 * kl2, rtol=1e-5)


def test_t_squared_keeps_the_gradient_scale_at_high_temperature():
  # d/ds [T^2 KL] = T (q_T - p_T) -> ((s - mean s) - (t - mean t)) / L as T grows (Hinton Sec. 2.1).
  s = jnp.array([[0.5, -0.2, 0.1, -0.4]])
  t = jnp.array([[1.0, 0.3, -0.6, -0.7]])
  expected = ((s - s.mean()) - (t - t.mean())) / 4
  for temperature in (100.0, 1000.0):  # The same gradient at either T: the T^2 factor.
    soft = lambda s: loss_fn(s, t, jnp.array([0]), temperature=temperature, alpha=0.0)[0]
    # What is left of the limit is O(1/T).
    np.testing.assert_allclose(jax.grad(soft)(s), expected, atol=0.1 / temperature + 1e-4)
  assert np.abs(np.asarray(expected)).max() > 0.05


def test_the_teacher_gets_no_gradient():
  grad = jax.grad(lambda t: loss_fn(LOGITS, t, temperature=2.0, alpha=0.5)[0])(TEACHER)
  np.testing.assert_array_equal(grad, np.zeros_like(grad))


def test_per_example_version_and_soft_labels():
  kwargs = dict(temperature=2.0, alpha=0.3, label_smoothing=0.1)
  per, parts = distill.distillation_loss_per_example(LOGITS, TEACHER, LABELS, **kwargs)
  assert per.shape == (6,) and all(v.shape == (6,) for v in parts.values())
  loss, metrics = loss_fn(LOGITS, TEACHER, **kwargs)
  np.testing.assert_allclose(loss, per.mean(), rtol=1e-6)
  assert sorted(metrics) == ['agreement', 'hard_xent', 'loss', 'soft_kl']
  # One-hot labels (B, L) give the integer labels' loss.
  one_hot, _ = loss_fn(LOGITS, TEACHER, jax.nn.one_hot(LABELS, 5), **kwargs)
  np.testing.assert_allclose(one_hot, loss, rtol=1e-6)
  # Float32 whatever the logits' dtype.
  low, _ = loss_fn(LOGITS.astype(jnp.bfloat16), TEACHER.astype(jnp.bfloat16), **kwargs)
  assert low.dtype == jnp.float32


def test_bad_settings_are_one_line_errors():
  with pytest.raises(
    UserError, match=r'distill temperature=0.0 must be > 0; set --config\.distill'
  ):
    loss_fn(LOGITS, TEACHER, temperature=0.0, alpha=0.5)
  with pytest.raises(UserError, match=r'distill alpha=1.5 must lie in \[0, 1\]'):
    loss_fn(LOGITS, TEACHER, temperature=1.0, alpha=1.5)
  with pytest.raises(UserError, match=r'the student has logits \(6, 5\), the teacher \(6, 3\)'):
    loss_fn(LOGITS, TEACHER[:, :3], temperature=1.0, alpha=0.5)


# --------------------------------------------------------------------------- student init


def make_vit(**kwargs):
  settings = dict(num_classes=5, patch_size=4, width=16, depth=4, num_heads=2, mlp_dim=32)
  return vit.ViT(**{**settings, **kwargs})


def init(model, seed=0):
  """Random parameters of the model's shapes (by tracing; nothing compiles)."""
  variables = jax.eval_shape(
    lambda: model.init({'params': jax.random.key(0)}, jnp.zeros((1, 8, 8, 3)), train=False)
  )
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: rng.normal(size=x.shape).astype(x.dtype), nn.meta.unbox(variables['params'])
  )


TEACHER_VIT = make_vit(moe=MoeSpec(num_experts=4, layers=(1, 3), mlp_dim=32, group_size=0))


def test_dense_student_gets_the_non_expert_weights():
  teacher, student = init(TEACHER_VIT), init(make_vit(), seed=1)
  params, report = distill.student_from_teacher(teacher, student)
  flat, t, s = (mapping.flatten(x) for x in (params, teacher, student))
  for path, value in flat.items():
    if path.startswith(('block_01/mlp/', 'block_03/mlp/')):
      np.testing.assert_array_equal(value, s[path], err_msg=path)  # Fresh.
    else:
      np.testing.assert_array_equal(value, t[path], err_msg=path)  # Copied.
  line = mapping.format_report(report, prefix='student_from_teacher')
  assert line.startswith('student_from_teacher: 64 loaded, 8 fresh (block_01/mlp/Dense_0/bias'), (
    line
  )
  assert '10 unused (block_01/moe/bi' in line, line


def test_expert_mean_student():
  teacher, student = init(TEACHER_VIT), init(make_vit(), seed=1)
  params, report = distill.student_from_teacher(teacher, student, moe_to_dense='expert_mean')
  np.testing.assert_allclose(
    params['block_01']['mlp']['Dense_0']['kernel'],
    teacher['block_01']['moe']['wi'].mean(0),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    params['block_03']['mlp']['Dense_1']['bias'],
    teacher['block_03']['moe']['bo'].mean(0),
    rtol=1e-6,
  )
  assert {e.path: e.action for e in report}['block_01/mlp/Dense_1/kernel'] == 'averaged'


def test_smaller_student_copies_what_has_the_same_path_and_shape():
  teacher = init(TEACHER_VIT)
  student = init(make_vit(depth=2, mlp_dim=48), seed=1)  # Shallower, other MLP width.
  params, report = distill.student_from_teacher(teacher, student)
  got = {e.path: e.action for e in report if e.action != 'unused'}
  assert got['block_00/attention/query/kernel'] == 'loaded'
  assert got['block_00/mlp/Dense_0/kernel'] == 'fresh'  # (16, 32) into (16, 48).
  np.testing.assert_array_equal(
    params['block_00']['mlp']['Dense_0']['kernel'], student['block_00']['mlp']['Dense_0']['kernel']
  )
  unused = {e.path for e in report if e.action == 'unused'}
  assert 'block_03/moe/wi' in unused and 'block_02/attention/query/kernel' in unused
