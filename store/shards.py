"""Shards: one cache's samples cut by a hash of each sample id, extracted anywhere, then merged.

A shard `i/N` holds the samples whose id hashes to part i of N (adding files never moves the
others). It is its own file, `STORE/caches/<fingerprint>.shard-000i-of-000N.h5` (while running:
`.partial/` beside it) of kind "shard" (docs/format.md: the FULL cache's fingerprint, and each
row's index in the full split). Its name is not a bare fingerprint, so the store never takes it
for a cache.

`merge_shards` checks a set (all N present and finished, one fingerprint, every sample exactly
once, in the right shard) and copies it into one ordinary cache whose rows are in the order a
single-machine extraction writes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from store.cache import FeatureCache
from store.errors import HeadstartError, command
from store.fingerprint import unit_fraction
from store.format import utc_now
from store.selection import matching
from store.store import Store
from store.writer import write_cache

SHARD_SALT = "headstart-shard:"
MAX_SHARDS = 100_000
SHARD_NAME = re.compile(r"(?P<fingerprint>[0-9a-f]{64})\.shard-(?P<index>\d+)-of-(?P<count>\d+)")
_MERGE_BLOCK_BYTES = 1 << 26  # merged features are copied in blocks of about this size


def shard_of(split: str, sample_id: str, count: int) -> int:
    """The shard (0..count-1) a sample belongs to: a hash of its split and id, nothing else."""
    return min(count - 1, int(unit_fraction(f"{split}/{sample_id}", SHARD_SALT) * count))


def ids_digest(ids: Sequence[str]) -> str:
    """Digest of a split's sample ids in order (a merged shard set must reproduce it)."""
    sha = hashlib.sha256()
    for sample_id in ids:
        sha.update(sample_id.encode("utf-8") + b"\n")
    return sha.hexdigest()


@dataclass(frozen=True)
class ShardSpec:
    """Shard `index` of `count` (0-based), written `index/count` on the command line."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS or not 0 <= self.index < self.count:
            raise HeadstartError(
                f"--shard {self.index}/{self.count} is not a shard: use i/N with 0 <= i < N "
                f"and 1 <= N <= {MAX_SHARDS}.")

    @classmethod
    def parse(cls, text: str) -> "ShardSpec":
        """'3/16' -> ShardSpec(3, 16)."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise HeadstartError(f"--shard expects i/N, e.g. 3/16 (shards 0 to 15); got {text!r}.")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def suffix(self) -> str:
        """The part of the file name after the fingerprint."""
        return f"shard-{self.index:04d}-of-{self.count:04d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, split: str, sample_id: str) -> bool:
        return shard_of(split, sample_id, self.count) == self.index


@dataclass
class ShardSelection:
    """The samples of the full dataset one shard holds."""

    spec: ShardSpec
    rows: dict[str, np.ndarray]  # per split: index in the full split of each shard sample
    totals: dict[str, int]  # per split: samples in the full split
    ids: dict[str, str]  # per split: ids_digest of the full split

    @classmethod
    def select(cls, spec: ShardSpec, split_ids: dict[str, Sequence[str]]) -> "ShardSelection":
        rows = {split: np.asarray([i for i, sample_id in enumerate(ids) if spec.owns(split, sample_id)],
                                  dtype=np.int64)
                for split, ids in split_ids.items()}
        return cls(spec, rows, {s: len(ids) for s, ids in split_ids.items()},
                   {s: ids_digest(ids) for s, ids in split_ids.items()})

    def info(self) -> dict[str, Any]:
        """The `shard` attribute that makes a cache file a shard (its `kind` is "shard")."""
        return {"index": self.spec.index, "count": self.spec.count, "totals": self.totals,
                "ids": self.ids}


# --- finding shards in a store ---------------------------------------------------------------


@dataclass
class ShardSet:
    """Everything in a store for one fingerprint's shards: finished files and unfinished runs."""

    fingerprint: str
    finished: dict[ShardSpec, Path] = field(default_factory=dict)
    unfinished: dict[ShardSpec, Path] = field(default_factory=dict)

    @property
    def short_id(self) -> str:
        return self.fingerprint[:12]

    @property
    def counts(self) -> set[int]:
        return {s.count for s in (*self.finished, *self.unfinished)}

    def name(self) -> str:
        """The readable name of the cache these shards make (from any finished shard)."""
        for path in self.finished.values():
            with contextlib.suppress(HeadstartError):
                return FeatureCache(path).name
        return "unnamed"

    def summary(self) -> dict[str, Any]:
        count = max(self.counts)
        done = sorted(s.index for s in self.finished if s.count == count)
        running = sorted(s.index for s in self.unfinished if s.count == count)
        return {"fingerprint": self.fingerprint, "name": self.name(), "count": count,
                "finished": done, "unfinished": running,
                "missing": [i for i in range(count) if i not in done and i not in running],
                "other_counts": sorted(self.counts - {count})}


