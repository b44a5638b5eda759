"""Fitting scikit-learn's histogram gradient boosting with progress and sensible threads.

On small training sets OpenMP's worker threads cost far more than they save (on 2 cores, 400
rows x 256 features: about 10 s on one thread against 90-170 s on two that compete with other
work), so below `THREADED_ROWS` rows the fit runs on one thread. The fit is split into steps of
`STEP` iterations with warm_start, so a progress bar can follow it; the model is the one a
single call to fit makes.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

#: From this many training rows on, boosting uses every core (scikit-learn's own early-stopping
#: threshold is 10,000 rows too).
THREADED_ROWS = 10_000
STEP = 10


def fit_boosting(estimator: Any, X: np.ndarray, y: np.ndarray, progress: bool = True) -> Any:
    """Fit a HistGradientBoostingClassifier in steps of STEP iterations, showing progress."""
    from tqdm import tqdm

    total = int(estimator.get_params()["max_iter"])
    threads = None if len(X) >= THREADED_ROWS else 1
    bar = tqdm(total=total, unit="iter", desc="hgb", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, leave=False)
    try:
        with threadpool_limits(threads, user_api="openmp"):
            done = 0
            estimator.set_params(warm_start=True)
            while done < total:
                estimator.set_params(max_iter=min(total, done + STEP))
                estimator.fit(X, y)
                stopped = estimator.n_iter_ < estimator.get_params()["max_iter"]
                bar.update(estimator.n_iter_ - done)
                done = estimator.n_iter_
                if stopped:  # early stopping ended it
                    break
    finally:
        estimator.set_params(max_iter=total, warm_start=False)
        bar.close()
    return estimator
