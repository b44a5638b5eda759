"""`extract --engine ray`: one Ray task per shard, on a running cluster or a local instance.

Each task runs `extract --shard i/N` (the same code as any scheduler would run) into the store,
which every node must reach at the same path (NFS, Lustre, a shared disk). Tasks ask for one GPU
each where the cluster has GPUs; a task whose worker dies or raises is retried and resumes from
its finished segments; a user error (bad weights file, say) is reported, not retried. The driver
shows overall progress by watching the shards' files, and merges the shards at the end.

Ray is an optional extra: `pip install -e '.[ray]'`.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from extract.pipeline import extract_features
from extract.settings import ExtractSettings
from store.cache import FeatureCache
from store.errors import HeadstartError
from store.shards import MergeResult, ShardSpec, merge_shards, shard_of, shard_sets
from store.store import Store

SOURCE_ROOT = Path(__file__).resolve().parents[1]
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class RayOptions:
    """Where and how the shards run."""

    address: str | None = None  # None: a new local Ray instance; "auto" or "ray://host:10001"
    shards: int | None = None  # default: one per GPU, else one per cpus_per_shard CPUs
    cpus_per_shard: float = 4.0
    gpus_per_shard: float | None = None  # default: 1 where the cluster has GPUs, else 0
    retries: int = 2
    keep_shards: bool = False
    local_cpus: int | None = None  # CPUs of a local instance (default: all)


@dataclass
class RayRun:
    """What `extract_on_ray` did."""

    merge: MergeResult | None  # None when the finished cache was reused without Ray
    shards: list[dict[str, Any]] = field(default_factory=list)  # one summary per shard task
    seconds: float = 0.0
    count: int = 0
    reused: FeatureCache | None = None  # the finished cache, when it was reused


def run_shard(settings: ExtractSettings, spec: ShardSpec, store_root: str, fingerprint: str,
              fail_marker: str | None = None, fail_after: int = 0) -> dict[str, Any]:
    """Extract one shard (in a Ray worker). A user error comes back as {"error": sentence}.

    `fail_marker` (tests only): the first attempt kills its own worker, so the retry is tested;
    with `fail_after` > 0 it dies only after writing that many segments (of 64 images), so the
    retry must resume from them.
    """
    if fail_marker and not os.path.exists(fail_marker):
        _die_after(fail_marker, fail_after, settings.image_size)
    started = time.perf_counter()
    try:
        plan = settings.plan(spec)
        if plan.fingerprint != fingerprint:
            return {"shard": str(spec), "error": (
                f"Shard {spec} on {socket.gethostname()} sees other images or settings than the "
                f"driver (fingerprint {plan.fingerprint[:12]}, not {fingerprint[:12]}); the dataset "
                "and weights must be the same files on every node.")}
        result = extract_features(plan, Store(store_root), progress=False)
    except HeadstartError as error:
        return {"shard": str(spec), "error": f"Shard {spec}: {error}"}
    return {"shard": str(spec), "host": socket.gethostname(), "computed": result.computed,
            "reused": result.reused, "seconds": round(time.perf_counter() - started, 2)}


def _die_after(marker: str, segments: int, image_size: int) -> None:
    """Tests only: exit this worker once `segments` segments are written (at once for 0); the
    marker file records how many were."""
    if segments <= 0:
        Path(marker).touch()
        os._exit(1)
    import extract.plan as plan_module
    from store.partial import PartialCache

    plan_module.SEGMENT_BYTES = 64 * 3 * image_size**2  # 64-image segments (at batch size 64)
    real_write = PartialCache.write_segment
    written: list[int] = []

    def write_then_die(self: PartialCache, split: str, index: int, segment: Any) -> None:
        real_write(self, split, index, segment)
        written.append(index)
        if len(written) == segments:
            Path(marker).write_text(str(len(written)))
            os._exit(1)

    PartialCache.write_segment = write_then_die  # type: ignore[method-assign]


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise HeadstartError("--engine ray needs Ray, an optional extra: pip install -e '.[ray]' "
                             "(or pip install 'ray>=2.9').") from None
    return ray


def start_ray(address: str | None = None, local_cpus: int | None = None) -> Any:
    """Join the cluster at `address`, or start a local instance (`local_cpus` CPUs; default all).

    Workers import headstart from this checkout first (where the path exists on their node).
    """
    ray = _import_ray()
    ray.init(address=address or "local", num_cpus=None if address else local_cpus,
             include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{SOURCE_ROOT}:${{PYTHONPATH}}",
                                       "TF_CPP_MIN_LOG_LEVEL": "2"}})
    return ray


def extract_on_ray(settings: ExtractSettings, store: Store, options: RayOptions,
                   progress: bool = True, fail_once: tuple[int, str] | tuple[int, str, int] | None = None
                   ) -> RayRun:
    """Fan the shards of `settings` out as Ray tasks, wait (showing progress), then merge."""
    started = time.perf_counter()
    dataset = settings.open_dataset()
    plan = settings.plan(dataset=dataset)
    reused = store.reusable(plan.fingerprint)
    if reused is not None:
        return RayRun(None, reused=reused)
    ray = _import_ray()
    store_root = str(store.root.expanduser().resolve())
    own_instance = not ray.is_initialized()
    if own_instance:
        start_ray(options.address, options.local_cpus)
    try:
        count, task = _shard_task(ray, options, store, plan.fingerprint)
        specs = [ShardSpec(i, count) for i in range(count)]
        refs = {
            task.remote(settings, spec, store_root, plan.fingerprint,
                        *(fail_once[1:] if fail_once and fail_once[0] == spec.index else ())): spec
            for spec in specs
        }
        summaries = _wait(ray, refs, store, plan, dataset, count, progress, options.retries)
    finally:
        if own_instance:
            ray.shutdown()
    errors = [s["error"] for s in summaries if "error" in s]
    if errors:
        raise HeadstartError(" ".join(errors))
    merged = merge_shards(store, plan.fingerprint, keep_shards=options.keep_shards)[0]
    return RayRun(merged, shards=summaries, seconds=time.perf_counter() - started, count=count)


def _shard_task(ray: Any, options: RayOptions, store: Store, fingerprint: str) -> tuple[int, Any]:
    """The number of shards and the remote function with its resources and retries."""
    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0))
    per_gpu = options.gpus_per_shard if options.gpus_per_shard is not None else (1.0 if gpus else 0.0)
    started = [max(s.counts) for s in shard_sets(store) if s.fingerprint == fingerprint]
    if options.shards:
        count = options.shards
    elif started:  # resume with the shard count a previous run chose
        count = started[0]
    elif per_gpu:
        count = max(1, int(gpus // per_gpu))
    else:
        count = max(1, int(float(resources.get("CPU", 1)) // options.cpus_per_shard))
    ShardSpec(0, count)  # checks the count
    task = ray.remote(run_shard).options(
        num_cpus=options.cpus_per_shard, num_gpus=per_gpu, max_retries=options.retries,
        retry_exceptions=True,
        # TensorFlow keeps a GPU for the life of its process: a fresh worker for every GPU shard
        **({"max_calls": 1} if per_gpu else {}),
    )
    return count, task


def _wait(ray: Any, refs: dict[Any, ShardSpec], store: Store, plan: Any, dataset: Any,
          count: int, progress: bool, retries: int) -> list[dict[str, Any]]:
    """Wait for every shard task, showing images done (read from the store) and shards done."""
    from tqdm import tqdm

    sizes = _shard_sizes(dataset, count)
    bar = tqdm(total=int(sizes.sum()), unit="img", desc=f"extract on ray ({count} shards)",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    pending = list(refs)
    summaries: list[dict[str, Any]] = []
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_SECONDS)
            for ref in ready:
                spec = refs[ref]
                try:
                    summaries.append(ray.get(ref))
                except ray.exceptions.RayError as error:
                    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    summaries.append({"shard": str(spec), "error": (
                        f"Shard {spec} failed {retries + 1} times ({first}); rerun the same "
                        "command to resume it.")})
            bar.update(max(0, _images_done(store, plan, sizes, count) - bar.n))
            bar.set_postfix_str(f"shards {count - len(pending)}/{count} done")
    finally:
        bar.close()
    return summaries


def _shard_sizes(dataset: Any, count: int) -> np.ndarray:
    sizes = np.zeros(count, dtype=np.int64)
    for split, samples in dataset.splits.items():
        for sample_id in samples.ids:
            sizes[shard_of(split, sample_id, count)] += 1
    return sizes


def _images_done(store: Store, plan: Any, sizes: np.ndarray, count: int) -> int:
    """Images done, read from the store: whole finished shards, and segments of running ones."""
    done = 0
    segment = plan.segment_size
    for i in range(count):
        stem = f"{plan.fingerprint}.{ShardSpec(i, count).suffix}"
        if store.cache_path(stem).is_file():
            done += int(sizes[i])
        elif store.partial_dir(stem).is_dir():
            segments = sum(1 for p in store.partial_dir(stem).glob("*.npz")
                           if not p.name.startswith("."))
            done += min(int(sizes[i]), segments * segment)
    return done