def shard_sets(store: Store) -> list[ShardSet]:
    """Every fingerprint with shard files or unfinished shard runs in the store."""
    sets: dict[str, ShardSet] = {}
    if not store.caches_dir.is_dir():
        return []
    for path in sorted(store.caches_dir.glob("*.shard-*")):
        stem, _, suffix = path.name.rpartition(".")
        match = SHARD_NAME.fullmatch(stem)
        if not match or suffix not in ("h5", "partial"):
            continue
        try:
            spec = ShardSpec(int(match["index"]), int(match["count"]))
        except HeadstartError:
            continue
        found = sets.setdefault(match["fingerprint"], ShardSet(match["fingerprint"]))
        (found.finished if suffix == "h5" else found.unfinished)[spec] = path
    return list(sets.values())


def select_sets(store: Store, selector: str | None) -> list[ShardSet]:
    """The shard sets a fingerprint prefix or cache name picks (all of them without one)."""
    sets = shard_sets(store)
    if not sets:
        raise HeadstartError(f"Store {store.root} holds no shards; make them with "
                             f"'{command('extract DATASET ... --shard i/N')}'.")
    if selector is None:
        return sets
    chosen = matching(sets, selector, lambda s: s.name(), lambda s: s.fingerprint)
    if not chosen:
        known = ", ".join(f"{s.name()} ({s.short_id})" for s in sets)
        raise HeadstartError(f"No shards match {selector!r}; shards in this store are of: {known}.")
    return chosen


# --- checking and merging -----------------------------------------------------------------------


@dataclass
class MergeResult:
    """What a merge made."""

    cache: FeatureCache
    shards: int
    seconds: float
    reused: bool = False
    removed: list[Path] = field(default_factory=list)

    def lines(self) -> list[str]:
        """What the merge made and where, as the CLI prints it."""
        cache = self.cache
        rows = ", ".join(f"{n} {r}" for n, r in cache.split_sizes.items())
        verb = "Already merged:" if self.reused else f"Merged {self.shards} shards into"
        lines = [f"{verb} cache {cache.name} ({cache.short_id}), {rows} rows x {cache.width} "
                 f"({cache.dtype}); written to {cache.path}"]
        if self.removed:
            lines.append(f"Removed {len(self.removed)} shard files (use --keep-shards to keep "
                         "them).")
        return lines


def merge_shards(store: Store, selector: str | None = None, keep_shards: bool = False
                 ) -> list[MergeResult]:
    """Check and merge every shard set the selector picks; one sentence per problem, else caches.

    Nothing is merged unless every chosen set passes its checks.
    """
    sets = select_sets(store, selector)
    problems: list[str] = []
    checked: list[tuple[ShardSet, list[FeatureCache]]] = []
    for shard_set in sets:
        try:
            if store.finished(shard_set.fingerprint) is not None:
                checked.append((shard_set, []))
            else:
                checked.append((shard_set, check_set(shard_set, sets)))
        except HeadstartError as error:
            problems.append(str(error))
    if problems:
        raise HeadstartError(" ".join(problems))
    return [_merge_checked(store, shard_set, shards, keep_shards) for shard_set, shards in checked]


