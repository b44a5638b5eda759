"""One backbone pass over a dataset, streamed into a resumable feature cache."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from importlib import metadata
from typing import Any, Iterator

import numpy as np

from extract.augment import AUGMENT_CHUNK, Augmentation
from extract.backbones import Backbone, Weights, build_feature_model, check_options
from extract.datasets import SPLITS, Dataset
from extract.distribute import build_distributed
from extract.images import BadImage
from extract.preprocessing import Preprocessing
from store import layout
from store.cache import FeatureCache
from store.errors import HeadstartError
from store.fingerprint import fingerprint
from store.partial import PartialCache, Segment
from store.store import Store

#: Bytes of decoded images one segment may hold; segments are also the unit of resume.
SEGMENT_BYTES = 1 << 26
MAX_SEGMENT_SIZE = 2048
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
    batch_size: int = 64
    workers: int = 4
    compression: str | None = None
    augmentation: Augmentation | None = None  # set for a cache of augmented training views
    view: int = 0
    base: "ExtractionPlan | None" = None  # the plan of the cache these views belong to
    lineage: dict[str, Any] | None = None  # e.g. the parent cache of a fine-tuned backbone
    distribute: bool = False  # MirroredStrategy over every visible GPU (no-op with one device)

    def __post_init__(self) -> None:
        check_options(self.backbone, self.alpha, self.image_size, self.pooling)
        if self.dtype not in layout.FEATURE_DTYPES:
            raise HeadstartError(
                f"Unknown --dtype {self.dtype!r}; choose one of {', '.join(layout.FEATURE_DTYPES)}."
            )
        if not 1 <= self.batch_size <= 4096:
            raise HeadstartError(f"--batch-size must be between 1 and 4096; got {self.batch_size}.")
        if self.augmentation is not None and self.dataset.shard is not None:
            raise HeadstartError(
                "Augmented views are not extracted by shard (a view augments fixed chunks of the "
                "full split); merge the shards, then run extract --augment K without --shard.")

    @cached_property
    def preprocessing(self) -> Preprocessing:
        return self.backbone.preprocessing(self.image_size, self.interpolation)

    @property
    def splits(self) -> tuple[str, ...]:
        """Views are made of training images only; test images are never augmented."""
        return ("train",) if self.augmentation else SPLITS

    def view_plans(self, augmentation: Augmentation, count: int) -> list["ExtractionPlan"]:
        """Plans for views 0..count-1 of this plan's training images."""
        return [dataclasses.replace(self, augmentation=augmentation, view=v, base=self)
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
        """Samples per segment: about SEGMENT_BYTES of decoded images, whole batches (whole
        augmentation chunks for views)."""
        per_image = self.image_size * self.image_size * 3
        if self.augmentation is not None:  # whole augmentation chunks, so views never depend on it
            chunks = max(1, SEGMENT_BYTES // (per_image * AUGMENT_CHUNK))
            return min(max(1, MAX_SEGMENT_SIZE // AUGMENT_CHUNK), chunks) * AUGMENT_CHUNK
        batches = max(1, SEGMENT_BYTES // (per_image * self.batch_size))
        return min(MAX_SEGMENT_SIZE, batches * self.batch_size) or self.batch_size


@dataclass
class ExtractionResult:
    """What an extraction did."""

    cache: FeatureCache
    reused: bool
    computed: int = 0  # images run through the backbone in this call
    seconds: float = 0.0
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


def extract_features(plan: ExtractionPlan, store: Store, progress: bool = True) -> ExtractionResult:
    """Return the cache for `plan`, running the backbone only for rows not already on disk.

    For a shard plan (`plan.dataset.shard`) that is the shard's own file; a merged cache of the
    same fingerprint is reused instead, so rerunning a shard after the merge does nothing.
    """
    key, shard = plan.storage_key, plan.dataset.shard
    existing = _finished(plan, store)
    if existing is not None:
        return ExtractionResult(existing, reused=True, skipped=existing.skipped)
    with store.writing(key):
        existing = _finished(plan, store)  # another process may have just finished it
        if existing is not None:
            return ExtractionResult(existing, reused=True, skipped=existing.skipped)
        partial = PartialCache.open(
            store.partial_dir(key),
            {"fingerprint": plan.fingerprint, "segment_size": plan.segment_size,
             "inputs": plan.inputs, **({"shard": str(shard.spec)} if shard else {})},
        )
        try:
            computed, width, seconds = _run_backbone(plan, partial, progress)
        except HeadstartError:  # e.g. weights that do not fit: no unfinished cache left behind
            if partial.is_empty():
                partial.remove()
            raise
        dataset = plan.dataset
        partial.assemble(
            store.cache_path(key),
            attrs={**_cache_attrs(plan), **(shard.attrs() if shard else {})},
            class_names=dataset.class_names,
            split_ids={s: dataset.splits[s].ids for s in plan.splits},
            split_labels={s: dataset.splits[s].labels for s in plan.splits},
            width=width,
            dtype=plan.dtype,
            compression=plan.compression,
            source_rows=shard.rows if shard else None,
        )
        partial.remove()
    cache = FeatureCache(store.cache_path(key))
    return ExtractionResult(cache, reused=False, computed=computed, seconds=seconds,
                            skipped=cache.skipped)


def _finished(plan: ExtractionPlan, store: Store) -> FeatureCache | None:
    """The finished cache of `plan`, or for a shard, its file or the merged cache."""
    return store.finished(plan.fingerprint) or store.finished(plan.storage_key)


def _run_backbone(plan: ExtractionPlan, partial: PartialCache, progress: bool
                  ) -> tuple[int, int, float]:
    """Compute every missing segment; returns (images computed, feature width, seconds).

    The seconds cover the pass itself (decode, backbone, segment writes), not building the model.
    """
    todo = [
        (split, k)
        for split in plan.splits
        for k in range(partial.segment_count(len(plan.dataset.splits[split])))
        if not partial.has_segment(split, k)
    ]
    width = _width_of_finished(partial, plan)
    if not todo:
        return 0, width, 0.0
    total = sum(len(_segment_rows(plan, partial, split, k)) for split, k in todo)
    model = build_distributed(plan.distribute, lambda: build_feature_model(
        plan.backbone, plan.alpha, plan.weights, plan.image_size, plan.pooling))
    width = int(model.output_shape[-1])
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc="extract", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    computed = 0
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=plan.workers) as pool:
            for split, k, loads in _prefetch(plan, partial, pool, todo):
                segment = _compute_segment(plan, model, loads, width, bar, split)
                partial.write_segment(split, k, segment)
                computed += len(segment.rows) + len(segment.skipped_rows)
    finally:
        bar.close()
    return computed, width, time.perf_counter() - started


def _segment_rows(plan: ExtractionPlan, partial: PartialCache, split: str, k: int) -> range:
    size = partial.segment_size
    return range(k * size, min((k + 1) * size, len(plan.dataset.splits[split])))


def _load(plan: ExtractionPlan, split: str, row: int) -> tuple[int, np.ndarray | None, str]:
    try:
        return row, plan.dataset.load(split, row, plan.preprocessing), ""
    except BadImage as error:
        return row, None, str(error)


def _prefetch(
    plan: ExtractionPlan, partial: PartialCache, pool: ThreadPoolExecutor,
    todo: list[tuple[str, int]],
) -> Iterator[tuple[str, int, list[Future]]]:
    """Yield each segment's decode futures while the next segment is already decoding."""
    def submit(split: str, k: int) -> list[Future]:
        return [pool.submit(_load, plan, split, row) for row in _segment_rows(plan, partial, split, k)]

    pending = submit(*todo[0])
    for position, (split, k) in enumerate(todo):
        current = pending
        if position + 1 < len(todo):
            pending = submit(*todo[position + 1])
        try:
            yield split, k, current
        except GeneratorExit:
            for future in pending:
                future.cancel()
            raise


def _compute_segment(plan: ExtractionPlan, model: Any, loads: list[Future], width: int,
                     bar: Any, split: str) -> Segment:
    """Run the backbone over one segment's decoded (and, for views, augmented) images."""
    rows: list[int] = []
    pixels: list[np.ndarray] = []
    skipped_rows: list[int] = []
    reasons: list[str] = []
    for future in loads:
        row, image, reason = future.result()
        if image is None:
            skipped_rows.append(row)
            reasons.append(reason)
        else:
            rows.append(row)
            pixels.append(image)
    images = np.stack(pixels) if pixels else np.zeros((0, plan.image_size, plan.image_size, 3), np.uint8)
    if plan.augmentation is not None and len(images):
        images = plan.augmentation.apply(images, np.asarray(rows), plan.view, split)
    features: list[np.ndarray] = []
    for start in range(0, len(images), plan.batch_size):
        batch = plan.preprocessing.apply(images[start:start + plan.batch_size])
        output = np.asarray(model.predict_on_batch(batch))
        features.append(output.reshape(len(batch), -1).astype(plan.dtype))
        bar.update(len(batch))
    bar.update(len(skipped_rows))
    return Segment(
        np.concatenate(features) if features else np.zeros((0, width), dtype=plan.dtype),
        np.asarray(rows, dtype=np.int64),
        np.asarray(skipped_rows, dtype=np.int64),
        reasons,
    )


def _width_of_finished(plan_partial: PartialCache, plan: ExtractionPlan) -> int:
    """Feature width read back from any finished segment (0 when none has rows)."""
    for split in plan.splits:
        for k in range(plan_partial.segment_count(len(plan.dataset.splits[split]))):
            segment = plan_partial.read_segment(split, k)
            if segment is not None and segment.features.ndim == 2 and len(segment.rows):
                return int(segment.features.shape[1])
    return 0


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape a cache."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _cache_attrs(plan: ExtractionPlan) -> dict[str, Any]:
    attrs: dict[str, Any] = {"kind": "features"}
    if plan.augmentation is not None and plan.base is not None:
        attrs = {"kind": "views", "parent": plan.base.fingerprint, "view": plan.view,
                 "augmentation": json.dumps(plan.augmentation.to_dict())}
    if plan.lineage:
        attrs["lineage"] = json.dumps(plan.lineage)
    return {
        **attrs,
        "encoding-type": layout.ENCODING_TYPE,
        "encoding-version": layout.ENCODING_VERSION,
        "fingerprint": plan.fingerprint,
        "inputs": json.dumps(plan.inputs),
        "preprocessing": json.dumps(plan.preprocessing.to_dict()),
        "dataset": plan.dataset.name,
        "source": json.dumps(plan.dataset.source),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "libraries": json.dumps(library_versions()),
        # Since format 1.1: where a weights file was read, so predict/serve/export can rebuild the
        # backbone without being told (the fingerprint still records only the file's digest).
        "weights-path": str(plan.weights.path) if plan.weights.path else "",
    }


def extract_views(plan: ExtractionPlan, augmentation: Augmentation, count: int, store: Store,
                  progress: bool = True) -> list[ExtractionResult]:
    """Cache views 0..count-1 of the training images; views already cached are reused.

    Each view is its own cache file (kind "views", linked to its parent), so asking for more
    views later extends the set without recomputing the ones that exist.
    """
    if not 1 <= count <= 64:
        raise HeadstartError(f"--augment must be between 1 and 64 views; got {count}.")
    return [extract_features(view, store, progress) for view in plan.view_plans(augmentation, count)]
