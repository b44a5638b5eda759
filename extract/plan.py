"""The extraction plan: everything that decides a cache's features, its fingerprint inputs,
segment sizing, and the root attributes of the cache it makes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from importlib import metadata
from typing import Any

from extract.augment import AUGMENT_CHUNK, Augmentation
from extract.backbones import Backbone, Weights, check_options
from extract.compute import ComputeOptions
from extract.datasets import SPLITS, Dataset
from extract.multiblock import BlockColumns
from extract.preprocessing import Preprocessing
from store import layout
from store.errors import HeadstartError
from store.fingerprint import fingerprint
from store.format import CacheAttributes, utc_now

#: Bytes of decoded images one segment may hold; segments are also the unit of resume.
SEGMENT_BYTES = 1 << 26
MAX_SEGMENT_SIZE = 2048
#: The largest split is cut into at least this many segments (of whole batches), so that an
#: interruption of a small extraction loses about 1/8 of it at most, not all of it.
SEGMENTS_PER_SPLIT = 8
#: Test-time views a cache may also hold (`extract --tta`): "flip" is the horizontal mirror.
TTA_MODES = ("flip",)
#: Most blocks `extract --blocks` takes (the last N blocks of the backbone).
MAX_BLOCKS = 8
LIBRARIES = ("headstart", "tensorflow", "keras", "h5py", "numpy", "pillow", "scikit-learn")


@dataclass(frozen=True)
class ExtractionPlan:
    """Everything that decides the features of one cache."""

    dataset: Dataset
    backbone: Backbone
    weights: Weights
    image_size: int
    pooling: str = "avg"
    alpha: float | None = None
    dtype: str = "float16"
    interpolation: str = "bilinear"
    resizer: str = "tensorflow"  # "pillow" rebuilds the plan of a cache of format 1.2 or older
    batch_size: int = 64
    workers: int = 4
    compression: str | None = None
    augmentation: Augmentation | None = None  # set for a cache of augmented training views
    view: int = 0
    base: "ExtractionPlan | None" = None  # the plan of the cache these views belong to
    lineage: dict[str, Any] | None = None  # e.g. the parent cache of a fine-tuned backbone
    compute: ComputeOptions = ComputeOptions()
    blocks: int = 1  # the pooled outputs of the last N blocks, side by side
    tta: str | None = None  # "flip": also the mirrored view of every image of every split

    def __post_init__(self) -> None:
        # A KerasHub preset is resolved to its local folder, and its weights are that folder's
        # files: the fingerprint takes their digest (Weights.identity), never the preset's name.
        object.__setattr__(self, "backbone", self.backbone.resolved())
        object.__setattr__(self, "weights", self.backbone.weights(self.weights))
        check_options(self.backbone, self.alpha, self.image_size, self.pooling)
        if self.dtype not in layout.FEATURE_DTYPES:
            raise HeadstartError(
                f"Unknown --dtype {self.dtype!r}; choose one of {', '.join(layout.FEATURE_DTYPES)}."
            )
        if not 1 <= self.batch_size <= 4096:
            raise HeadstartError(f"--batch-size must be between 1 and 4096; got {self.batch_size}.")
        if not 1 <= self.blocks <= MAX_BLOCKS:
            raise HeadstartError(f"--blocks must be between 1 and {MAX_BLOCKS}; got {self.blocks}.")
        if self.blocks > 1 and self.pooling == "flatten":
            raise HeadstartError("--blocks above 1 needs --pooling avg or max (a flattened "
                                 "feature map takes one block only).")
        if self.tta is not None and self.tta not in TTA_MODES:
            raise HeadstartError(
                f"Unknown --tta {self.tta!r}; choose one of {', '.join(TTA_MODES)}.")
        if self.augmentation is not None and self.dataset.shard is not None:
            raise HeadstartError(
                "Augmented views are not extracted by shard (a view augments fixed chunks of the "
                "full split); merge the shards, then run extract --augment K without --shard.")

    @cached_property
    def preprocessing(self) -> Preprocessing:
        return self.backbone.preprocessing(self.image_size, self.interpolation, self.resizer)

    @property
    def splits(self) -> tuple[str, ...]:
        """Views are made of training images only; test images are never augmented."""
        return ("train",) if self.augmentation else SPLITS

    def view_plans(self, augmentation: Augmentation, count: int) -> list["ExtractionPlan"]:
        """Plans for views 0..count-1 of this plan's training images (with its blocks; views
        are never mirrored)."""
        return [dataclasses.replace(self, augmentation=augmentation, view=v, base=self, tta=None)
                for v in range(count)]

    @cached_property
    def inputs(self) -> dict[str, Any]:
        """The fingerprint inputs (reading every file once for the dataset digest)."""
        if self.base is not None and self.augmentation is not None:
            return {**self.base.inputs, "augmentation": self.augmentation.to_dict(),
                    "view": self.view, "splits": list(self.splits)}
        source = {k: v for k, v in self.dataset.source.items() if k != "path"}
        return {
            "dataset": {"digest": self.dataset.content_digest(), "source": source,
                        "classes": self.dataset.class_names},
            "backbone": self.backbone.name,
            "alpha": self.alpha,
            "weights": self.weights.identity(self.backbone, self.alpha),
            "image_size": self.image_size,
            "pooling": self.pooling,
            "preprocessing": self.preprocessing.to_dict(),
            "dtype": self.dtype,
            # only when not float32, so that existing caches keep their fingerprints
            **({"precision": self.compute.precision}
               if self.compute.precision != "float32" else {}),
            # only when not the defaults, so that existing caches keep their fingerprints
            **({"runtime": self.compute.runtime} if self.compute.runtime != "tf" else {}),
            **({"blocks": self.blocks} if self.blocks != 1 else {}),
            **({"tta": self.tta} if self.tta is not None else {}),
        }

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.inputs)

    @property
    def storage_key(self) -> str:
        """The stem of this plan's files in the store: the fingerprint (plus the shard for one)."""
        shard = self.dataset.shard
        return self.fingerprint if shard is None else f"{self.fingerprint}.{shard.spec.suffix}"

    @property
    def segment_size(self) -> int:
        """Samples per segment: whole batches (whole augmentation chunks for views), at most
        about SEGMENT_BYTES of decoded images and about 1/SEGMENTS_PER_SPLIT of the largest
        split. Batches are the same whatever the segment size, so the cache's bytes are too."""
        per_image = self.image_size * self.image_size * 3
        if self.augmentation is not None:  # whole augmentation chunks, so views never depend on it
            chunks = max(1, SEGMENT_BYTES // (per_image * AUGMENT_CHUNK))
            return min(max(1, MAX_SEGMENT_SIZE // AUGMENT_CHUNK), chunks) * AUGMENT_CHUNK
        batches = max(1, SEGMENT_BYTES // (per_image * self.batch_size))
        largest = max((len(self.dataset.splits[s]) for s in self.splits), default=0)
        share = -(-largest // SEGMENTS_PER_SPLIT)
        by_rows = max(1, -(-share // self.batch_size)) * self.batch_size
        return min(MAX_SEGMENT_SIZE, batches * self.batch_size, by_rows) or self.batch_size

    def cache_attributes(self, blocks: list[BlockColumns] | None = None) -> CacheAttributes:
        """The root attributes of this plan's cache file (the store owns their names);
        `blocks`, the columns of each block, are recorded when there are several."""
        views = self.augmentation is not None and self.base is not None
        shard = self.dataset.shard
        return CacheAttributes(
            fingerprint=self.fingerprint, inputs=self.inputs,
            preprocessing=self.preprocessing.to_dict(), dataset=self.dataset.name,
            source=self.dataset.source, created=utc_now(), libraries=library_versions(),
            weights_path=str(self.weights.path) if self.weights.path else None,
            kind="shard" if shard else "views" if views else "features",
            parent=self.base.fingerprint if views and self.base else None,
            view=self.view if views else None,
            augmentation=self.augmentation.to_dict() if views and self.augmentation else None,
            lineage=self.lineage or None, shard=shard.info() if shard else None,
            blocks=[{"name": b.name, "start": b.start, "stop": b.stop} for b in blocks]
            if blocks and self.blocks != 1 else None,
            tta=self.tta,
        )


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """Installed versions of the libraries that shape a cache (or of `names`)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
