"""Few-shot linear evaluation on frozen pre-logit features (closed-form ridge regression).

The linear few-shot evaluation of V-MoE (Riquelme et al. 2021, "Scaling
Vision with Sparse Mixture of Experts") and Scaling Vision Transformers (Zhai
et al. 2022): take k labelled train images per class, fit a
linear classifier to their frozen pre-logits by least squares with an L2
penalty, and report its accuracy on the test set, for k in e.g. {1, 5, 10}.

Axis letters: N examples, D feature width, L classes, R L2 values swept.

The fit (`fit_ridge`): features are centred on the mean of the k*L fit
examples and divided by one scalar, their root-mean-square (so that the L2
sweep means the same for every model; per-feature standardisation from k*L
examples amplifies features that barely vary, see `scaling`); targets are
one-hot in {-1, 1}; the bias is not penalised (targets are centred too).
For each L2 value l,

  W(l) = (X^T X + l I)^{-1} X^T Y = V diag(s / (s^2 + l)) U^T Y,   X = U diag(s) V^T,

so one thin SVD serves the whole sweep.

Choosing the L2 (`fewshot_accuracy`): the reported accuracy uses, per trial,
the L2 that is most accurate on held-out train examples (up to
`val_per_class` per class, disjoint from the shots), so the test set never
picks a hyper-parameter. Also reported, for comparison with big_vision-style
numbers: the best test accuracy over the sweep (`best_over_sweep`), which
is optimistic. Accuracies are averaged over `num_trials` draws of the shots.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from collections.abc import Sequence

import jax
import numpy as np

from vmoe_jax.errors import UserError
from vmoe_jax.runtime import sharding

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- ridge regression


@dataclasses.dataclass
class RidgeClassifier:
  """Linear classifiers for every L2 value of a sweep.

  Attributes:
    mean, scale: (D,) centring and scaling of the features.
    weights: (R, D, L), bias: (R, L), l2_regs: (R,).
  """

  mean: np.ndarray
  scale: np.ndarray
  weights: np.ndarray
  bias: np.ndarray
  l2_regs: np.ndarray

  def scores(self, features: np.ndarray) -> np.ndarray:
    """(N, D) -> (R, N, L) class scores."""
    x = (np.asarray(features, np.float64) - self.mean) / self.scale
    return np.einsum('nd,rdl->rnl', x, self.weights) + self.bias[:, None, :]

  def predict(self, features: np.ndarray) -> np.ndarray:
    """(N, D) -> (R, N) predicted classes, one row per L2 value."""
    return np.argmax(self.scores(features), axis=-1)


def one_hot_targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """(N,) -> (N, L) float64 in {-1, 1}."""
  return 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0


def ridge_weights(x: np.ndarray, y: np.ndarray, l2_regs: Sequence[float]) -> np.ndarray:
  """argmin_W |x W - y|^2 + l |W|^2 for every l: x (N, D), y (N, L) -> (R, D, L).

  Through the thin SVD x = U diag(s) V^T: W(l) = V diag(s / (s^2 + l)) U^T y.
  l = 0 gives the minimum-norm least-squares solution.
  """
  u, s, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  uty = u.T @ np.asarray(y, np.float64)  # (M, L), M = min(N, D).
  out = []
  for l2 in l2_regs:
    if l2 > 0:
      shrink = s / (s * s + l2)
    else:  # Pseudo-inverse; singular values ~0 are left out.
      cutoff = s.max(initial=0.0) * max(x.shape) * np.finfo(np.float64).eps
      shrink = np.divide(1.0, s, out=np.zeros_like(s), where=s > cutoff)
    out.append(vt.T @ (shrink[:, None] * uty))
  return np.stack(out)


def fit_ridge(
  features: np.ndarray,
  labels: np.ndarray,
  num_classes: int,
  l2_regs: Sequence[float],
  scaling: str = 'global',
) -> RidgeClassifier:
  """Ridge regression onto {-1, 1} one-hot targets with an unpenalised bias.

  Args:
    features: (N, D) frozen features of the fit examples.
    labels: (N,) int classes.
    num_classes: L.
    l2_regs: the R penalties to fit.
    scaling: 'global' divides the centred features by their root-mean-square
      (one scalar), 'feature' each feature by its standard deviation
      (constant ones left alone), 'none' leaves them; features are centred
      in any case, for the bias.
  """
  x = np.asarray(features, np.float64)
  y = one_hot_targets(labels, num_classes)
  mean = x.mean(axis=0)
  xc = x - mean
  if scaling == 'global':
    rms = np.sqrt(np.mean(xc * xc))
    scale = np.full(x.shape[1], rms if rms > 0 else 1.0)
  elif scaling == 'feature':
    std = xc.std(axis=0)
    scale = np.where(std > 0, std, 1.0)
  elif scaling == 'none':
    scale = np.ones(x.shape[1])
  else:
    raise ValueError(f"scaling={scaling!r}; use 'global', 'feature' or 'none'.")
  xc = xc / scale
  y_mean = y.mean(axis=0)
  weights = ridge_weights(xc, y - y_mean, l2_regs)
  bias = np.broadcast_to(y_mean, (len(l2_regs), num_classes)).copy()
  return RidgeClassifier(mean, scale, weights, bias, np.asarray(l2_regs, np.float64))


# --------------------------------------------------------------------------- shots


def sample_shots(
  labels: np.ndarray,
  num_classes: int,
  shots: int,
  val_per_class: int,
  rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
  """Indices of `shots` fit examples and up to `val_per_class` held-out ones per class.

  Per class, a random permutation of its examples gives the first `shots` to
  fitting and the next `val_per_class` to validation (disjoint). Both are
  sorted by class, then by draw order.

  Raises:
    ValueError: a class has fewer than `shots` examples.
  """
  labels = np.asarray(labels)
  fit, val = [], []
  for label in range(num_classes):
    members = np.flatnonzero(labels == label)
    if len(members) < shots:
      raise ValueError(f'class {label} has {len(members)} examples, fewer than {shots} shots.')
    order = rng.permutation(members)
    fit.append(order[:shots])
    val.append(order[shots : shots + val_per_class])
  return np.concatenate(fit), np.concatenate(val)


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """(R, N), (N,) -> (R,) accuracy per L2 value (0 when there are no examples)."""
  if predictions.shape[-1] == 0:
    return np.zeros(predictions.shape[0])
  return np.mean(predictions == np.asarray(labels)[None], axis=-1)


def fewshot_accuracy(
  train_features: np.ndarray,
  train_labels: np.ndarray,
  test_features: np.ndarray,
  test_labels: np.ndarray,
  num_classes: int,
  shots: Iterable[int],
  l2_regs: Sequence[float],
  seed: int = 0,
  num_trials: int = 5,
  val_per_class: int = 20,
) -> dict[int, dict]:
  """Test accuracy of k-shot ridge classifiers, for every k in `shots`.

  Returns:
    {k: {'accuracy': mean over trials (L2 chosen on held-out train examples),
         'accuracy_std': its standard deviation over trials,
         'l2': the chosen L2 of each trial,
         'accuracy_by_l2': mean test accuracy of every L2 of the sweep,
         'best_over_sweep': the largest of those (optimistic),
         'num_trials': trials run}}
    Shot counts that some class cannot supply are left out (with a warning).
  """
  out = {}
  for k in shots:
    test_acc, chosen = [], []
    for trial in range(num_trials):
      rng = np.random.default_rng([seed, k, trial])
      try:
        fit_idx, val_idx = sample_shots(train_labels, num_classes, k, val_per_class, rng)
      except ValueError as e:
        log.warning('few-shot: %d-shot left out: %s', k, e)
        break
      clf = fit_ridge(train_features[fit_idx], train_labels[fit_idx], num_classes, l2_regs)
      val_acc = _accuracy(clf.predict(train_features[val_idx]), train_labels[val_idx])
      # Most accurate on held-out examples; ties go to the strongest penalty.
      best = len(l2_regs) - 1 - int(np.argmax(val_acc[::-1]))
      acc = _accuracy(clf.predict(test_features), test_labels)
      test_acc.append(acc)
      chosen.append(best)
    if not test_acc:
      continue
    test_acc = np.stack(test_acc)  # (trials, R)
    picked = test_acc[np.arange(len(chosen)), chosen]
    by_l2 = test_acc.mean(axis=0)
    out[k] = {
      'accuracy': float(picked.mean()),
      'accuracy_std': float(picked.std()),
      'l2': [float(l2_regs[i]) for i in chosen],
      'accuracy_by_l2': [float(a) for a in by_l2],
      'best_over_sweep': float(by_l2.max()),
      'num_trials': len(chosen),
    }
  return out


# --------------------------------------------------------------------------- features


def make_feature_fn(model, mesh):
  """Jitted (params, batch) -> (pre-logits (B, D), labels (B,), mask (B,)), replicated.

  The outputs are replicated on every device, so every process of a
  multi-process run can read all of them.
  """

  def features(params, batch):
    _, extras = model.apply({'params': params}, batch['image'], train=False)
    return extras['pre_logits'], batch['label'], batch['mask']

  return jax.jit(features, out_shardings=sharding.replicated(mesh))


def collect_features(feature_fn, params, batches, mesh) -> tuple[np.ndarray, np.ndarray]:
  """Pre-logits (N, D) float32 and labels (N,) of the valid rows of padded batches."""
  features, labels = [], []
  for batch in batches:
    out_features, out_labels, mask = jax.device_get(
      feature_fn(params, sharding.global_batch(batch, mesh))
    )
    valid = np.asarray(mask) > 0
    features.append(np.asarray(out_features, np.float32)[valid])
    labels.append(np.asarray(out_labels)[valid])
  return np.concatenate(features), np.concatenate(labels)


def evaluate(feature_fn, params, dataset, mesh, config) -> dict[int, dict]:
  """`fewshot_accuracy` on the features of `dataset` (train rows bounded by the config).

  Args:
    feature_fn: from `make_feature_fn`.
    params: the model parameters, on `mesh`.
    dataset: a `vmoe_jax.data.dataset.Dataset`.
    config: the `config.fewshot` section (shots, l2_regs, seed, num_trials,
      val_per_class, max_train_examples).
  """
  if dataset.train_eval_batches is None:
    raise UserError(
      f'dataset {dataset.name!r} has no train_eval_batches for few-shot features; set '
      '--config.fewshot.every=-1.'
    )
  train_x, train_y = collect_features(
    feature_fn, params, dataset.train_eval_batches(config.max_train_examples), mesh
  )
  test_x, test_y = collect_features(feature_fn, params, dataset.eval_batches(), mesh)
  return fewshot_accuracy(
    train_x,
    train_y,
    test_x,
    test_y,
    dataset.num_classes,
    shots=tuple(config.shots),
    l2_regs=tuple(config.l2_regs),
    seed=config.seed,
    num_trials=config.num_trials,
    val_per_class=config.val_per_class,
  )


def as_metrics(results: dict[int, dict]) -> dict[str, float]:
  """{'fewshot/1shot': accuracy, ...} for the metric writer."""
  return {f'fewshot/{k}shot': r['accuracy'] for k, r in results.items()}


def evaluate_metrics(feature_fn, params, dataset, mesh, config, step: int) -> dict[str, float]:
  """`evaluate` as metrics {'fewshot/{k}shot': accuracy}, logged (the training hook)."""
  metrics = as_metrics(evaluate(feature_fn, params, dataset, mesh, config))
  log.info(
    'step %d  few-shot %s',
    step,
    '  '.join(f'{k.split("/")[1]} {v:.4f}' for k, v in metrics.items()),
  )
  return metrics
