"""Training batches read from HDF5 in chunk-aligned blocks, never the whole matrix at once.

Each epoch visits the cache's chunks in a new random order; rows are gathered into a shuffle
buffer of at most `buffer_rows` rows, shuffled within it, and handed out as batches. Memory
stays at about two buffers whatever the size of the cache.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from classifiers.sources import CacheSet

Batch = tuple[np.ndarray, np.ndarray]


def buffer_rows_for(source: CacheSet, buffer_bytes: int, batch_size: int) -> int:
    """Rows of float32 features that fit `buffer_bytes` (at least one batch)."""
    return max(int(batch_size), buffer_bytes // (4 * max(1, source.width)))


def shuffled_batches(source: CacheSet, split: str, mask: np.ndarray, labels: np.ndarray,
                     batch_size: int, buffer_rows: int, seed: int, epoch: int) -> Iterator[Batch]:
    """One epoch of (features, labels) batches over the rows where `mask` is true."""
    rng = np.random.default_rng([int(seed), int(epoch) + 1])
    blocks = source.blocks(split)
    held_x: list[np.ndarray] = []
    held_y: list[np.ndarray] = []
    held = 0
    for index in rng.permutation(len(blocks)):
        start, stop = blocks[index]
        rows = np.arange(start, stop)[mask[start:stop]]
        if not len(rows):
            continue
        held_x.append(source.read_rows(split, rows))
        held_y.append(labels[rows])
        held += len(rows)
        if held >= buffer_rows:
            X, y = _shuffled(held_x, held_y, rng)
            full = len(X) - len(X) % batch_size
            yield from _batches(X[:full], y[:full], batch_size)
            held_x, held_y = [X[full:]], [y[full:]]
            held = len(X) - full
            del X, y
    if held:
        X, y = _shuffled(held_x, held_y, rng)
        yield from _batches(X, y, batch_size)


def ordered_batches(source: CacheSet, split: str, mask: np.ndarray, labels: np.ndarray,
                    batch_rows: int) -> Iterator[Batch]:
    """(features, labels) of the rows where `mask` is true, in row order, about `batch_rows` at a time."""
    for rows, X in source.iter_blocks(split, mask, target_bytes=_target(source, batch_rows)):
        yield X, labels[rows]


def count_ordered_batches(source: CacheSet, split: str, mask: np.ndarray, batch_rows: int) -> int:
    """How many batches `ordered_batches` yields."""
    return sum(1 for start, stop in source.blocks(split, _target(source, batch_rows))
               if mask[start:stop].any())


def _target(source: CacheSet, batch_rows: int) -> int:
    return max(1, batch_rows) * 4 * source.width


def _shuffled(xs: list[np.ndarray], ys: list[np.ndarray], rng: np.random.Generator) -> Batch:
    X = np.concatenate(xs) if len(xs) > 1 else xs[0]
    y = np.concatenate(ys) if len(ys) > 1 else ys[0]
    xs.clear()
    ys.clear()
    order = rng.permutation(len(X))
    return X[order], y[order]


def _batches(X: np.ndarray, y: np.ndarray, size: int) -> Iterator[Batch]:
    for start in range(0, len(X), size):
        yield X[start:start + size], y[start:start + size]
