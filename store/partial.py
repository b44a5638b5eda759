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

import numpy as np

from store.atomic import atomic_path, write_text
from store.format import CacheAttributes
from store.writer import write_cache

MANIFEST = "manifest.json"


@dataclass
class Segment:
    """The output of one segment: features of the rows that decoded, and the rows that did not."""

    features: np.ndarray  # (n_ok, D)
    rows: np.ndarray  # (n_ok,) sample indices within the split
    skipped_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    skipped_reasons: list[str] = field(default_factory=list)
    mirrored: np.ndarray | None = None  # (n_ok, D): the mirrored view of each row (--tta flip)


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
    def mirrored(self) -> bool:
        """True when segments hold the mirrored view too (the manifest says so)."""
        return bool(self.manifest.get("mirrored"))

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
                               [str(r) for r in data["skipped_reasons"]],
                               data["mirrored"] if self.mirrored else None)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            path.unlink(missing_ok=True)
            return None

    def has_segment(self, split: str, index: int) -> bool:
        """True when the segment file is in place with all its arrays (contents not read)."""
        path = self.segment_path(split, index)
        try:
            with np.load(path, allow_pickle=False) as data:
                return set(data.files) >= {"features", "rows", "skipped_rows", "skipped_reasons",
                                           *(("mirrored",) if self.mirrored else ())}
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
                    **({"mirrored": segment.mirrored} if segment.mirrored is not None else {}),
                )

    def assemble(
        self,
        target: Path,
        attributes: CacheAttributes,
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
        skipped: list[tuple[str, str, str]] = []
        skipped_source: list[int] = []
        with write_cache(target, attributes, class_names) as cache:
            for split in split_ids:
                segments = self._segments(split, len(split_ids[split]))
                rows = np.concatenate([np.zeros(0, np.int64)]  # a shard's split may be empty
                                      + [s.rows for s in segments])
                for segment in segments:
                    skipped.extend((split, split_ids[split][row], reason) for row, reason
                                   in zip(segment.skipped_rows.tolist(), segment.skipped_reasons))
                    if source_rows is not None:
                        skipped_source.extend(source_rows[split][segment.skipped_rows].tolist())
                cache.split(split, (s.features for s in segments), rows=len(rows), width=width,
                            dtype=dtype, labels=split_labels[split][rows],
                            ids=np.asarray(split_ids[split], dtype=object)[rows].tolist(),
                            compression=compression,
                            source_rows=None if source_rows is None else source_rows[split][rows],
                            mirrored=(s.mirrored for s in segments)
                            if attributes.tta is not None else None)
            cache.skipped(skipped, None if source_rows is None else skipped_source)

    def _segments(self, split: str, rows: int) -> list[Segment]:
        """Every segment of a split, in order; a missing one is an error."""
        segments = [self.read_segment(split, k) for k in range(self.segment_count(rows))]
        if any(s is None for s in segments):
            raise RuntimeError(f"Segment missing in {self.directory}; run again.")
        return [s for s in segments if s is not None]

    def remove(self) -> None:
        """Delete the partial cache (after its finished file is in place)."""
        shutil.rmtree(self.directory, ignore_errors=True)

