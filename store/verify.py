"""`verify`: check every cache and head in a store, reading all of its bytes; optionally repair.

For each finished cache: format and version, the fingerprint matches the file name, rows agree
per split (features, labels, ids), ids are unique, labels index the class names, features are
finite, and every features chunk is read so that HDF5's Fletcher-32 checksums are checked. For
each head: a readable sidecar, its model file present and matching the recorded SHA-256. Also
reported: unfinished extractions, temporary files left by a crash, lock files no process holds,
and model files no sidecar names.

With `fix`, only what cannot be trusted is removed (a corrupt cache, an unfinished extraction
nobody is writing, crash leftovers, orphan or corrupt model files), each after saying so. A
healthy cache or head is never touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py

from store.cache import FeatureCache
from store.check import layout_problems
from store.errors import HeadstartError
from store.fingerprint import digest_file
from store.heads import HEAD_FORMAT
from store.shards import SHARD_NAME
from store.selection import matching
from store.store import Store, expand_path

FINGERPRINT = re.compile(r"[0-9a-f]{64}")
TEMPORARY = re.compile(r"\..*\.tmp-(\d+)(\..*)?$")  # store.atomic.atomic_path names


@dataclass
class Problem:
    """One thing wrong, as a sentence, and what `--fix` would remove for it (if anything)."""

    sentence: str
    remove: list[Path] = field(default_factory=list)
    fixed: bool = False


@dataclass
class Report:
    """What `verify` looked at and what it found."""

    caches: int = 0
    rows: int = 0
    heads: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def unfixed(self) -> list[Problem]:
        return [p for p in self.problems if not p.fixed]


def verify_store(store: Store, selector: str | None = None, fix: bool = False,
                 say: Callable[[str], None] = print) -> Report:
    """Check the store (or one cache and its heads); with `fix`, remove what cannot be trusted."""
    report = Report()
    caches_dir = store.caches_dir
    files = sorted(p for p in caches_dir.glob("*.h5") if not p.name.startswith(".")) \
        if caches_dir.is_dir() else []
    if selector is not None:
        files = _select(store, files, selector)
    for path in files:
        problems, rows = check_cache_file(path)
        report.caches += 1
        report.rows += rows
        report.problems.extend(problems)
    healthy = {p.stem for p in files if not any(path_in(p, q.remove) for q in report.problems)}
    if selector is None:
        report.problems.extend(_unfinished(store))
        report.problems.extend(_leftovers(caches_dir))
        report.problems.extend(
            Problem(f"{lock.name}: a lock file no process holds (a writer was killed); --fix "
                    "removes it.", [lock]) for lock in store.stale_locks())
    report.heads, head_problems = _check_heads(store, {p.stem for p in files}, healthy,
                                               only=[p.stem for p in files] if selector else None)
    report.problems.extend(head_problems)
    for problem in report.problems:
        say(problem.sentence)
        if fix and problem.remove:
            for target in problem.remove:
                say(f"  --fix: removing {target}")
                if target.suffix == ".lock":  # under the lock: a writer that took it since
                    store.remove_stale_lock(target)  # the check keeps it
                elif target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
            problem.fixed = True
    return report


def path_in(path: Path, paths: list[Path]) -> bool:
    return any(path == p for p in paths)


def _select(store: Store, files: list[Path], selector: str) -> list[Path]:
    as_path = expand_path(selector)
    if as_path.suffix == ".h5" and as_path.is_file():
        return [as_path]
    names = store.aliases()
    matches = matching(files, selector, lambda p: names.get(p.stem) or _name_of(p),
                       lambda p: p.stem)
    if not matches:
        raise HeadstartError(f"No cache file in {store.caches_dir} matches {selector!r}.")
    return matches


def _name_of(path: Path) -> str:
    try:
        return FeatureCache(path).name
    except (HeadstartError, KeyError, ValueError):
        return ""


# --- caches ---------------------------------------------------------------------------------


def check_cache_file(path: Path) -> tuple[list[Problem], int]:
    """Problems of one finished cache file (reading every byte of it), and its row count."""
    name = path.name
    corrupt = lambda why: Problem(  # noqa: E731
        f"Cache {name} {why}; it cannot be trusted (--fix deletes it; extract again).", [path])
    shard = SHARD_NAME.fullmatch(path.stem)
    expected = shard.group("fingerprint") if shard else path.stem
    if not shard and not FINGERPRINT.fullmatch(path.stem):
        return [Problem(f"{name} in the caches folder is not named by a fingerprint; headstart "
                        "ignores it (left alone).")], 0
    try:
        cache = FeatureCache(path)
    except HeadstartError as error:
        text = str(error)
        if "format version" in text:  # a newer headstart's cache: not corrupt, not ours to delete
            return [Problem(text)], 0
        return [corrupt(f"cannot be opened as a headstart cache ({_short(text)})")], 0
    except (KeyError, ValueError, TypeError) as error:
        return [corrupt(f"lacks required metadata ({_short(str(error))})")], 0
    if cache.fingerprint != expected:
        return [corrupt(f"records fingerprint {cache.fingerprint[:12]}, not its file name")], 0
    try:
        with h5py.File(path, "r") as handle:
            found, rows = layout_problems(handle, cache.attributes, len(cache.class_names))
    except (OSError, KeyError, ValueError) as error:
        return [corrupt(f"cannot be read completely ({_short(str(error))})")], 0
    return [corrupt(why) for why in found[:1]], rows


def _short(text: str) -> str:
    return text.rstrip(".").replace("\n", " ")[:200]


def _unfinished(store: Store) -> list[Problem]:
    problems = []
    for directory in sorted(store.unfinished() + store.leftovers()):
        fingerprint = directory.name.removesuffix(".partial")
        short = fingerprint[:12] + fingerprint[64:]  # a shard keeps its ".shard-i-of-N"
        if store.is_being_written(fingerprint):
            problems.append(Problem(f"Cache {short} is being extracted by another process right "
                                    "now (left alone)."))
            continue
        segments = len(list(directory.glob("*.npz")))
        if store.cache_path(fingerprint).is_file():
            problems.append(Problem(
                f"Cache {short} is finished but its extraction folder was left behind (a crash "
                "after the final rename); --fix removes the folder.", [directory]))
            continue
        problems.append(Problem(
            f"Cache {short} is unfinished ({segments} segments done); rerun its extract command "
            "to resume it, or --fix deletes the unfinished work.", [directory]))
    return problems


def _leftovers(directory: Path) -> list[Problem]:
    """Temporary files of writers that are no longer running (killed mid-write)."""
    problems = []
    if not directory.is_dir():
        return problems
    for path in sorted(directory.glob(".*.tmp-*")):
        match = TEMPORARY.match(path.name)
        if match and _alive(int(match.group(1))):
            continue
        problems.append(Problem(f"{path} is a temporary file left by an interrupted write; "
                                "--fix removes it.", [path]))
    return problems


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- heads ----------------------------------------------------------------------------------


def _check_heads(store: Store, caches: set[str], healthy: set[str], only: list[str] | None
                 ) -> tuple[int, list[Problem]]:
    if not store.heads_dir.is_dir():
        return 0, []
    count = 0
    problems: list[Problem] = []
    for directory in sorted(p for p in store.heads_dir.iterdir() if p.is_dir()):
        if only is not None and not any(f.startswith(directory.name) for f in only):
            continue
        named: set[str] = set()
        for sidecar in sorted(directory.glob("*.json")):
            count += 1
            problem, model = _check_head(sidecar, directory, caches, healthy)
            if model:
                named.add(model)
            if problem:
                problems.append(problem)
        problems.extend(_leftovers(directory))
        for path in sorted(directory.iterdir()):
            if (path.name.startswith(".") or path.suffix in (".json", ".jsonl")
                    or path.name in named):  # .jsonl: tune's finished trials, kept for resume
                continue
            problems.append(Problem(f"{path} is a model file no head sidecar names (left by an "
                                    "interrupted or replaced save); --fix removes it.", [path]))
    return count, problems


def _check_head(sidecar: Path, directory: Path, caches: set[str], healthy: set[str]
                ) -> tuple[Problem | None, str | None]:
    """A head's problem (or None) and the model file name its sidecar claims."""
    label = f"Head {sidecar.stem!r} ({directory.name})"
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        return Problem(f"{label} has an unreadable sidecar ({_short(str(error))}); --fix "
                       "removes it.", [sidecar]), None
    if record.get("format") != HEAD_FORMAT:
        return Problem(f"{sidecar} is not a headstart head sidecar (left alone)."), None
    model_name = Path(str(record.get("file", ""))).name
    model = directory / model_name
    if not model_name or str(record.get("file")) != model_name:
        return Problem(f"{label} names a model file outside its folder; --fix removes the "
                       "sidecar.", [sidecar]), None
    if not model.is_file() or model.is_symlink():
        return Problem(f"{label} names model file {model_name}, which is missing; --fix "
                       "removes the sidecar.", [sidecar]), model_name
    if digest_file(model) != record.get("sha256"):
        return Problem(f"{label}: model file {model_name} does not match the SHA-256 in its "
                       "sidecar (damaged or replaced); it will not be loaded, and --fix removes "
                       "both.", [sidecar, model]), model_name
    cache = str(record.get("cache", ""))
    if not cache.startswith(directory.name):
        return Problem(f"{label} records cache {cache[:12]}, which does not match its folder; "
                       "--fix removes it.", [sidecar, model]), model_name
    if cache not in caches:
        return Problem(f"{label} belongs to cache {cache[:12]}, which is not in this store "
                       "(kept; extract that cache again to use it)."), model_name
    if cache not in healthy:
        return Problem(f"{label} belongs to cache {cache[:12]}, which is damaged (kept; it "
                       "works again once the cache is extracted again)."), model_name
    return None, model_name
