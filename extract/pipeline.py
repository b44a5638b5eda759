"""The pass: one backbone run over a plan's images, streamed into a resumable feature cache."""

from __future__ import annotations

import functools
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from extract.augment import Augmentation
from extract.backbones import build_feature_model
from extract.forward import ViewsForward, views_forward
from extract.runtimes import concurrent_calls, runtime_forward
from extract.images import BadImage
from extract.multiblock import BlockColumns, multiblock_model
from extract.plan import ExtractionPlan
from store.cache import FeatureCache
from store.errors import HeadstartError, Interrupted
from store.partial import PartialCache, Segment
from store.store import Store


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
             "inputs": plan.inputs, **({"shard": str(shard.spec)} if shard else {}),
             **({"mirrored": True} if plan.tta else {})},
        )
        try:
            computed, columns, seconds, cpu_seconds = _run_backbone(plan, partial, progress,
                                                                     store.root)
        except HeadstartError:  # e.g. weights that do not fit: no unfinished cache left behind
            if partial.is_empty():
                partial.remove()
            raise
        except KeyboardInterrupt:
            kept, total = _finished_rows(plan, partial)
            raise Interrupted(
                f"Interrupted. Kept {kept} of {total} images in finished segments of cache "
                f"{plan.fingerprint[:12]}; run the same command again to resume from them."
                if kept else f"Interrupted before the first segment of cache "
                f"{plan.fingerprint[:12]} was finished; nothing was kept.") from None
        dataset = plan.dataset
        partial.assemble(
            store.cache_path(key),
            plan.cache_attributes(columns),
            class_names=dataset.class_names,
            split_ids={s: dataset.splits[s].ids for s in plan.splits},
            split_labels={s: dataset.splits[s].labels for s in plan.splits},
            width=columns[-1].stop,
            dtype=plan.dtype,
            compression=plan.compression,
            source_rows=shard.rows if shard else None,
        )
        partial.remove()
    cache = store.finished(key)
    assert cache is not None
    return ExtractionResult(cache, reused=False, computed=computed, seconds=seconds,
                            cpu_seconds=cpu_seconds)


def _finished_rows(plan: ExtractionPlan, partial: PartialCache) -> tuple[int, int]:
    """Rows of the plan's splits held by finished segments, and rows in all."""
    kept = total = 0
    for split in plan.splits:
        rows = len(plan.dataset.splits[split])
        total += rows
        for k in range(partial.segment_count(rows)):
            if partial.has_segment(split, k):
                kept += len(_segment_rows(plan, partial, split, k))
    return kept, total


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


def _build_model(plan: ExtractionPlan) -> tuple[Any, list[BlockColumns]]:
    """The plan's feature model (its last `plan.blocks` blocks) and each block's columns."""
    with plan.compute.building():
        model = build_feature_model(plan.backbone, plan.alpha, plan.weights, plan.image_size,
                                    plan.pooling)
        if plan.blocks == 1:  # today's model, untouched
            return model, [BlockColumns("output", 0, int(model.output_shape[-1]))]
        return multiblock_model(model, plan.blocks, plan.pooling)


