"""Similarity search on cached features: cosine similarity of whitened, L2-normalised rows.

`SimilaritySpace` whitens a cache's training rows once; `pairs_above` lists every pair at or
above a threshold and `top_k` each query's nearest training rows, both exactly, block by block
(never an N x N matrix; `BLOCK_BYTES` of similarities at a time). numpy's BLAS product and a
threshold was measured as fast as faiss' flat index on 50,000 x 256 rows (bench/results/
audit.md), so there is no extra dependency. The audit (classifiers.audit) and the nearest
training images of new images (classifiers.similar) search with them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

#: Bytes of float32 similarities one block of the search holds (rows x training rows).
BLOCK_BYTES = 64 * 1000**2

Progress = Callable[[str], None]


def quiet(_: str) -> None:
    """A progress function that says nothing."""


#: Whitening's ridge, as a fraction of the largest variance (keeps near-empty directions quiet).
WHITEN_RIDGE = 1e-2
#: Whitening needs this many training rows per feature; with fewer, features are only centred.
WHITEN_MIN_ROWS = 10


@dataclass
class SimilaritySpace:
    """Whitened, L2-normalised training features: cosine similarity is a dot product here.

    Pooled ReLU features are all positive and dominated by a few directions, so raw cosines of
    unrelated images sit near 0.8. Centred and whitened (PCA, variances plus a small ridge),
    unrelated images spread over [-1, 1] while re-encoded, resized or cropped copies stay close:
    on the planted 5,000-image folder whitening cut the false pairs at 90 % recall from about
    250 (centred only) to about 35 (bench/results/audit.md). With fewer than WHITEN_MIN_ROWS
    rows per feature the covariance is too noisy to whiten with, and features are only centred.
    """

    mean: np.ndarray
    basis: np.ndarray  # columns: principal directions, divided by sqrt(variance + ridge)
    train: np.ndarray  # float32, unit rows

    @classmethod
    def of(cls, X_train: np.ndarray) -> "SimilaritySpace":
        """The space of these training rows."""
        return cls.whitening(X_train)[0]

    @classmethod
    def whitening(cls, X_train: np.ndarray) -> tuple["SimilaritySpace", np.ndarray]:
        """The space of these training rows, and the rows whitened (not unit length): the
        whitening is computed once for both."""
        X_train = np.asarray(X_train, dtype=np.float32)
        mean = X_train.mean(axis=0, dtype=np.float64).astype(np.float32)
        if len(X_train) < WHITEN_MIN_ROWS * X_train.shape[1]:  # too few rows for a covariance
            basis = np.eye(X_train.shape[1], dtype=np.float32)
        else:
            covariance = np.zeros((X_train.shape[1],) * 2)
            for start in range(0, len(X_train), 8192):
                centred = X_train[start:start + 8192] - mean
                covariance += (centred.T @ centred).astype(np.float64)
            covariance /= max(1, len(X_train) - 1)
            variances, vectors = np.linalg.eigh(covariance)
            variances = np.maximum(variances, 0.0)
            ridge = WHITEN_RIDGE * max(float(variances.max()), 1e-12)
            basis = (vectors / np.sqrt(variances + ridge)).astype(np.float32)
        space = cls(mean, basis, np.zeros((0, X_train.shape[1]), dtype=np.float32))
        white = space.whiten(X_train)
        space.train = unit_rows(white, 0.0)  # = project(X_train), row by row
        return space, white

    @property
    def kind(self) -> str:
        """'whitened', or 'centred' where there were too few rows to whiten with."""
        return "centred" if np.array_equal(self.basis, np.eye(len(self.basis))) else "whitened"

    def whiten(self, X: np.ndarray, unit: bool = False) -> np.ndarray:
        """Rows centred and whitened (and scaled to unit length with `unit`), float32."""
        X = np.asarray(X, dtype=np.float32)
        out = np.empty((len(X), self.basis.shape[1]), dtype=np.float32)
        shift = self.mean @ self.basis
        for start in range(0, len(X), 8192):
            block = X[start:start + 8192] @ self.basis - shift
            out[start:start + 8192] = unit_rows(block, 0.0) if unit else block
        return out

    def project(self, X: np.ndarray) -> np.ndarray:
        """Rows in the space (centred, whitened, unit length), float32, block by block."""
        return self.whiten(X, unit=True)


def unit_rows(X: np.ndarray, mean: np.ndarray | float) -> np.ndarray:
    """Rows minus `mean`, scaled to unit length (a zero row stays zero), as float32."""
    centred = np.asarray(X, dtype=np.float32) - mean
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return centred / np.maximum(norms, 1e-12)


def block_rows(columns: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Query rows per block so that the block's similarities fit `block_bytes`."""
    return max(16, block_bytes // (4 * max(1, columns)))


def pairs_above(queries: np.ndarray, train: np.ndarray, threshold: float,
                same: bool = False, progress: Progress = quiet, what: str = "rows"
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, train row, similarity) of every pair at or above `threshold`, by blocks.

    With `same` (queries are the training rows), only pairs i < j are searched and returned.
    """
    rows, cols, sims = [], [], []
    step = block_rows(len(train))
    started = time.perf_counter()
    for start in range(0, len(queries), step):
        stop = min(len(queries), start + step)
        offset = start if same else 0
        block = queries[start:stop] @ train[offset:].T
        if same:  # drop j <= i: the diagonal and the lower triangle
            block[np.arange(stop - start)[:, None] >= np.arange(block.shape[1])[None, :]] = -2.0
        r, c = np.nonzero(block >= threshold)
        rows.append(r + start)
        cols.append(c + offset)
        sims.append(block[r, c])
        if time.perf_counter() - started > 5:
            progress(f"  searched {stop:,} of {len(queries):,} {what}")
            started = time.perf_counter()
    if not rows:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims)


def top_k(queries: np.ndarray, train: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, similarities) of each query's k most similar training rows, best first."""
    k = min(k, len(train))
    found_i, found_s = [], []
    for start in range(0, len(queries), block_rows(len(train))):
        block = queries[start:start + block_rows(len(train))] @ train.T
        part = np.argpartition(-block, k - 1, axis=1)[:, :k]
        part_s = np.take_along_axis(block, part, axis=1)
        order = np.argsort(-part_s, axis=1, kind="stable")
        found_i.append(np.take_along_axis(part, order, axis=1))
        found_s.append(np.take_along_axis(part_s, order, axis=1))
    return np.concatenate(found_i), np.concatenate(found_s)
