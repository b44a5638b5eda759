"""An unfinished cache: segment files written one at a time, then assembled into HDF5.

Each segment (a fixed range of sample indices of one split) is written to its own file and
renamed into place, so a crash or kill at any moment loses at most the segment in flight. The
finished cache is assembled into a temporary file and renamed to its final name last: a file
under the final name is always complete, and an unfinished cache is never mistaken for one.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from store import layout
from store.atomic import atomic_path, write_text

MANIFEST = "manifest.json"


@dataclass
class Segment:
    """The output of one segment: features of the rows that decoded, and the rows that did not."""

    features: np.ndarray  # (n_ok, D)
    rows: np.ndarray  # (n_ok,) sample indices within the split
    skipped_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    skipped_reasons: list[str] = field(default_factory=list)


class PartialCache:
    """A folder of finished segments for one fingerprint."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = manifest

    @classmethod
    def open(cls, directory: Path, manifest: dict[str, Any]) -> "PartialCache":
        """Resume the partial cache in `directory`, or start one with `manifest`.

        A partial cache started with other settings (another segment size, say) keeps its own
        manifest, so segments are never mixed.
        """
        path = directory / MANIFEST
        if path.is_file():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
                if stored.get("fingerprint") == manifest["fingerprint"]:
                    return cls(directory, stored)
            except (OSError, ValueError):
                pass
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(manifest, indent=2))
        return cls(directory, manifest)

    @property
    def segment_size(self) -> int:
        """Samples per segment, fixed when the partial cache was started."""
        return int(self.manifest["segment_size"])

    def segment_count(self, rows: int) -> int:
        """Number of segments covering `rows` samples."""
        return -(-rows // self.segment_size)

    def segment_path(self, split: str, index: int) -> Path:
        """The file holding segment `index` of `split`."""
        return self.directory / f"{split}-{index:06d}.npz"

    def read_segment(self, split: str, index: int) -> Segment | None:
        """A finished segment, or None when it is missing or unreadable (it is then redone)."""
        path = self.segment_path(split, index)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return Segment(data["features"], data["rows"], data["skipped_rows"],
                               [str(r) for r in data["skipped_reasons"]])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            path.unlink(missing_ok=True)
            return None

    def has_segment(self, split: str, index: int) -> bool:
        """True when the segment file is in place with all its arrays (contents not read)."""
        path = self.segment_path(split, index)
        try:
            with np.load(path, allow_pickle=False) as data:
                return set(data.files) >= {"features", "rows", "skipped_rows", "skipped_reasons"}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return False

    def is_empty(self) -> bool:
        """True while no segment has been written."""
        return not any(self.directory.glob("*.npz"))

    def write_segment(self, split: str, index: int, segment: Segment) -> None:
        """Write one segment atomically."""
        with atomic_path(self.segment_path(split, index)) as temporary:
            with open(temporary, "wb") as handle:
                np.savez(
                    handle,
                    features=segment.features,
                    rows=np.asarray(segment.rows, dtype=np.int64),
                    skipped_rows=np.asarray(segment.skipped_rows, dtype=np.int64),
                    skipped_reasons=np.asarray(segment.skipped_reasons, dtype=str),
                )

    def assemble(
        self,
        target: Path,
        attrs: dict[str, Any],
        class_names: Sequence[str],
        split_ids: dict[str, Sequence[str]],
        split_labels: dict[str, np.ndarray],
        width: int,
        dtype: str,
        compression: str | None = None,
        source_rows: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Copy every segment, in order, into the finished HDF5 file at `target`.

        `source_rows` (a shard's) maps each split's sample index to its row in the full split;
        it is stored as `/<split>/rows` and `/skipped/row`, which merging needs.
        """
        text = h5py.string_dtype("utf-8")
        skipped: list[tuple[str, str, str]] = []
        skipped_source: list[int] = []
        with atomic_path(target) as temporary:
            with h5py.File(temporary, "w") as handle:
                handle.attrs.update(attrs)
                handle.create_dataset("classes", data=list(class_names), dtype=text)
                for split in split_ids:
                    segments = [self.read_segment(split, k)
                                for k in range(self.segment_count(len(split_ids[split])))]
                    if any(s is None for s in segments):
                        raise RuntimeError(f"Segment missing in {self.directory}; run again.")
                    rows = np.concatenate([np.zeros(0, np.int64)]  # a shard's split may be empty
                                          + [s.rows for s in segments if s is not None])
                    group = handle.create_group(split)
                    features = create_features(group, len(rows), width, dtype, compression)
                    start = 0
                    for segment in segments:
                        assert segment is not None
                        features[start:start + len(segment.rows)] = segment.features
                        start += len(segment.rows)
                        skipped.extend(
                            (split, split_ids[split][row], reason)
                            for row, reason in zip(segment.skipped_rows.tolist(),
                                                   segment.skipped_reasons)
                        )
                        if source_rows is not None:
                            skipped_source.extend(source_rows[split][segment.skipped_rows].tolist())
                    ids = np.asarray(split_ids[split], dtype=object)[rows]
                    group.create_dataset("labels", data=split_labels[split][rows].astype(np.int32))
                    group.create_dataset("ids", data=ids.tolist(), dtype=text)
                    if attrs.get("kind") == "views":
                        group.create_dataset("views", data=np.full(len(rows), attrs["view"], np.int32))
                    if source_rows is not None:
                        group.create_dataset("rows", data=source_rows[split][rows])
                group = write_skipped(handle, skipped)
                if source_rows is not None:
                    group.create_dataset("row", data=np.asarray(skipped_source, np.int64))

    def remove(self) -> None:
        """Delete the partial cache (after its finished file is in place)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def create_features(group: h5py.Group, rows: int, width: int, dtype: str,
                    compression: str | None) -> h5py.Dataset:
    """An empty `features` dataset of the cache layout: row chunks of about 1 MiB, checksummed."""
    return group.create_dataset(
        "features", shape=(rows, width), dtype=dtype,
        chunks=(layout.rows_per_chunk(width, np.dtype(dtype).itemsize, max(1, rows)), width)
        if rows else None,
        fletcher32=bool(rows), compression=compression,
    )


def write_skipped(handle: h5py.File, skipped: Sequence[tuple[str, str, str]]) -> h5py.Group:
    """The `/skipped` group: split, id and reason of every file that could not be used."""
    group = handle.create_group("skipped")
    for position, column in enumerate(("split", "id", "reason")):
        group.create_dataset(column, data=[row[position] for row in skipped],
                             dtype=h5py.string_dtype("utf-8"), shape=(len(skipped),))
    return group
