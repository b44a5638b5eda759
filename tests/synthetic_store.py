"""A store of small synthetic caches written with the store's own writer (no backbone, fast).

Caches "a" (width 12) and "b" (width 6, rows in another order) hold the same dataset; cache
"other" holds a different one. Three classes, separable enough for every head to learn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from store.arrays import write_array_cache
from store.store import Store

CLASSES = ["cat", "dog", "fox"]
TRAIN, TEST = 480, 150


def make_cache(store: Store, dataset: str, width: int, seed: int, permute: bool = False,
               pooling: str = "avg") -> str:
    """Write one synthetic cache; rows of the same dataset share ids and labels."""
    means = np.random.default_rng(seed).normal(0.0, 1.0, size=(len(CLASSES), width))
    splits = {}
    for split, rows in (("train", TRAIN), ("test", TEST)):
        labels = np.random.default_rng([len(dataset), rows]).integers(0, len(CLASSES), rows)
        ids = np.array([f"{split}/{i:05d}.png" for i in range(rows)])
        rng = np.random.default_rng([seed, rows])
        X = (means[labels] + rng.normal(size=(rows, width))).astype(np.float32)
        order = rng.permutation(rows) if permute else np.arange(rows)
        splits[split] = (ids[order].tolist(), labels[order], [X[order]])
    cache = write_array_cache(store, dataset, CLASSES, splits, block_rows=rows_max(),
                              inputs={"pooling": pooling, "image_size": width})
    return cache.fingerprint


def rows_max() -> int:
    return max(TRAIN, TEST)


def build(root: Path) -> dict[str, str]:
    """Fingerprints of caches a, b (same dataset) and other (another dataset) in `root`."""
    store = Store(root)
    return {"a": make_cache(store, "toy", 12, 1),
            "b": make_cache(store, "toy", 6, 2, permute=True, pooling="max"),
            "other": make_cache(store, "toy-other", 12, 3, pooling="flatten")}


@pytest.fixture()
def toy_store(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A fresh store with the three synthetic caches (about 0.1 s to write)."""
    return tmp_path / "store", build(tmp_path / "store")