def check_set(shard_set: ShardSet, others: Sequence[ShardSet] = ()) -> list[FeatureCache]:
    """The finished shards of a complete, consistent set, in index order; else a clear error."""
    title = f"Shards of cache {shard_set.name()} ({shard_set.short_id})"
    if len(shard_set.counts) > 1:
        every = sorted({*shard_set.finished, *shard_set.unfinished}, key=lambda s: s.index)
        by_count = "; ".join(f"{', '.join(str(s) for s in every if s.count == n)} cut it into {n}"
                             for n in sorted(shard_set.counts))
        raise HeadstartError(
            f"{title} disagree on the number of shards ({by_count}); delete the odd ones, or "
            "rerun them with the same N.")
    count = next(iter(shard_set.counts))
    missing = [i for i in range(count) if ShardSpec(i, count) not in shard_set.finished]
    if missing:
        running = [i for i in missing if ShardSpec(i, count) in shard_set.unfinished]
        text = (f"{title} cannot be merged: {len(missing)} of {count} shards not finished "
                f"({_join(missing, count)})")
        if running:
            text += (f"; {_join(running, count)} started: rerun the same extract --shard i/{count} "
                     "to resume")
        strays = [o for o in others if o.fingerprint != shard_set.fingerprint
                  and o.name() == shard_set.name()]
        if strays:
            text += ("; shards of the same dataset and backbone with another fingerprint ("
                     + ", ".join(f"{o.short_id}: {_join(sorted(s.index for s in o.finished), max(o.counts))}"
                                 for o in strays)
                     + ") were made from other images or settings and cannot be mixed in")
        raise HeadstartError(text + ".")
    shards = [FeatureCache(shard_set.finished[ShardSpec(i, count)]) for i in range(count)]
    for i, shard in enumerate(shards):
        info = shard.shard or {}
        if (shard.kind != "shard" or shard.fingerprint != shard_set.fingerprint
                or info.get("index") != i or info.get("count") != count):
            said = (f"shard {info.get('index')}/{info.get('count')} of cache {shard.fingerprint[:12]}"
                    if info else f"a {shard.kind} cache {shard.fingerprint[:12]}")
            raise HeadstartError(
                f"{shard.path.name} says it is {said}, not what its file name says; it was "
                "renamed or copied in by mistake: delete it and rerun that shard.")
    first = shards[0].shard or {}
    for shard in shards[1:]:
        info = shard.shard or {}
        if info.get("totals") != first.get("totals") or info.get("ids") != first.get("ids"):
            raise HeadstartError(
                f"{title} disagree on the samples of the full dataset (shard {info.get('index')}/"
                f"{count} against 0/{count}); rerun them from the same images.")
    with_rows = [s for s in shards if sum(s.split_sizes.values())]
    layouts = {(s.width, s.dtype) for s in with_rows}
    if len(layouts) > 1:
        raise HeadstartError(f"{title} disagree on feature width or type ({sorted(layouts)}).")
    return shards


def _join(indices: Sequence[int], count: int, most: int = 10) -> str:
    """'1/4, 3/4'; long lists end with '... and K more'."""
    text = ", ".join(f"{i}/{count}" for i in indices[:most])
    return text + (f" ... and {len(indices) - most} more" if len(indices) > most else "")


@dataclass
class _SplitPlan:
    """Where each merged row of one split comes from."""

    owner: np.ndarray  # shard of each merged row
    local: np.ndarray  # row within that shard
    ids: np.ndarray  # sample id of each merged row
    skipped: list[tuple[int, str, str]]  # (full-split row, id, reason)


def _plan_split(split: str, shards: list[FeatureCache], handles: list[h5py.File],
                total: int, expected_ids: str) -> _SplitPlan:
    """Check that the shards hold every sample of `split` once, in its own shard; order them."""
    count = len(shards)
    seen = np.full(total, -1, dtype=np.int64)
    ids_in_order = np.empty(total, dtype=object)
    sources, owners, locals_ = [], [], []
    skipped: list[tuple[int, str, str]] = []
    for k, (shard, handle) in enumerate(zip(shards, handles)):
        group = handle[split] if split in handle else None
        rows = np.asarray(group["rows"][...], np.int64) if group is not None else np.zeros(0, np.int64)
        ids = group["ids"].asstr()[...] if group is not None else np.zeros(0, object)
        lost = handle["skipped"]
        mine = lost["split"].asstr()[...] == split
        lost_rows = np.asarray(lost["row"][...], np.int64)[mine]
        lost_ids = lost["id"].asstr()[...][mine]
        reasons = lost["reason"].asstr()[...][mine]
        for row, sample_id in zip(np.concatenate([rows, lost_rows]).tolist(),
                                  [*ids.tolist(), *lost_ids.tolist()]):
            where = f"{split} sample {sample_id!r}"
            if not 0 <= row < total:
                raise HeadstartError(f"Shard {k}/{count} holds {where} at row {row}, outside the "
                                     f"{total} rows of the full split; it is damaged.")
            if seen[row] >= 0:
                raise HeadstartError(f"Shards {seen[row]}/{count} and {k}/{count} both hold {where}; "
                                     "delete one of them and rerun it.")
            if shard_of(split, sample_id, count) != k:
                raise HeadstartError(
                    f"Shard {k}/{count} holds {where}, which belongs to shard "
                    f"{shard_of(split, sample_id, count)}/{count}; it was made another way: "
                    "rerun it with this headstart.")
            seen[row] = k
            ids_in_order[row] = sample_id
        sources.append(rows)
        owners.append(np.full(len(rows), k, np.int64))
        locals_.append(np.arange(len(rows), dtype=np.int64))
        skipped.extend(zip(lost_rows.tolist(), lost_ids.tolist(), reasons.tolist()))
    absent = np.flatnonzero(seen < 0)
    if len(absent):
        raise HeadstartError(
            f"The shards hold no {split} sample at {len(absent)} row(s) of the full split (first: "
            f"row {absent[0]}); they were cut from different images: rerun them from the same ones.")
    if ids_digest(ids_in_order.tolist()) != expected_ids:
        raise HeadstartError(f"The {split} sample ids of the shards differ from the full dataset's; "
                             "rerun the shards from the same images.")
    source = np.concatenate(sources)
    order = np.argsort(source, kind="stable")
    return _SplitPlan(np.concatenate(owners)[order], np.concatenate(locals_)[order],
                      ids_in_order[source[order]], sorted(skipped))


