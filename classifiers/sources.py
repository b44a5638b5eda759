"""Features of one or several caches of the same dataset, rows matched by sample id.

A head can train on the features of two backbones at once: a `CacheSet` lines the rows of every
cache up with the first cache's rows (by sample id) and concatenates their features. Reading is
done in chunk-aligned blocks so that no caller has to hold a whole split in memory.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Iterator, Sequence

import numpy as np

from store.cache import FeatureCache
from store.errors import HeadstartError
from store.store import Store


def dataset_key(cache: FeatureCache) -> tuple[str, tuple[str, ...]]:
    """What two caches must share to be combined: the dataset's content digest and class names."""
    dataset = cache.inputs.get("dataset", {})
    digest = dataset.get("digest") if isinstance(dataset, dict) else None
    return str(digest or cache.dataset), tuple(cache.class_names)


def check_same_dataset(caches: Sequence[FeatureCache]) -> None:
    """Refuse caches of different datasets or class sets, in one sentence."""
    first = caches[0]
    for other in caches[1:]:
        if dataset_key(other)[1] != dataset_key(first)[1]:
            raise HeadstartError(
                f"Caches {first.name} and {other.name} have different class sets; they cannot "
                "be combined.")
        if dataset_key(other) != dataset_key(first):
            raise HeadstartError(
                f"Caches {first.name} and {other.name} were extracted from different datasets; "
                "only caches of the same dataset can be combined.")


