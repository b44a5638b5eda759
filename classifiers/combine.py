"""Combining the class probabilities of several heads: the ensemble as a scikit-learn estimator.

Its input is the members' probabilities side by side, X = [P_1 | P_2 | ... | P_m] with
n_members blocks of n_classes columns each, always of rows no member was trained on (the
validation split). Three methods:

- `greedy` (default): Caruana et al. (2004) forward selection with replacement; each round
  adds the member that most improves the validation log-loss of the running average, and the
  ensemble keeps the best round. The weights are how often each member was picked.
- `vote`: soft voting with weights on the simplex that minimize the validation log-loss.
- `stack`: a logistic-regression meta-learner on the members' log-probabilities. Its own
  validation figures are out-of-fold (K folds over the rows): no row is scored by a
  meta-learner that saw it.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

METHODS = ("greedy", "vote", "stack")
EPS = 1e-7


def log_loss_of(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-probability of the true classes."""
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], EPS, 1.0))))


class EnsembleHead(ClassifierMixin, BaseEstimator):
    """Weights (greedy, vote) or a meta-learner (stack) over members' probabilities."""

    def __init__(self, n_members: int = 2, *, method: str = "greedy", rounds: int = 50,
                 folds: int = 5, C: float = 1.0, random_state: int = 0) -> None:
        self.n_members = n_members
        self.method = method
        self.rounds = rounds
        self.folds = folds
        self.C = C
        self.random_state = random_state

    def _members(self, X: np.ndarray) -> np.ndarray:
        """X (n, m·C) as an array (m, n, C)."""
        n, width = X.shape
        m = int(self.n_members)
        return X.reshape(n, m, width // m).transpose(1, 0, 2)

    def fit(self, X: Any, y: Any) -> "EnsembleHead":
        """Choose weights or fit the meta-learner on validation probabilities X and labels y
        (the class indices 0..C-1 of each member's C probability columns)."""
        if self.method not in METHODS:
            raise ValueError(f"Expected method in {METHODS}. Received: {self.method!r}")
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        m = int(self.n_members)
        if m < 1 or X.shape[1] % m:
            raise ValueError(f"X has {X.shape[1]} columns, not n_members={m} equal blocks.")
        n_classes = X.shape[1] // m
        if not np.isin(y, np.arange(n_classes)).all():
            raise ValueError(f"y must hold class indices 0..{n_classes - 1}: X has n_features="
                             f"{X.shape[1]}, n_members={m} blocks of one probability column "
                             "per class.")
        self.classes_ = np.arange(n_classes)
        y = np.asarray(y, dtype=int)
        members = self._members(X)
        if self.method == "greedy":
            self.weights_, self.picks_ = greedy_selection(members, y, int(self.rounds))
        elif self.method == "vote":
            self.weights_ = vote_weights(members, y)
        else:
            self.weights_ = np.full(m, 1.0 / m)
            features = np.log(np.clip(X, EPS, 1.0))
            folds = KFold(int(self.folds), shuffle=True, random_state=int(self.random_state))
            with warnings.catch_warnings():  # a fold may lack a class: cross_val_predict gives
                # that class probability 0 in the fold's rows and says so; that is intended here
                warnings.filterwarnings("ignore", "Number of classes in training fold",
                                        RuntimeWarning)
                # the meta-learner's lbfgs stopping at max_iter is not the user's to act on
                # (its out-of-fold score is what the ensemble reports)
                warnings.filterwarnings("ignore", category=ConvergenceWarning)
                oof = cross_val_predict(self._meta(), features, y, cv=folds,
                                        method="predict_proba")
                self.meta_ = self._meta().fit(features, y)
            self.oof_proba_ = self._spread(oof, np.unique(y), n_classes)
        return self

    def _meta(self) -> LogisticRegression:
        return LogisticRegression(C=float(self.C), max_iter=1000, random_state=int(self.random_state))

    @staticmethod
    def _spread(proba: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
        full = np.zeros((len(proba), n_classes))
        full[:, classes] = proba
        return full

    def validation_proba(self, X: Any) -> np.ndarray:
        """Probabilities for the rows fitted on, as honest as the method allows (stack: out-of-fold)."""
        check_is_fitted(self)
        return self.oof_proba_ if self.method == "stack" else self.predict_proba(X)

    def predict_proba(self, X: Any) -> np.ndarray:
        """The ensemble's class probabilities."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        if self.method == "stack":
            proba = self.meta_.predict_proba(np.log(np.clip(X, EPS, 1.0)))
            return self._spread(proba, self.meta_.classes_, len(self.classes_))
        return np.tensordot(self.weights_, self._members(X), axes=1)

    def predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def greedy_selection(members: np.ndarray, y: np.ndarray, rounds: int
                     ) -> tuple[np.ndarray, list[int]]:
    """Caruana's forward selection with replacement; returns (weights, members picked in order)."""
    m = members.shape[0]
    counts = np.zeros(m)
    total = np.zeros(members.shape[1:])
    picks: list[int] = []
    best_loss, best_counts, best_picks = np.inf, counts.copy(), picks
    for step in range(1, max(1, rounds) + 1):
        losses = [log_loss_of((total + members[j]) / step, y) for j in range(m)]
        choice = int(np.argmin(losses))
        counts[choice] += 1
        total += members[choice]
        picks = picks + [choice]
        if losses[choice] < best_loss - 1e-12:
            best_loss, best_counts, best_picks = losses[choice], counts.copy(), picks
    return best_counts / best_counts.sum(), best_picks


def vote_weights(members: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Simplex weights minimizing the log-loss of the weighted average (softmax-parametrized)."""
    m = members.shape[0]

    def loss(theta: np.ndarray) -> float:
        return log_loss_of(np.tensordot(softmax(theta), members, axes=1), y)

    result = minimize(loss, np.zeros(m), method="L-BFGS-B")
    return softmax(result.x)


def describe(estimator: EnsembleHead) -> dict[str, Any]:
    """The fitted ensemble's weights (and picks), as plain JSON values."""
    facts: dict[str, Any] = {"weights": [round(float(w), 4) for w in estimator.weights_]}
    if hasattr(estimator, "picks_"):
        facts["picks"] = [int(p) for p in estimator.picks_]
    return facts