def _merge_checked(store: Store, shard_set: ShardSet, shards: list[FeatureCache],
                   keep_shards: bool) -> MergeResult:
    started = time.perf_counter()
    fingerprint = shard_set.fingerprint
    with store.writing(fingerprint):
        existing = store.finished(fingerprint)
        if existing is None:
            write_merged(store.cache_path(fingerprint), shards)
        cache = FeatureCache(store.cache_path(fingerprint))
    removed: list[Path] = []
    if not keep_shards:
        for path in [*shard_set.finished.values(), *shard_set.unfinished.values()]:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return MergeResult(cache, len(shards), time.perf_counter() - started,
                       reused=existing is not None, removed=removed)


def write_merged(target: Path, shards: list[FeatureCache]) -> None:
    """Copy the rows of checked shards into one cache file at `target`, in full-split order."""
    info = shards[0].shard or {}
    totals: dict[str, int] = info["totals"]
    width, dtype = next(((s.width, s.dtype) for s in shards if sum(s.split_sizes.values())),
                        (shards[0].width, shards[0].dtype))
    attributes = shards[0].attributes.replace(kind="features", shard=None, created=utc_now(),
                                              merged={"shards": len(shards)})
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(h5py.File(s.path, "r")) for s in shards]
        plans = {split: _plan_split(split, shards, handles, totals[split], info["ids"][split])
                 for split in totals}
        compression = next((h[s]["features"].compression for h in handles for s in totals
                            if s in h and h[s]["features"].shape[0]), None)
        skipped: list[tuple[str, str, str]] = []
        with write_cache(target, attributes, shards[0].class_names) as out:
            for split, plan in plans.items():
                labels = np.concatenate([h[split]["labels"][...] if split in h else
                                         np.zeros(0, np.int32) for h in handles])
                offsets = np.cumsum([0] + [len(h[split]["labels"]) if split in h else 0
                                           for h in handles])
                sources = [h[split]["features"] if split in h else None for h in handles]
                mirrored = [h[split]["mirrored"] if split in h else None for h in handles] \
                    if attributes.tta is not None else []
                out.split(split, _copy_rows(plan, sources, width, dtype), rows=len(plan.owner),
                          width=width, dtype=dtype, labels=labels[offsets[plan.owner] + plan.local],
                          ids=plan.ids.tolist(), compression=compression,
                          mirrored=_copy_rows(plan, mirrored, width, dtype)
                          if attributes.tta is not None else None)
                skipped.extend((split, sample_id, reason) for _, sample_id, reason in plan.skipped)
            out.skipped(skipped)


def _copy_rows(plan: _SplitPlan, sources: list[h5py.Dataset | None], width: int, dtype: str
               ) -> Iterator[np.ndarray]:
    """The merged rows block by block; in one block each shard's rows are one contiguous slice."""
    block = max(1, _MERGE_BLOCK_BYTES // max(1, width * np.dtype(dtype).itemsize))
    for start in range(0, len(plan.owner), block):
        owner = plan.owner[start:start + block]
        local = plan.local[start:start + block]
        values = np.empty((len(owner), width), dtype=dtype)
        for k in np.unique(owner):
            mine = owner == k
            first, last = int(local[mine][0]), int(local[mine][-1]) + 1
            source = sources[int(k)]
            assert source is not None and last - first == int(mine.sum())
            values[mine] = source[first:last]
        yield values