class CacheSet:
    """One or more caches of the same dataset, read as one feature matrix per split.

    `blocks` names, per cache, the blocks whose columns are read (None: every column); with
    `mirrored`, the caches' mirrored views are read instead of the images' own features.
    """

    def __init__(self, caches: Sequence[FeatureCache],
                 blocks: Sequence[Sequence[str] | None] | None = None,
                 mirrored: bool = False) -> None:
        if not caches:
            raise HeadstartError("No cache given.")
        fingerprints = [c.fingerprint for c in caches]
        if len(set(fingerprints)) != len(fingerprints):
            raise HeadstartError("The same cache was given twice; give each cache once.")
        check_same_dataset(caches)
        self.caches = list(caches)
        self.blocks_used = list(blocks) if blocks is not None else [None] * len(self.caches)
        self._columns = [block_columns(c, names) for c, names in zip(self.caches, self.blocks_used)]
        self.mirrored = mirrored
        if mirrored and not self.has_views:
            raise HeadstartError(f"Cache {self.name} holds no mirrored views; extract it with "
                                 "--tta flip.")
        self._orders: dict[tuple[int, str], np.ndarray | None] = {}

    @classmethod
    def from_fingerprints(cls, store: Store, fingerprints: Sequence[str],
                          blocks: Sequence[Sequence[str] | None] | None = None) -> "CacheSet":
        """The caches a head record names, which must all still be in the store."""
        caches = []
        for fingerprint in fingerprints:
            cache = store.finished(fingerprint)
            if cache is None:
                raise HeadstartError(
                    f"Cache {fingerprint[:12]} is no longer in store {store.root}; extract it again.")
            caches.append(cache)
        return cls(caches, blocks)

    @property
    def has_views(self) -> bool:
        """Whether every cache holds the mirrored view of every image (extract --tta flip)."""
        return all(c.tta == "flip" for c in self.caches)

    def mirror(self) -> "CacheSet":
        """The same caches and blocks, reading the mirrored views."""
        return CacheSet(self.caches, self.blocks_used, mirrored=True)

    def select(self, index: int, features: np.ndarray) -> np.ndarray:
        """The columns of cache `index` this set reads, from a matrix of all its columns."""
        columns = self._columns[index]
        return features if columns is None else features[:, columns]

    def _read(self, index: int, split: str, rows: Any) -> np.ndarray:
        return self.select(index, self.caches[index].features(split, rows, mirrored=self.mirrored))

    @property
    def primary(self) -> FeatureCache:
        """The first cache: its row order, labels and ids are the set's."""
        return self.caches[0]

    @property
    def fingerprints(self) -> list[str]:
        return [c.fingerprint for c in self.caches]

    @property
    def name(self) -> str:
        return " + ".join(c.name for c in self.caches)

    @property
    def label(self) -> str:
        """How the set is shown: each cache's name with its short id."""
        return " + ".join(f"{c.name} ({c.short_id})" for c in self.caches)

    @property
    def class_names(self) -> list[str]:
        return self.primary.class_names

    @property
    def width(self) -> int:
        return sum(c.width if cols is None else len(cols)
                   for c, cols in zip(self.caches, self._columns))

    def rows(self, split: str) -> int:
        return self.primary.split_sizes[split]

    def labels(self, split: str) -> np.ndarray:
        return self.primary.labels(split)

    @cached_property
    def _ids(self) -> dict[str, np.ndarray]:
        return {split: self.primary.ids(split) for split in self.primary.split_sizes}

    def ids(self, split: str) -> np.ndarray:
        return self._ids[split]

    def float32_bytes(self, split: str) -> int:
        """Bytes of the split's whole feature matrix as float32."""
        return self.rows(split) * self.width * 4

    def _order(self, index: int, split: str) -> np.ndarray | None:
        """Rows of cache `index` in the primary's row order; None when already in that order."""
        key = (index, split)
        if key not in self._orders:
            self._orders[key] = align_rows(self.caches[index].ids(split), self.ids(split),
                                           self.caches[index].name, self.primary.name)
        return self._orders[key]

    def features(self, split: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Features of the split (or of sorted row indices), all caches side by side, float32."""
        parts = []
        for index, cache in enumerate(self.caches):
            order = self._order(index, split) if index else None
            if order is None:
                parts.append(self._read(index, split, rows))
                continue
            parts.append(self.features_of(index, split, order if rows is None else order[rows]))
        return parts[0] if len(parts) == 1 else np.hstack(parts)

    def blocks(self, split: str, target_bytes: int = 0) -> list[tuple[int, int]]:
        """(start, stop) row ranges of whole chunks of the primary cache, each one chunk or as
        many chunks as fit `target_bytes` of float32 features."""
        chunk = self.primary.chunk_rows(split)
        step = chunk * max(1, target_bytes // (chunk * 4 * max(1, self.width)))
        total = self.rows(split)
        return [(start, min(total, start + step)) for start in range(0, total, step)]

    def iter_blocks(self, split: str, mask: np.ndarray | None = None, target_bytes: int = 0
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row indices, features) per block (see `blocks`), only rows where `mask` is true."""
        for start, stop in self.blocks(split, target_bytes):
            rows = np.arange(start, stop)
            if mask is not None:
                rows = rows[mask[start:stop]]
            if len(rows):
                yield rows, self.read_rows(split, rows)

    def read_rows(self, split: str, rows: np.ndarray) -> np.ndarray:
        """Features of sorted row indices, read as the one slice that spans them (a block)."""
        if not len(rows):
            return np.zeros((0, self.width), dtype=np.float32)
        first, last = int(rows[0]), int(rows[-1]) + 1
        picked = rows - first
        parts = [self._read(0, split, slice(first, last))[picked]]
        for index in range(1, len(self.caches)):
            order = self._order(index, split)
            parts.append(self._read(index, split, slice(first, last))[picked] if order is None
                         else self.features_of(index, split, order[rows]))
        return parts[0] if len(parts) == 1 else np.hstack(parts)

    def features_of(self, index: int, split: str, rows: np.ndarray) -> np.ndarray:
        """Features of cache `index` at its own row indices (any order)."""
        sorted_rows, inverse = np.unique(rows, return_inverse=True)
        return self._read(index, split, sorted_rows)[inverse]


def choose_blocks(cache: FeatureCache, spec: str | None) -> list[str] | None:
    """The blocks `--use-blocks` names: a count N (the last N blocks) or comma-separated block
    names; None (every block) when not given or when it names them all."""
    if spec is None or not str(spec).strip():
        return None
    names = [name for name, _, _ in cache.blocks]
    text = str(spec).strip()
    if text.isdigit():
        count = int(text)
        if not 1 <= count <= len(names):
            raise HeadstartError(f"--use-blocks {count}: cache {cache.name} holds {len(names)} "
                                 f"block(s) ({', '.join(names)}).")
        chosen = names[len(names) - count:]
    else:
        chosen = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [n for n in chosen if n not in names]
        if unknown:
            raise HeadstartError(f"Cache {cache.name} has no block {unknown[0]!r}; its blocks: "
                                 f"{', '.join(names)}.")
        chosen = [n for n in names if n in chosen]  # bottom to top, each once
    return None if chosen == names else chosen


def block_columns(cache: FeatureCache, names: Sequence[str] | None) -> np.ndarray | None:
    """Column indices of the named blocks of `cache` (None: every column)."""
    if names is None:
        return None
    ranges = {name: (start, stop) for name, start, stop in cache.blocks}
    missing = [n for n in names if n not in ranges]
    if missing:
        raise HeadstartError(f"Cache {cache.name} has no block {missing[0]!r}.")
    return np.concatenate([np.arange(*ranges[n]) for n in names])


def align_rows(ids: np.ndarray, target: np.ndarray, name: str, target_name: str
               ) -> np.ndarray | None:
    """Indices into `ids` that put its rows in the order of `target`; None if already so."""
    if len(ids) == len(target) and np.array_equal(ids, target):
        return None
    position = {sample: row for row, sample in enumerate(ids.tolist())}
    try:
        order = np.fromiter((position[sample] for sample in target.tolist()), dtype=np.int64,
                            count=len(target))
    except KeyError as missing:
        raise HeadstartError(
            f"Cache {name} has no row for sample {missing.args[0]!r} of {target_name}; caches "
            "combined must hold the same samples.") from None
    return order