def _run_backbone(plan: ExtractionPlan, partial: PartialCache, progress: bool,
                  store_root: Path | None = None) -> tuple[int, list[BlockColumns], float, float]:
    """Compute every missing segment; returns (images computed, the columns of each block,
    seconds, CPU seconds).

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
        if plan.blocks == 1:
            return 0, [BlockColumns("output", 0, _width_of_finished(partial, plan))], 0.0, 0.0
        return 0, _build_model(plan)[1], 0.0, 0.0  # the block names and widths
    total = sum(len(_segment_rows(plan, partial, split, k)) for split, k in todo)
    model, columns = _build_model(plan)
    width = columns[-1].stop

    def make(model: Any, preprocessing: Any, compute: Any, mirror: bool = False) -> Any:
        return runtime_forward(plan.compute.runtime, model, preprocessing, compute,
                               store_root=store_root, inputs=plan.inputs, mirror=mirror,
                               throughput=True)

    forward = views_forward(model, plan.preprocessing, plan.compute, plan.tta, make=make)
    concurrent = concurrent_calls(plan.compute.runtime)
    forward(_warm_up_batch(plan, todo[0][0]))  # trace before the clock starts
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc="extract", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    computed = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        with ThreadPoolExecutor(max_workers=plan.workers) as pool, \
                ThreadPoolExecutor(max_workers=1) as writer, \
                ThreadPoolExecutor(max_workers=2, thread_name_prefix="backbone") as calls:
            prefetch = _Prefetch(plan, partial, pool, todo)
            written: Future | None = None
            try:
                for split, k in todo:
                    segment = _compute_segment(plan, forward, prefetch.segment(split, k), width,
                                               bar, split, calls if concurrent else None)
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
    return computed, columns, time.perf_counter() - started, time.process_time() - cpu_started


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


def _compute_segment(plan: ExtractionPlan, forward: ViewsForward, batches: Iterator[_Batch],
                     width: int, bar: Any, split: str, calls: ThreadPoolExecutor | None = None
                     ) -> Segment:
    """Run the backbone over one segment's decoded (and, for views, augmented) images; with
    `plan.tta`, over their mirrored views too. With `calls`, two batches at once on it."""
    rows: list[int] = []
    skipped_rows: list[int] = []
    reasons: list[str] = []
    features: list[tuple[np.ndarray, np.ndarray | None]] = []
    held: list[np.ndarray] = []  # views: the segment's resized images, augmented together below

    def decoded() -> Iterator[Callable[[], tuple[np.ndarray, np.ndarray | None]]]:
        for batch in batches:
            rows.extend(batch.rows)
            skipped_rows.extend(batch.skipped_rows)
            reasons.extend(batch.reasons)
            bar.update(len(batch.skipped_rows))
            if plan.augmentation is not None:
                held.append(plan.preprocessing.resize_batch(batch.pixels))
            elif len(batch.rows):
                yield functools.partial(_features, plan, forward, batch.pixels)

    for stored in _in_order(decoded(), calls):
        features.append(stored)
        bar.update(len(stored[0]))
    if held:
        images = np.concatenate(held)
        if len(images):
            images = plan.augmentation.apply(images, np.asarray(rows), plan.view, split)
        starts = range(0, len(images), plan.batch_size)
        for stored in _in_order((functools.partial(_features, plan, forward,
                                                   images[start:start + plan.batch_size])
                                 for start in starts), calls):
            features.append(stored)
            bar.update(len(stored[0]))
    empty = np.zeros((0, width), dtype=plan.dtype)
    return Segment(
        np.concatenate([f for f, _ in features]) if features else empty,
        np.asarray(rows, dtype=np.int64),
        np.asarray(skipped_rows, dtype=np.int64),
        reasons,
        (np.concatenate([m for _, m in features]) if features else empty)
        if plan.tta is not None else None,
    )


def _in_order(calls: Iterable[Callable[[], Any]], pool: ThreadPoolExecutor | None,
              depth: int = 2) -> Iterator[Any]:
    """The results of `calls` in order: each called in this thread without `pool`, else up to
    `depth` running at once on it."""
    if pool is None:
        for call in calls:
            yield call()
        return
    pending: deque[Future] = deque()
    for call in calls:
        pending.append(pool.submit(call))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _features(plan: ExtractionPlan, forward: ViewsForward, inputs: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored rows of one batch: (features, mirrored features or None) in the plan's dtype."""
    output, mirrored = forward(inputs)
    return (output.reshape(len(inputs), -1).astype(plan.dtype),
            None if mirrored is None else mirrored.reshape(len(inputs), -1).astype(plan.dtype))


def _width_of_finished(plan_partial: PartialCache, plan: ExtractionPlan) -> int:
    """Feature width read back from any finished segment (0 when none has rows)."""
    for split in plan.splits:
        for k in range(plan_partial.segment_count(len(plan.dataset.splits[split]))):
            segment = plan_partial.read_segment(split, k)
            if segment is not None and segment.features.ndim == 2 and len(segment.rows):
                return int(segment.features.shape[1])
    return 0


def extract_views(plan: ExtractionPlan, augmentation: Augmentation, count: int, store: Store,
                  progress: bool = True) -> list[ExtractionResult]:
    """Cache views 0..count-1 of the training images; views already cached are reused.

    Each view is its own cache file (kind "views", linked to its parent), so asking for more
    views later extends the set without recomputing the ones that exist.
    """
    if not 1 <= count <= 64:
        raise HeadstartError(f"--augment must be between 1 and 64 views; got {count}.")
    return [extract_features(view, store, progress) for view in plan.view_plans(augmentation, count)]
