"""Writing a finished cache from arrays, through the same segment writer extraction uses.

For benchmarks and tests: features made without a backbone (synthetic, or from elsewhere) get
the same layout, checksums and chunking as extracted ones. Blocks are written one at a time,
so a cache larger than memory can be made.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from store.cache import FeatureCache
from store.fingerprint import fingerprint
from store.format import CacheAttributes, utc_now
from store.partial import PartialCache, Segment
from store.store import Store

#: (ids, labels, feature blocks in row order, all but the last of `block_rows` rows)
SplitArrays = tuple[Sequence[str], np.ndarray, Iterable[np.ndarray]]


def write_array_cache(store: Store, dataset: str, class_names: Sequence[str],
                      splits: dict[str, SplitArrays], block_rows: int,
                      inputs: dict[str, Any] | None = None, dtype: str = "float32") -> FeatureCache:
    """Write (or reuse) the cache of these arrays; `inputs` adds to the fingerprint inputs."""
    inputs = {"dataset": {"digest": dataset, "source": {"kind": "arrays"},
                          "classes": list(class_names)},
              "backbone": "arrays", "alpha": None, "weights": "arrays", "image_size": 0,
              "pooling": "none", "preprocessing": {}, "dtype": dtype, **(inputs or {})}
    key = fingerprint(inputs)
    existing = store.reusable(key)
    if existing is not None:
        return existing
    partial = PartialCache.open(store.partial_dir(key), {"fingerprint": key,
                                                         "segment_size": int(block_rows)})
    width = 0
    for split, (_, _, blocks) in splits.items():
        start = 0
        for index, block in enumerate(blocks):
            width = block.shape[1]
            rows = np.arange(start, start + len(block))
            partial.write_segment(split, index, Segment(block.astype(dtype), rows))
            start += len(block)
    attributes = CacheAttributes(fingerprint=key, inputs=inputs, preprocessing={},
                                 dataset=dataset, source={"kind": "arrays"},
                                 created=utc_now("microseconds"), libraries={})
    partial.assemble(store.cache_path(key), attributes, class_names,
                     {s: list(ids) for s, (ids, _, _) in splits.items()},
                     {s: np.asarray(labels) for s, (_, labels, _) in splits.items()},
                     width, dtype)
    partial.remove()
    return FeatureCache(store.cache_path(key))
