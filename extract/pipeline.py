"""One backbone pass over a dataset, streamed into a resumable feature cache."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from importlib import metadata
from typing import Any, Callable, Iterator

import numpy as np

from extract.augment import AUGMENT_CHUNK, Augmentation
from extract.backbones import Backbone, Weights, build_feature_model, check_options
from extract.datasets import SPLITS, Dataset
from extract.images import BadImage
from extract.preprocessing import Preprocessing
from extract.runtime import load_keras
from store import layout
from store.cache import FeatureCache
from store.errors import HeadstartError
from store.fingerprint import fingerprint
from store.format import CacheAttributes, utc_now
from store.partial import PartialCache, Segment
from store.store import Store

#: Image sizes the forward function is traced for; batches of further sizes are resized first.
MAX_TRACED_SHAPES = 4
#: Bytes of decoded images one segment may hold; segments are also the unit of resume.
SEGMENT_BYTES = 1 << 26
MAX_SEGMENT_SIZE = 2048
LIBRARIES = ("headstart", "tensorflow", "keras", "h5py", "numpy", "pillow", "scikit-learn")


PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


@dataclass(frozen=True)
class ComputeOptions:
    """How the backbone runs (the GPU path). The defaults are what the CPU tests and CI use.

    `precision` mixed_* computes in float16/bfloat16 (features come out as float32, then are
    stored in the cache's dtype); it changes the numbers, so it enters the fingerprint when it
    is not float32. `xla` compiles the forward pass with XLA; `multi_gpu` splits every batch
    across the visible GPUs with `tf.distribute.MirroredStrategy`. Neither changes which cache
    is meant (like running on another device, they change the last bits only).
    """

    precision: str = "float32"
    xla: bool = False
    multi_gpu: bool = False
    devices: tuple[str, ...] | None = None  # default: every visible GPU

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise HeadstartError(
                f"Unknown --precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}.")

    def strategy(self) -> Any:
        """The MirroredStrategy over `devices` (every visible GPU), or None for fewer than two."""
        if not self.multi_gpu:
            return None
        return _mirrored_strategy(self.devices)

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """Build the model under this precision policy and strategy scope."""
        keras = load_keras()
        previous = keras.mixed_precision.global_policy().name
        strategy = self.strategy()
        try:
            keras.mixed_precision.set_global_policy(self.precision)
            with strategy.scope() if strategy is not None else contextlib.nullcontext():
                yield
        finally:
            keras.mixed_precision.set_global_policy(previous)


@functools.lru_cache(maxsize=4)
def _mirrored_strategy(devices: tuple[str, ...] | None) -> Any:
    load_keras()
    import tensorflow as tf

    names = list(devices) if devices else [d.name for d in tf.config.list_logical_devices("GPU")]
    return tf.distribute.MirroredStrategy(names) if len(names) >= 2 else None


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
        return self.backbone.preprocessing(self.image_size, self.interpolation, self.resizer)

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
            # only when not float32, so that existing caches keep their fingerprints
            **({"precision": self.compute.precision}
               if self.compute.precision != "float32" else {}),
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
    cpu_seconds: float = 0.0  # process CPU time (all threads) of the pass

    @property
    def skipped(self) -> list[dict[str, str]]:
        """The files the cache could not use, and why."""
        return self.cache.skipped

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
        return ExtractionResult(existing, reused=True)
    with store.writing(key):
        # Another process may have just finished it (and removed its own folder).
        existing = _finished(plan, store, remove_leftovers=False)
        if existing is not None:
            return ExtractionResult(existing, reused=True)
        partial = PartialCache.open(
            store.partial_dir(key),
            {"fingerprint": plan.fingerprint, "segment_size": plan.segment_size,
             "inputs": plan.inputs, **({"shard": str(shard.spec)} if shard else {})},
        )
        try:
            computed, width, seconds, cpu_seconds = _run_backbone(plan, partial, progress)
        except HeadstartError:  # e.g. weights that do not fit: no unfinished cache left behind
            if partial.is_empty():
                partial.remove()
            raise
        dataset = plan.dataset
        partial.assemble(
            store.cache_path(key),
            _cache_attributes(plan),
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
                            cpu_seconds=cpu_seconds)


def _finished(plan: ExtractionPlan, store: Store, remove_leftovers: bool = True
              ) -> FeatureCache | None:
    """The finished cache of `plan`, or for a shard, its file or the merged cache; with
    `remove_leftovers` (not under the cache's lock), an extraction folder a killed writer left
    beside it is removed."""
    lookup = store.reusable if remove_leftovers else store.finished
    for key in dict.fromkeys((plan.fingerprint, plan.storage_key)):
        cache = lookup(key)
        if cache is not None:
            return cache
    return None


def _run_backbone(plan: ExtractionPlan, partial: PartialCache, progress: bool
                  ) -> tuple[int, int, float, float]:
    """Compute every missing segment; returns (images computed, feature width, seconds, CPU
    seconds).

    The seconds cover the pass itself (decode, resize, backbone, segment writes), not building
    the model.
    Decoding runs on `plan.workers` threads a few batches ahead of the backbone; resizing and
    preprocessing run in the backbone's graph, on whole batches; each finished segment is written
    by a background thread while the next one is computed, so the backbone waits on neither.
    """
    todo = [
        (split, k)
        for split in plan.splits
        for k in range(partial.segment_count(len(plan.dataset.splits[split])))
        if not partial.has_segment(split, k)
    ]
    if not todo:  # every segment was finished by an earlier run: only assembly is left
        return 0, _width_of_finished(partial, plan), 0.0, 0.0
    total = sum(len(_segment_rows(plan, partial, split, k)) for split, k in todo)
    with plan.compute.building():
        model = build_feature_model(plan.backbone, plan.alpha, plan.weights, plan.image_size,
                                    plan.pooling)
    width = int(model.output_shape[-1])
    forward = forward_function(model, plan.preprocessing, plan.compute)
    forward(_warm_up_batch(plan, todo[0][0]))  # trace before the clock starts
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc="extract", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    computed = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        with ThreadPoolExecutor(max_workers=plan.workers) as pool, \
                ThreadPoolExecutor(max_workers=1) as writer:
            prefetch = _Prefetch(plan, partial, pool, todo)
            written: Future | None = None
            try:
                for split, k in todo:
                    segment = _compute_segment(plan, forward, prefetch.segment(split, k), width,
                                               bar, split)
                    if written is not None:
                        written.result()  # at most one write in flight; re-raises its error
                    written = writer.submit(partial.write_segment, split, k, segment)
                    computed += len(segment.rows) + len(segment.skipped_rows)
                if written is not None:
                    written.result()
            finally:
                prefetch.cancel()
    finally:
        bar.close()
    return computed, width, time.perf_counter() - started, time.process_time() - cpu_started


def forward_function(model: Any, preprocessing: Preprocessing,
                     compute: "ComputeOptions | None" = None) -> Callable[[np.ndarray], np.ndarray]:
    """Resize, preprocess and the model's inference pass as one compiled function: a batch of
    decoded images (uint8 N×H×W×3, any one size; see `Preprocessing.stack`) in, float32
    features out.

    One traced `tf.function` per image size and dtype (XLA-compiled with `compute.xla`) costs
    less per batch than `model.predict_on_batch`, and resizing in the graph runs vectorized on
    every core. Under a multi-GPU strategy each batch is split across the replicas in order.
    """
    keras = load_keras()
    if keras.backend.backend() != "tensorflow":
        return lambda batch: np.asarray(model.predict_on_batch(
            preprocessing.apply(preprocessing.resize_batch(batch))))
    import tensorflow as tf

    compute = compute or ComputeOptions()
    # XLA compiles the backbone only: resizing stays the op that one-image paths run eagerly.
    backbone = tf.function(lambda x: model(x, training=False), jit_compile=True) \
        if compute.xla else (lambda x: model(x, training=False))

    def infer(batch: Any) -> Any:
        return tf.cast(backbone(preprocessing.graph_inputs(batch)), tf.float32)

    traced: dict[tuple[str, tuple[int, ...]], Any] = {}

    def call(batch: np.ndarray) -> np.ndarray:
        key = (batch.dtype.str, batch.shape[1:])  # one trace per image size, any batch size
        if key not in traced and len(traced) >= MAX_TRACED_SHAPES:  # images of many sizes:
            batch = preprocessing.resize_batch(batch)  # the same numbers, one more trace at most
            key = (batch.dtype.str, batch.shape[1:])
        if key not in traced:
            spec = tf.TensorSpec([None, *batch.shape[1:]], tf.as_dtype(batch.dtype))
            traced[key] = tf.function(infer, input_signature=[spec])
        return np.asarray(traced[key](tf.constant(batch)))

    strategy = compute.strategy()
    if strategy is None or strategy.num_replicas_in_sync == 1:
        return call

    # strategy.run hands a traced function PerReplica values, which an input signature refuses.
    step = tf.function(infer)

    def distributed(batch: np.ndarray) -> np.ndarray:
        parts = np.array_split(batch, strategy.num_replicas_in_sync)
        values = strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(parts[context.replica_id_in_sync_group]))
        outputs = strategy.experimental_local_results(strategy.run(step, args=(values,)))
        return np.concatenate([np.asarray(o) for o in outputs])

    return distributed


def _warm_up_batch(plan: ExtractionPlan, split: str) -> np.ndarray:
    """One blank image of the size the first batch will most likely have (that of the first
    image of `split`), so the pass starts with the forward function traced."""
    shape: tuple[int, ...] = (plan.image_size, plan.image_size, 3)
    try:
        shape = plan.dataset.load(split, 0, plan.preprocessing, resized=False).shape
    except BadImage:
        pass
    return np.zeros((1, *shape), np.uint8)


def _segment_rows(plan: ExtractionPlan, partial: PartialCache, split: str, k: int) -> range:
    size = partial.segment_size
    return range(k * size, min((k + 1) * size, len(plan.dataset.splits[split])))


@dataclass
class _Batch:
    """Decoded rows of one batch: uint8 images as the graph takes them (`Preprocessing.stack`)."""

    rows: list[int]
    pixels: np.ndarray
    skipped_rows: list[int]
    reasons: list[str]


def _decode_batch(plan: ExtractionPlan, split: str, rows: range) -> _Batch:
    """Decode (worker thread) one batch of rows; bad files are recorded, never raised."""
    ok: list[int] = []
    pixels: list[np.ndarray] = []
    skipped: list[int] = []
    reasons: list[str] = []
    for row in rows:
        try:
            pixels.append(plan.dataset.load(split, row, plan.preprocessing, resized=False))
            ok.append(row)
        except BadImage as error:
            skipped.append(row)
            reasons.append(str(error))
    return _Batch(ok, plan.preprocessing.stack(pixels), skipped, reasons)


class _Prefetch:
    """Decode batches in order on a thread pool, a bounded number of batches ahead.

    The window spans segment boundaries, so the backbone never waits at the start of a segment,
    and memory stays at a few batches whatever the dataset or segment size.
    """

    def __init__(self, plan: ExtractionPlan, partial: PartialCache, pool: ThreadPoolExecutor,
                 todo: list[tuple[str, int]]) -> None:
        self.plan = plan
        self.pool = pool
        self.depth = plan.workers + 2  # batches decoded or decoding ahead of the backbone
        self.tasks = (
            (split, k, rows[start:start + plan.batch_size])
            for split, k in todo
            for rows in [_segment_rows(plan, partial, split, k)]
            for start in range(0, len(rows), plan.batch_size)
        )
        self.window: deque[tuple[str, int, Future]] = deque()
        self._fill()

    def _fill(self) -> None:
        while len(self.window) < self.depth:
            task = next(self.tasks, None)
            if task is None:
                return
            split, k, rows = task
            self.window.append((split, k, self.pool.submit(_decode_batch, self.plan, split, rows)))

    def segment(self, split: str, k: int) -> Iterator[_Batch]:
        """The decoded batches of segment k of `split`, in row order."""
        while self.window and self.window[0][:2] == (split, k):
            future = self.window.popleft()[2]
            self._fill()
            yield future.result()

    def cancel(self) -> None:
        for *_, future in self.window:
            future.cancel()
        self.window.clear()


def _compute_segment(plan: ExtractionPlan, forward: Callable[[np.ndarray], np.ndarray],
                     batches: Iterator[_Batch], width: int, bar: Any, split: str) -> Segment:
    """Run the backbone over one segment's decoded (and, for views, augmented) images."""
    rows: list[int] = []
    skipped_rows: list[int] = []
    reasons: list[str] = []
    features: list[np.ndarray] = []
    held: list[np.ndarray] = []  # views: the segment's resized images, augmented together below
    for batch in batches:
        rows += batch.rows
        skipped_rows += batch.skipped_rows
        reasons += batch.reasons
        bar.update(len(batch.skipped_rows))
        if plan.augmentation is not None:
            held.append(plan.preprocessing.resize_batch(batch.pixels))
        elif len(batch.rows):
            features.append(_features(plan, forward, batch.pixels))
            bar.update(len(batch.rows))
    if held:
        images = np.concatenate(held)
        if len(images):
            images = plan.augmentation.apply(images, np.asarray(rows), plan.view, split)
        for start in range(0, len(images), plan.batch_size):
            inputs = images[start:start + plan.batch_size]
            features.append(_features(plan, forward, inputs))
            bar.update(len(inputs))
    return Segment(
        np.concatenate(features) if features else np.zeros((0, width), dtype=plan.dtype),
        np.asarray(rows, dtype=np.int64),
        np.asarray(skipped_rows, dtype=np.int64),
        reasons,
    )


def _features(plan: ExtractionPlan, forward: Callable[[np.ndarray], np.ndarray],
              inputs: np.ndarray) -> np.ndarray:
    output = forward(inputs)
    return output.reshape(len(inputs), -1).astype(plan.dtype)


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


def _cache_attributes(plan: ExtractionPlan) -> CacheAttributes:
    """The root attributes of the plan's cache file (the store owns their names)."""
    views = plan.augmentation is not None and plan.base is not None
    shard = plan.dataset.shard
    return CacheAttributes(
        fingerprint=plan.fingerprint, inputs=plan.inputs,
        preprocessing=plan.preprocessing.to_dict(), dataset=plan.dataset.name,
        source=plan.dataset.source, created=utc_now(), libraries=library_versions(),
        weights_path=str(plan.weights.path) if plan.weights.path else None,
        kind="shard" if shard else "views" if views else "features",
        parent=plan.base.fingerprint if views and plan.base else None,
        view=plan.view if views else None,
        augmentation=plan.augmentation.to_dict() if views and plan.augmentation else None,
        lineage=plan.lineage or None, shard=shard.info() if shard else None,
    )


def extract_views(plan: ExtractionPlan, augmentation: Augmentation, count: int, store: Store,
                  progress: bool = True) -> list[ExtractionResult]:
    """Cache views 0..count-1 of the training images; views already cached are reused.

    Each view is its own cache file (kind "views", linked to its parent), so asking for more
    views later extends the set without recomputing the ones that exist.
    """
    if not 1 <= count <= 64:
        raise HeadstartError(f"--augment must be between 1 and 64 views; got {count}.")
    return [extract_features(view, store, progress) for view in plan.view_plans(augmentation, count)]
