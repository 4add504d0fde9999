"""The probe's metrics against sklearn.metrics; the row-span projection against none."""

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, Ridge
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from brainlm_jax.transfer import labels, linear


@pytest.mark.parametrize("n_classes", [2, 3])
def test_classification_scores_match_sklearn(n_classes):
  rng = np.random.default_rng(n_classes)
  classes = [str(c) for c in range(n_classes)]
  y = np.asarray(rng.choice(classes, 60), object)
  pred = np.asarray(rng.choice(classes, 60), object)
  proba = rng.dirichlet(np.ones(n_classes), 60).round(1)  # rounded: many tied scores
  got = labels.score("classification", y, pred, proba, classes)
  assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
  assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred),
                                                   abs=1e-12)
  want_auc = np.mean([skm.roc_auc_score(y == c, proba[:, j]) for j, c in enumerate(classes)])
  assert got["roc_auc"] == pytest.approx(want_auc, abs=1e-12)


def test_classification_edge_cases():
  y = np.asarray(["a", "a", "a"], object)
  pred = np.asarray(["a", "b", "a"], object)  # a predicted class absent from y
  got = labels.score("classification", y, pred, np.full((3, 2), 0.5), ["a", "b"])
  assert got["balanced_accuracy"] == pytest.approx(2 / 3)
  assert np.isnan(got["roc_auc"])  # one class present: no AUC


def test_regression_scores_match_sklearn():
  rng = np.random.default_rng(0)
  y = rng.normal(size=50)
  pred = y + rng.normal(size=50)
  got = labels.score("regression", y, pred, None, [])
  assert got["r2"] == pytest.approx(skm.r2_score(y, pred), abs=1e-12)
  assert got["mae"] == pytest.approx(skm.mean_absolute_error(y, pred), abs=1e-12)
  assert got["pearson_r"] == pytest.approx(np.corrcoef(y, pred)[0, 1], abs=1e-12)
  const = np.ones(5)
  assert labels.score("regression", const, const, None, [])["r2"] == 1.0
  assert labels.score("regression", const, const + 1, None, [])["r2"] == 0.0


def test_row_span_is_lossless_for_l2_models():
  """F > n: the same predictions as the model on every column, at a fraction of the cost."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(40, 300))
  x_te = rng.normal(size=(15, 300))
  y = (x[:, :5].sum(1) > 0).astype(int)
  z = StandardScaler().fit(x)
  span = linear.TrainRowSpan().fit(z.transform(x))
  assert span.basis_.shape == (300, 39)  # the centring removes one direction
  np.testing.assert_allclose(span.basis_.T @ span.basis_, np.eye(39), atol=1e-10)
  np.testing.assert_allclose(span.fit_transform(z.transform(x)), span.transform(z.transform(x)),
                             atol=1e-10)
  for full, proj in [
      (LogisticRegression(C=0.1, max_iter=5000, tol=1e-10), LogisticRegression(
          C=0.1, max_iter=5000, tol=1e-10)),
      (Ridge(alpha=3.0), Ridge(alpha=3.0))]:
    a = make_pipeline(StandardScaler(), full).fit(x, y)
    b = make_pipeline(StandardScaler(), linear.TrainRowSpan(), proj).fit(x, y)
    out = "predict_proba" if hasattr(a, "predict_proba") else "predict"
    np.testing.assert_allclose(getattr(a, out)(x_te), getattr(b, out)(x_te), atol=1e-5)
  zero = linear.TrainRowSpan().fit(np.zeros((4, 10)))
  assert zero.transform(np.ones((2, 10))).shape == (2, 1)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_inner_cv_log_loss_matches_sklearn_scorer(n_classes):
  """The probe's neg-log-loss scorer picks the same penalty with the same inner-CV scores."""
  rng = np.random.default_rng(n_classes)
  x = rng.normal(size=(90, 6))
  y = np.asarray([f"c{v}" for v in (x[:, 0] * 2 + rng.normal(size=90) > 0).astype(int)
                  + (n_classes == 3) * (x[:, 1] > 0.8)], object)
  fits = [LogisticRegressionCV(Cs=linear.LOGISTIC_CS, max_iter=2000, scoring=s,
                               cv=StratifiedKFold(3, shuffle=True, random_state=0)).fit(x, y)
          for s in ("neg_log_loss", linear.neg_log_loss)]
  scores = [np.asarray(list(f.scores_.values())[0] if isinstance(f.scores_, dict) else f.scores_)
            for f in fits]
  np.testing.assert_allclose(scores[0], scores[1], rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(fits[0].C_, fits[1].C_)
  proba = fits[0].predict_proba(x)
  assert linear.neg_log_loss(fits[0], x, y) == pytest.approx(
      -skm.log_loss(y, proba, labels=fits[0].classes_), abs=1e-12)


def test_too_few_subjects_says_where_ids_come_from_and_which_flag_sets_them():
  msg = labels.too_few_subjects(["NAP"] * 12)
  assert msg.startswith("subject-id needs at least 2 subjects; have 1: 'NAP' (12 recordings).")
  assert "file names" in msg and "subject pattern" in msg and "subject column" in msg
  assert "--subject-pattern REGEX" in msg and "'^([^_]+_[^_]+)'" in msg and "\n" not in msg
  many = labels.too_few_subjects({f"s{i}": 1 for i in range(7)}, need=10, what="age")
  assert many.startswith("age needs at least 10 subjects; have 7: 's0' (1 recording), ")
  assert "'s4' (1 recording) and 2 more. " in many and "'s5'" not in many
  assert labels.too_few_subjects([]).startswith("subject-id needs at least 2 subjects; have 0.")
