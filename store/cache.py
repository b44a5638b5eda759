"""Reading a finished feature cache."""

from __future__ import annotations

import contextlib
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from store import layout
from store.errors import HeadstartError, command
from store.format import CacheAttributes


class FeatureCache:
    """A finished, read-only feature cache. Opening it checks its format and version."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            with h5py.File(self.path, "r") as handle:
                attrs = dict(handle.attrs)
                self._check_format(attrs)
                self.class_names = [c.decode() if isinstance(c, bytes) else str(c)
                                    for c in handle["classes"][...]]
                self.split_sizes = {s: int(handle[s]["labels"].shape[0])
                                    for s in layout.SPLITS if s in handle}
                if not self.split_sizes:
                    raise HeadstartError(f"{self.path} holds no split of features.")
                first = handle[next(iter(self.split_sizes))]["features"]
                self.width = int(first.shape[1])
                self.dtype = str(first.dtype)
                self.skipped_count = int(handle["skipped"]["id"].shape[0])
        except (OSError, KeyError) as error:
            raise HeadstartError(
                f"{self.path} is not a readable headstart cache ({error}); "
                f"'{command('verify --fix')}' removes it.") from None
        #: Every root attribute, as one typed record (docs/format.md).
        self.attributes = CacheAttributes.from_attrs(attrs)
        record = self.attributes
        self.fingerprint = record.fingerprint
        self.inputs: dict[str, Any] = record.inputs
        self.preprocessing: dict[str, Any] = record.preprocessing
        self.libraries: dict[str, str] = record.libraries
        self.created = record.created
        self.dataset = record.dataset
        self.version = record.encoding_version
        #: How the dataset was specified (kind, and its path or Keras name).
        self.source: dict[str, Any] = record.source
        #: The backbone weights file read at extraction (format 1.1+), or None.
        self.weights_path: str | None = record.weights_path
        self.kind = record.kind  # "features", "views" or "shard"
        self.parent = record.parent
        self.view = record.view
        self.augmentation: dict[str, Any] | None = record.augmentation
        self.lineage: dict[str, Any] | None = record.lineage
        #: For a shard file (kind "shard"): index, count, full split sizes and ids digest.
        self.shard: dict[str, Any] | None = record.shard
        #: "flip" when every split also holds its mirrored view (format 1.4+), else None.
        self.tta: str | None = record.tta

    @property
    def blocks(self) -> list[tuple[str, int, int]]:
        """(name, start, stop) of each block's columns, bottom to top; one ("output", 0,
        width) block for a cache without the `blocks` attribute."""
        if not self.attributes.blocks:
            return [("output", 0, self.width)]
        return [(str(b["name"]), int(b["start"]), int(b["stop"])) for b in self.attributes.blocks]

    @property
    def image_size(self) -> int:
        """The input image size of the backbone (read it here, not from either JSON copy)."""
        return self.attributes.image_size

    @cached_property
    def skipped(self) -> list[dict[str, str]]:
        """Split, id and reason of every file that could not be used (read on first use)."""
        try:
            with h5py.File(self.path, "r") as handle:
                group = handle["skipped"]
                columns = [group[name].asstr()[...] for name in ("split", "id", "reason")]
        except (OSError, KeyError) as error:
            raise HeadstartError(
                f"{self.path} is not a readable headstart cache ({error}); "
                f"'{command('verify --fix')}' removes it.") from None
        return [{"split": s, "id": i, "reason": r} for s, i, r in zip(*columns)]

    def _check_format(self, attrs: dict[str, Any]) -> None:
        if attrs.get("encoding-type") != layout.ENCODING_TYPE:
            raise HeadstartError(f"{self.path} is not a headstart feature cache.")
        version = str(attrs.get("encoding-version", "?"))
        try:
            same_major = layout.major(version) == layout.major(layout.ENCODING_VERSION)
        except ValueError:  # missing or malformed: not a version this reader can trust
            same_major = False
        if not same_major:
            raise HeadstartError(
                f"Cache {self.path.name} has format version {version}, but this headstart reads "
                f"version {layout.ENCODING_VERSION}; upgrade headstart, or delete the cache and "
                "extract again."
            )

    @property
    def short_id(self) -> str:
        """The first 12 hex digits of the fingerprint, as shown to users."""
        return self.fingerprint[:12]

    #: The name the user gave the cache in its store (extract --name), if any.
    alias: str | None = None

    @property
    def name(self) -> str:
        """How the cache is shown and named: the user's name for it, else `generated_name`."""
        return self.alias or self.generated_name

    @cached_property
    def generated_name(self) -> str:
        """A readable name made from dataset, backbone, alpha, weights, size and pooling."""
        inputs = self.inputs
        backbone = inputs["backbone"]
        if inputs.get("alpha") is not None:
            backbone += f"-a{inputs['alpha']}"
        weights = str(inputs["weights"])
        suffix = "" if weights.startswith("keras-imagenet") else (
            "-random" if weights.startswith("random") else "-" + weights.split(":")[-1][:6])
        name = f"{self.dataset}_{backbone}{suffix}_{self.image_size}_{inputs['pooling']}"
        if inputs.get("blocks", 1) != 1:
            name += f"_b{inputs['blocks']}"
        if inputs.get("tta"):
            name += f"_{inputs['tta']}"
        return name if self.view is None else f"{name}_view{self.view}"

    def features(self, split: str, rows: np.ndarray | slice | None = None,
                 mirrored: bool = False) -> np.ndarray:
        """Features of a split (or of some of its rows) as float32; with `mirrored`, those of
        the mirrored view of the same images (a cache extracted with --tta flip)."""
        with self._reading() as handle:
            data = self._dataset(handle, split, mirrored)
            values = data[...] if rows is None else data[rows]
        return layout.as_float32(values)

    def labels(self, split: str) -> np.ndarray:
        """Integer labels of a split, indexing `class_names`."""
        with self._reading() as handle:
            return np.asarray(self._split(handle, split)["labels"][...], dtype=np.int64)

    def ids(self, split: str) -> np.ndarray:
        """Sample ids of a split, as an array of str."""
        with self._reading() as handle:
            return self._split(handle, split)["ids"].asstr()[...].astype(str)

    def chunk_rows(self, split: str) -> int:
        """Rows per HDF5 chunk of a split's features (reads aligned to it touch each chunk once)."""
        with self._reading() as handle:
            data = self._split(handle, split)["features"]
            return int(data.chunks[0]) if data.chunks else 4096

    def iter_feature_blocks(self, split: str, mirrored: bool = False
                            ) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 block) over a split (with `mirrored`, its mirrored view), in
        blocks of whole chunks (about 1 MiB)."""
        with self._reading() as handle:
            data = self._dataset(handle, split, mirrored)
            chunk = data.chunks[0] if data.chunks else 4096
            row_bytes = max(1, data.shape[1] * data.dtype.itemsize)
            step = chunk * max(1, layout.BLOCK_BYTES // (chunk * row_bytes))
            for start in range(0, data.shape[0], step):
                yield start, layout.as_float32(data[start:start + step])

    @contextlib.contextmanager
    def _reading(self) -> Iterator[h5py.File]:
        """The open file; a read that fails (a checksum mismatch, a truncated or vanished
        file) is one sentence naming this cache and the way to remove it."""
        try:
            with h5py.File(self.path, "r") as handle:
                yield handle
        except (OSError, KeyError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise HeadstartError(
                f"Cache {self.name} ({self.short_id}) is damaged and cannot be read ({reason}); "
                f"'{command('verify --fix')}' removes it, then extract it again.") from None

    def _split(self, handle: h5py.File, split: str) -> h5py.Group:
        if split not in handle:
            raise HeadstartError(f"Cache {self.name} has no {split!r} split.")
        return handle[split]

    def _dataset(self, handle: h5py.File, split: str, mirrored: bool) -> h5py.Dataset:
        """`/<split>/features`, or `/<split>/mirrored` (refused for a cache without it)."""
        group = self._split(handle, split)
        if not mirrored:
            return group["features"]
        if self.tta is None or "mirrored" not in group:
            raise HeadstartError(f"Cache {self.name} holds no mirrored view; extract it with "
                                 "--tta flip.")
        return group["mirrored"]

    @property
    def disk_bytes(self) -> int:
        """Size of the cache file on disk."""
        return self.path.stat().st_size

    def summary(self) -> dict[str, Any]:
        """The facts `list` shows, as plain JSON values."""
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "dataset": self.dataset,
            "backbone": self.inputs["backbone"],
            "alpha": self.inputs.get("alpha"),
            "weights": self.inputs["weights"],
            "image_size": self.image_size,
            "pooling": self.inputs["pooling"],
            "width": self.width,
            "dtype": self.dtype,
            "blocks": [name for name, _, _ in self.blocks],
            "tta": self.tta,
            "rows": self.split_sizes,
            "classes": len(self.class_names),
            "skipped": self.skipped_count,
            "kind": self.kind,
            "parent": self.parent,
            "view": self.view,
            "lineage": self.lineage,
            "disk_bytes": self.disk_bytes,
            "created": self.created,
            "path": str(self.path),
        }
