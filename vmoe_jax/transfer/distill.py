"""Knowledge distillation: a student trained against a frozen teacher's logits.

Shapes: B examples, L classes. Logits (B, L); labels (B,) integers or (B, L)
target distributions (one-hot, mixup).

The loss (Hinton et al. 2015, "Distilling the Knowledge in a Neural
Network", Sec. 2), all in float32:

  loss = alpha * CE(y, softmax(s)) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T))

with s the student's and t the teacher's logits, y the (label-smoothed)
labels and T the temperature. The soft term is the KL divergence rather than
the cross-entropy H(p_t, q_s): the two differ by the teacher's entropy, a
constant of the student, so the gradients are the same, and the KL is 0 when
the student matches the teacher (a readable metric). It is multiplied by T^2
as Hinton et al. do: the gradient of the soft term shrinks as 1/T^2 for
large T, the factor keeps the balance with the hard term when T changes.
The teacher's logits are under stop_gradient.

`student_from_teacher` starts a dense student from an MoE teacher's non-expert
weights (Fedus et al. 2021, "Switch Transformers", Sec. 5.1 and Table 6:
initialising the distilled dense model with the teacher's non-expert weights
helps).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from vmoe_jax.errors import UserError
from vmoe_jax.transfer import mapping


def _check(temperature, alpha, label_smoothing) -> None:
  """One-line errors for settings out of range (Python numbers; traced values pass)."""
  if isinstance(temperature, numbers.Real) and not temperature > 0:
    raise UserError(
      f'distill temperature={temperature} must be > 0; set --config.distill.temperature '
      '(1 to 10 are usual).'
    )
  if isinstance(alpha, numbers.Real) and not 0 <= alpha <= 1:
    raise UserError(
      f'distill alpha={alpha} must lie in [0, 1] (the weight of the labels term); '
      'set --config.distill.alpha.'
    )
  if isinstance(label_smoothing, numbers.Real) and not 0 <= label_smoothing < 1:
    raise UserError(
      f'label_smoothing={label_smoothing} must lie in [0, 1); '
      'set --config.optimizer.label_smoothing.'
    )


def label_targets(labels: jax.Array, num_classes: int, label_smoothing: float = 0.0):
  """(B,) integers or (B, L) distributions -> (B, L) float32, smoothed towards uniform."""
  if labels.ndim == 1:
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  else:
    targets = labels.astype(jnp.float32)
  return targets * (1.0 - label_smoothing) + label_smoothing / num_classes


def distillation_loss_per_example(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  labels: jax.Array,
  *,
  temperature: float,
  alpha: float,
  label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-example distillation loss (B,) and its parts, each (B,) float32.

  Parts: 'hard_xent' CE(y, softmax(s)); 'soft_kl' KL(softmax(t/T) ||
  softmax(s/T)) (not scaled by T^2); 'agreement' 1.0 where the student's
  top class is the teacher's.
  """
  _check(temperature, alpha, label_smoothing)
  if student_logits.shape != teacher_logits.shape:
    raise UserError(
      f'distillation: the student has logits {student_logits.shape}, the teacher '
      f'{teacher_logits.shape}; use a teacher trained on the same classes.'
    )
  s = student_logits.astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  targets = label_targets(labels, s.shape[-1], label_smoothing)
  hard = -jnp.sum(targets * jax.nn.log_softmax(s), axis=-1)
  log_p = jax.nn.log_softmax(t / temperature)
  log_q = jax.nn.log_softmax(s / temperature)
  soft = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  loss = alpha * hard + (1.0 - alpha) * temperature**2 * soft
  agreement = (jnp.argmax(s, -1) == jnp.argmax(t, -1)).astype(jnp.float32)
  return loss, {'hard_xent': hard, 'soft_kl': soft, 'agreement': agreement}


def distillation_loss(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  labels: jax.Array,
  *,
  temperature: float,
  alpha: float,
  label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The batch mean of `distillation_loss_per_example`: (scalar loss, scalar metrics).

  Metrics: 'loss', 'hard_xent', 'soft_kl' (unscaled KL at temperature T) and
  'agreement' (share of examples whose top class is the teacher's).
  """
  loss, parts = distillation_loss_per_example(
    student_logits,
    teacher_logits,
    labels,
    temperature=temperature,
    alpha=alpha,
    label_smoothing=label_smoothing,
  )
  loss = jnp.mean(loss)
  return loss, {'loss': loss, **{k: jnp.mean(v) for k, v in parts.items()}}


def student_from_teacher(
  teacher_params: Mapping,
  student_params: Mapping,
  *,
  moe_to_dense: str = 'fresh',
  source_grid: tuple[int, int] | None = None,
  target_grid: tuple[int, int] | None = None,
) -> tuple[dict, mapping.Report]:
  """The student's initial parameters from the teacher's: (params, report).

  Every student array whose path and shape the teacher has is copied; the
  rest keeps the student's init ('fresh'). `mapping.init_params` with
  `lenient=True` does the work, so its other rules hold too: a new head is
  zeroed, pos_embedding is resized, and dense teacher MLPs are upcycled into
  a sparse student's experts.

  A dense student MLP where the teacher has an MoE (`moe_to_dense`):
    'fresh' (default): keep the student's init, as Switch Transformers
      (Fedus et al. 2021) reuse only the non-expert weights. Independently
      initialised experts do not share hidden units, so their weights do not
      average into a meaningful MLP.
    'expert_mean': the mean of the experts' wi, bi, wo, bo, which makes sense
      when the experts share an origin (a teacher upcycled from a dense model
      and not trained far from it).
  """
  return mapping.init_params(
    teacher_params,
    student_params,
    source_grid=source_grid,
    target_grid=target_grid,
    moe_to_dense=moe_to_dense,
    lenient=True,
  )
