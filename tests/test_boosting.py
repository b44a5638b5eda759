"""Histogram gradient boosting fitted in steps (for progress) is the model one fit makes."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier
from threadpoolctl import threadpool_limits

from classifiers.boosting import fit_boosting


@pytest.mark.parametrize("rows, classes, early", [(300, 4, "auto"), (1_500, 3, True)])
def test_stepwise_fit_equals_one_fit(rows: int, classes: int, early) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, 12)).astype(np.float32)
    y = (X[:, 0] * 2 + rng.normal(size=rows) > 0).astype(int) + rng.integers(0, classes - 1, rows)
    settings = dict(max_iter=35, random_state=0, early_stopping=early)
    with threadpool_limits(1, user_api="openmp"):  # the same numbers, without thread contention
        one = HistGradientBoostingClassifier(**settings).fit(X, y)
    stepped = fit_boosting(HistGradientBoostingClassifier(**settings), X, y, progress=False)
    assert stepped.n_iter_ == one.n_iter_
    np.testing.assert_array_equal(stepped.predict_proba(X), one.predict_proba(X))
    assert stepped.get_params()["max_iter"] == 35 and not stepped.get_params()["warm_start"]
