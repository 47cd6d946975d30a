"""Few-shot ridge regression: closed form against lstsq, shot sampling, accuracy."""

import numpy as np
import pytest

from vmoe_jax.evaluation import fewshot


def _lstsq_ridge(x, y, l2, bias):
  """Ridge by least squares on the augmented system [x 1; sqrt(l2) I 0] [W; b] = [y; 0]."""
  n, d = x.shape
  cols = [x, np.ones((n, 1))] if bias else [x]
  top = np.concatenate(cols, axis=1)
  penalty = np.sqrt(l2) * np.eye(d, top.shape[1])  # The bias column is not penalised.
  a = np.concatenate([top, penalty])
  b = np.concatenate([y, np.zeros((d, y.shape[1]))])
  solution = np.linalg.lstsq(a, b, rcond=None)[0]
  return (solution[:d], solution[d]) if bias else (solution, None)


def test_hand_worked_one_feature():
  # x = [-1, 1] (centred), targets {-1, 1}: class 0 -> [1, -1], class 1 -> [-1, 1].
  # W = (x^T x + l)^-1 x^T y = [-2, 2] / (2 + l): [-1, 1] at l=0, [-0.5, 0.5] at l=2.
  clf = fewshot.fit_ridge(
    np.array([[-1.0], [1.0]]), np.array([0, 1]), 2, [0.0, 2.0], scaling='none'
  )
  np.testing.assert_allclose(clf.weights[0], [[-1.0, 1.0]])
  np.testing.assert_allclose(clf.weights[1], [[-0.5, 0.5]])
  np.testing.assert_allclose(clf.bias, np.zeros((2, 2)), atol=1e-12)
  np.testing.assert_array_equal(clf.predict(np.array([[-3.0], [0.5]])), [[0, 1], [0, 1]])


@pytest.mark.parametrize('n, d', [(30, 5), (6, 20)])  # More examples than features, and fewer.
def test_ridge_weights_match_lstsq(n, d):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(n, d)), rng.normal(size=(n, 3))
  l2s = [1e-3, 0.5, 10.0]
  weights = fewshot.ridge_weights(x, y, l2s)
  for l2, w in zip(l2s, weights):
    np.testing.assert_allclose(w, _lstsq_ridge(x, y, l2, bias=False)[0], rtol=1e-8, atol=1e-10)
  # l2 = 0 is the minimum-norm least-squares solution.
  np.testing.assert_allclose(
    fewshot.ridge_weights(x, y, [0.0])[0], np.linalg.lstsq(x, y, rcond=None)[0], atol=1e-10
  )


def test_fit_ridge_has_an_unpenalised_bias():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(12, 4)) + 3.0  # Off-centre features.
  labels = np.arange(12) % 3
  clf = fewshot.fit_ridge(x, labels, 3, [0.1, 5.0], scaling='none')
  targets = fewshot.one_hot_targets(labels, 3)
  for r, l2 in enumerate([0.1, 5.0]):
    w, b = _lstsq_ridge(x, targets, l2, bias=True)
    np.testing.assert_allclose(clf.weights[r], w, atol=1e-9)
    # fit_ridge centres x; its bias is for centred x: b_centred = b + mean(x) W.
    np.testing.assert_allclose(clf.bias[r], b + x.mean(axis=0) @ w, atol=1e-9)
    np.testing.assert_allclose(clf.scores(x)[r], x @ w + b, atol=1e-9)


def test_scaling_makes_the_fit_scale_free():
  rng = np.random.default_rng(2)
  x, labels = rng.normal(size=(20, 6)), np.arange(20) % 4
  a = fewshot.fit_ridge(x, labels, 4, [1.0])
  b = fewshot.fit_ridge(1e3 * x + 7.0, labels, 4, [1.0])  # 'global': one scale for all.
  np.testing.assert_allclose(a.scores(x), b.scores(1e3 * x + 7.0), atol=1e-8)
  per_feature = x * np.array([1e3, 1e-2, 1, 5, 7, 0.1])
  a = fewshot.fit_ridge(x, labels, 4, [1.0], scaling='feature')
  b = fewshot.fit_ridge(per_feature, labels, 4, [1.0], scaling='feature')
  np.testing.assert_allclose(a.scores(x), b.scores(per_feature), atol=1e-8)
  with pytest.raises(ValueError, match="scaling='whiten'"):
    fewshot.fit_ridge(x, labels, 4, [1.0], scaling='whiten')


def test_sample_shots():
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
  fit, val = fewshot.sample_shots(labels, 3, 2, 5, np.random.default_rng(0))
  assert list(labels[fit]) == [0, 0, 1, 1, 2, 2]
  assert sorted(labels[val]) == [0, 2, 2]  # What is left: 1, 0 and 2 of each class.
  assert not set(fit) & set(val) and len(set(fit)) == 6
  again = fewshot.sample_shots(labels, 3, 2, 5, np.random.default_rng(0))
  np.testing.assert_array_equal(fit, again[0])
  np.testing.assert_array_equal(val, again[1])
  draws = {
    tuple(fewshot.sample_shots(labels, 3, 1, 0, np.random.default_rng(s))[0]) for s in range(20)
  }
  assert len(draws) > 1  # The seed matters.
  with pytest.raises(ValueError, match='class 1 has 2 examples, fewer than 3 shots'):
    fewshot.sample_shots(labels, 3, 3, 0, np.random.default_rng(0))


def test_fewshot_accuracy_on_separable_features():
  rng = np.random.default_rng(3)
  centres = 5.0 * np.eye(4, 8)

  def draw(n):
    labels = np.arange(n) % 4
    return centres[labels] + 0.3 * rng.normal(size=(n, 8)), labels

  (train_x, train_y), (test_x, test_y) = draw(200), draw(100)
  keep = train_y != 3  # Class 3 keeps a single train example.
  train_x, train_y = np.concatenate([train_x[keep], centres[3:4]]), np.append(train_y[keep], 3)
  out = fewshot.fewshot_accuracy(
    train_x, train_y, test_x, test_y, 4, (1, 5), [0.1, 1.0, 10.0], seed=0, num_trials=3
  )
  assert list(out) == [1]  # Class 3 has a single train example: 5-shot is left out.
  result = out[1]
  assert result['num_trials'] == 3 and len(result['l2']) == 3
  assert len(result['accuracy_by_l2']) == 3
  assert result['accuracy'] == pytest.approx(1.0)
  assert result['best_over_sweep'] >= result['accuracy']
  assert fewshot.as_metrics(out) == {'fewshot/1shot': result['accuracy']}
