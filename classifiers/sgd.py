"""A linear head trained incrementally: standardization and SGD, both by partial_fit.

It can learn from blocks of rows it never holds together, which is what memory-bounded
training needs: one pass over the blocks for the feature means and variances, then epochs of
stochastic gradient descent over the blocks in a shuffled order.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import SGDClassifier
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

LOSSES = ("log_loss", "modified_huber")  # the losses with predict_proba

Blocks = Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]]


class SGDHead(ClassifierMixin, BaseEstimator):
    """Standardized features → SGDClassifier (logistic loss by default, averaged SGD)."""

    def __init__(self, loss: str = "log_loss", alpha: float = 1e-4, epochs: int = 5,
                 batch_size: int = 1024, average: bool = True, random_state: int = 0) -> None:
        self.loss = loss
        self.alpha = alpha
        self.epochs = epochs
        self.batch_size = batch_size
        self.average = average
        self.random_state = random_state

    def _new_model(self) -> SGDClassifier:
        if self.loss not in LOSSES:
            raise ValueError(f"Expected loss in {LOSSES}. Received: loss={self.loss!r}")
        if int(self.epochs) < 1 or int(self.batch_size) < 1:
            raise ValueError(f"Expected epochs and batch_size >= 1. Received: {self.epochs}, {self.batch_size}")
        return SGDClassifier(loss=self.loss, alpha=float(self.alpha), average=bool(self.average),
                             random_state=int(self.random_state))

    def fit(self, X: Any, y: Any) -> "SGDHead":
        """Fit on in-memory features: `epochs` shuffled passes of mini-batches."""
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        classes = np.unique(y)
        rng = check_random_state(self.random_state)
        size = int(self.batch_size)

        def batches(epoch: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
            order = rng.permutation(len(X))
            for start in range(0, len(X), size):
                rows = order[start:start + size]
                yield X[rows], y[rows]

        self.scaler_ = StandardScaler().fit(X)
        return self._train(batches, classes)

    def fit_blocks(self, blocks: Blocks, classes: np.ndarray, n_features: int) -> "SGDHead":
        """Fit from blocks of rows: `blocks(epoch)` yields (X, y) blocks, a new order per epoch.

        `blocks(-1)` is read once for the scaler's statistics; epochs are 0, 1, ...
        """
        self.n_features_in_ = int(n_features)
        self.scaler_ = StandardScaler()
        for X, _ in blocks(-1):
            self.scaler_.partial_fit(X)
        return self._train(blocks, np.asarray(classes))

    def _train(self, blocks: Blocks, classes: np.ndarray) -> "SGDHead":
        self.model_ = self._new_model()
        for epoch in range(int(self.epochs)):
            for X, y in blocks(epoch):
                self.model_.partial_fit(self.scaler_.transform(X), y, classes=classes)
        self.classes_ = self.model_.classes_
        self.n_iter_ = int(self.epochs)
        return self

    def partial_fit(self, X: Any, y: Any, classes: Any = None) -> "SGDHead":
        """One incremental step; the first call needs `classes` (all the labels there will be)."""
        first = not hasattr(self, "model_")
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], reset=first)
        check_classification_targets(y)
        if first:
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit.")
            self.scaler_ = StandardScaler()
            self.model_ = self._new_model()
        self.scaler_.partial_fit(X)
        self.model_.partial_fit(self.scaler_.transform(X), y, classes=classes)
        self.classes_ = self.model_.classes_
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return self.model_.decision_function(self.scaler_.transform(X))

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, columns in the order of `classes_`."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return self.model_.predict_proba(self.scaler_.transform(X))

    def predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return self.model_.predict(self.scaler_.transform(X))
