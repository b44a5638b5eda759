"""The one writer of a cache file (docs/format.md): extraction, views, shards and merge use it.

`write_cache` opens the file under a temporary name, stores the root attributes and the class
names, and renames it into place once everything is written; `CacheWriter.split` writes one
split's datasets, `CacheWriter.skipped` the `/skipped` group.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import h5py
import numpy as np

from store import layout
from store.atomic import atomic_path
from store.format import CacheAttributes

TEXT = h5py.string_dtype("utf-8")


class CacheWriter:
    """The datasets of one cache file being written."""

    def __init__(self, handle: h5py.File, attributes: CacheAttributes) -> None:
        self.handle = handle
        self.attributes = attributes

    def split(self, name: str, blocks: Iterable[np.ndarray], *, rows: int, width: int, dtype: str,
              labels: np.ndarray, ids: Sequence[str], compression: str | None = None,
              source_rows: np.ndarray | None = None,
              mirrored: Iterable[np.ndarray] | None = None) -> None:
        """`/<name>/`: features from `blocks` (in row order, `rows` in all), labels and ids;
        `views` for a views cache, `rows` (each row's index in the full split) for a shard, and
        `mirrored` (the mirrored view of each row, stored like the features) when the cache's
        `tta` attribute is set.
        """
        if (mirrored is None) != (self.attributes.tta is None):
            raise ValueError("/<split>/mirrored is written exactly when the tta attribute is set")
        group = self.handle.create_group(name)
        for key, values in (("features", blocks), ("mirrored", mirrored)):
            if values is not None:
                self._features(group, key, values, rows, width, dtype, compression)
        group.create_dataset("labels", data=np.asarray(labels).astype(np.int32))
        group.create_dataset("ids", data=list(ids), dtype=TEXT)
        if self.attributes.kind == "views":
            group.create_dataset("views", data=np.full(rows, self.attributes.view, np.int32))
        if source_rows is not None:
            group.create_dataset("rows", data=np.asarray(source_rows, np.int64))

    @staticmethod
    def _features(group: h5py.Group, key: str, blocks: Iterable[np.ndarray], rows: int,
                  width: int, dtype: str, compression: str | None) -> None:
        """One (rows, width) features dataset: whole-row chunks with Fletcher-32 checksums."""
        data = group.create_dataset(
            key, shape=(rows, width), dtype=dtype,
            chunks=(layout.rows_per_chunk(width, np.dtype(dtype).itemsize, max(1, rows)), width)
            if rows else None,
            fletcher32=bool(rows), compression=compression,
        )
        start = 0
        for block in blocks:
            data[start:start + len(block)] = block
            start += len(block)

    def skipped(self, entries: Sequence[tuple[str, str, str]],
                source_rows: Sequence[int] | None = None) -> None:
        """`/skipped`: split, id and reason of every file that could not be used; for a shard,
        also `row`, each one's index in the full split."""
        group = self.handle.create_group("skipped")
        for position, column in enumerate(("split", "id", "reason")):
            group.create_dataset(column, data=[row[position] for row in entries], dtype=TEXT,
                                 shape=(len(entries),))
        if source_rows is not None:
            group.create_dataset("row", data=np.asarray(source_rows, np.int64))


@contextlib.contextmanager
def write_cache(target: Path, attributes: CacheAttributes, class_names: Sequence[str]
                ) -> Iterator[CacheWriter]:
    """Write the cache file at `target` atomically: complete under its name, or absent."""
    with atomic_path(target) as temporary, h5py.File(temporary, "w") as handle:
        handle.attrs.update(attributes.to_attrs())
        handle.create_dataset("classes", data=list(class_names), dtype=TEXT)
        yield CacheWriter(handle, attributes)
