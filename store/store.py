"""A store: one folder holding finished caches, unfinished ones, and fitted heads.

    STORE/caches/<fingerprint>.h5        finished caches, one HDF5 file each
    STORE/caches/<fingerprint>.partial/  an extraction in progress (segments + manifest)
    STORE/caches/<fingerprint>.lock      held while a process writes that cache
    STORE/caches/<fingerprint>.shard-000i-of-000N.h5   shard i of N (see store/shards.py); never
                                         taken for a cache; `merge` makes the cache from them
    STORE/heads/<fingerprint[:16]>/      fitted heads of that cache (model file + JSON sidecar)
    STORE/default-cache                  the pinned default cache's fingerprint (optional)
    STORE/cache-names.json               names users gave caches (extract --name), by fingerprint
"""

from __future__ import annotations

import contextlib
import errno
import json
import fcntl
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from store.atomic import write_text
from store.cache import FeatureCache
from store.errors import HeadstartError, command
from store.selection import HEX_PREFIX, matching

STORE_ENV = "HEADSTART_STORE"
CACHE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def is_disk_full(error: BaseException) -> bool:
    """True for "no space left" / "quota exceeded", also when h5py only says so in its text."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "errno = 28" in text or "Disk quota" in text


def expand_path(text: str | Path) -> Path:
    """`~` and `~user` expanded; left as written when there is no such home (then the path is
    simply missing, which callers already report in a sentence)."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # "Could not determine home directory."
        return Path(text)


def default_store_root() -> Path:
    """$HEADSTART_STORE, else $XDG_CACHE_HOME/headstart, else ~/.cache/headstart."""
    if os.environ.get(STORE_ENV):
        return expand_path(os.environ[STORE_ENV])
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "headstart"


class Store:
    """The caches and heads below one root folder."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = expand_path(root) if root else default_store_root()
        if self.root.exists() and not self.root.is_dir():
            raise HeadstartError(f"Store {self.root} is a file, not a folder.")
        above = next((p for p in self.root.parents if p.exists()), None)
        if above is not None and not above.is_dir():  # it could never be made
            raise HeadstartError(f"Store {self.root} cannot be a folder: {above} is a file.")

    @property
    def caches_dir(self) -> Path:
        return self.root / "caches"

    @property
    def heads_dir(self) -> Path:
        return self.root / "heads"

    def cache_path(self, fingerprint: str) -> Path:
        """Where the finished cache with this fingerprint lives."""
        return self.caches_dir / f"{fingerprint}.h5"

    def partial_dir(self, fingerprint: str) -> Path:
        """Where an unfinished extraction of this fingerprint keeps its segments."""
        return self.caches_dir / f"{fingerprint}.partial"

    def head_dir(self, cache: FeatureCache) -> Path:
        """The folder of the heads fitted on `cache`."""
        return self.heads_dir / cache.fingerprint[:16]

    def finished(self, fingerprint: str) -> FeatureCache | None:
        """The finished cache with this fingerprint, if there is one."""
        path = self.cache_path(fingerprint)
        return self._with_alias(FeatureCache(path)) if path.is_file() else None

    # --- names the user gives caches -------------------------------------------------------------

    @property
    def names_path(self) -> Path:
        """The JSON file mapping fingerprints to the names users gave their caches."""
        return self.root / "cache-names.json"

    def aliases(self) -> dict[str, str]:
        """fingerprint -> the user's name for that cache."""
        try:
            names = json.loads(self.names_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {k: str(v) for k, v in names.items()} if isinstance(names, dict) else {}

    def check_cache_name(self, name: str, fingerprint: str | None = None) -> None:
        """Refuse a name that is not allowed, or that another cache than `fingerprint` has."""
        if not CACHE_NAME.fullmatch(name) or HEX_PREFIX.fullmatch(name):
            raise HeadstartError(
                f"Cache name {name!r} is not allowed; use up to 64 letters, digits, '_', '.' or "
                "'-', not only hex digits (those name fingerprints).")
        owner = next((fp for fp, given in self.aliases().items() if given == name), None)
        if owner is not None and owner != fingerprint and fingerprint is not None:
            raise HeadstartError(f"The name {name!r} is taken by cache {owner[:12]}; choose "
                                 "another.")

    def name_cache(self, cache: FeatureCache, name: str) -> FeatureCache:
        """Give `cache` a name every command accepts for it; a name another cache has is
        refused (rename that one first)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self.locked(self.root / "cache-names.lock", "Another headstart process is "
                          "naming a cache right now; try again in a moment."):
            self.check_cache_name(name, cache.fingerprint)
            names = self.aliases()
            names[cache.fingerprint] = name
            write_text(self.names_path, json.dumps(names, indent=2, sort_keys=True))
        cache.alias = name
        return cache

    def _with_alias(self, cache: FeatureCache, names: dict[str, str] | None = None
                    ) -> FeatureCache:
        cache.alias = (self.aliases() if names is None else names).get(cache.fingerprint)
        return cache

    def reusable(self, fingerprint: str) -> FeatureCache | None:
        """The finished cache with this fingerprint, for a writer about to reuse it instead of
        writing it: an extraction folder left beside it is removed (`remove_leftover`)."""
        cache = self.finished(fingerprint)
        if cache is not None:
            self.remove_leftover(fingerprint)
        return cache

    def caches(self) -> list[FeatureCache]:
        """Every finished cache, oldest first (by creation, then by when its file was finished)."""
        if not self.caches_dir.is_dir():
            return []
        names = self.aliases()
        found = [self._with_alias(FeatureCache(p), names) for p in self.caches_dir.glob("*.h5")
                 if re.fullmatch(r"[0-9a-f]{64}", p.stem)]
        return sorted(found, key=lambda c: (c.created, c.path.stat().st_mtime_ns, c.fingerprint))

    def feature_caches(self) -> list[FeatureCache]:
        """Finished caches of original images (not augmented views), oldest first."""
        return [c for c in self.caches() if c.kind == "features"]

    def views_of(self, cache: FeatureCache) -> list[FeatureCache]:
        """The finished augmented-view caches made from `cache`'s training images."""
        return sorted((c for c in self.caches() if c.parent == cache.fingerprint),
                      key=lambda c: (c.view or 0, c.created))

    def unfinished(self) -> list[Path]:
        """Folders of extractions that were started and have not finished."""
        return [p for p in self._partial_folders() if not self._has_cache(p)]

    def leftovers(self) -> list[Path]:
        """Extraction folders left beside their finished cache: a writer killed between the
        final rename and the folder's removal. Nothing reads them again."""
        return [p for p in self._partial_folders() if self._has_cache(p)]

    def remove_leftover(self, fingerprint: str) -> None:
        """Delete the extraction folder left beside this finished cache, unless a writer holds
        the cache's lock (a writer removes its own folder) or the store is read-only.

        Never call it while holding that cache's lock (`writing`): where flock is emulated by
        POSIX locks (some network file systems), the inner release would drop the outer lock.
        """
        if not (self.partial_dir(fingerprint).is_dir() and self.cache_path(fingerprint).is_file()):
            return
        try:
            with self.writing(fingerprint):
                shutil.rmtree(self.partial_dir(fingerprint), ignore_errors=True)
        except (HeadstartError, OSError):
            pass

    def _partial_folders(self) -> list[Path]:
        return sorted(self.caches_dir.glob("*.partial")) if self.caches_dir.is_dir() else []

    def _has_cache(self, partial: Path) -> bool:
        return self.cache_path(partial.name.removesuffix(".partial")).is_file()

    def find_cache(self, selector: str | None = None) -> FeatureCache:
        """The cache named by a fingerprint prefix or a readable name; by default the newest."""
        return self.resolve_cache(selector)[0]

    def resolve_cache(self, selector: str | None = None) -> tuple[FeatureCache, str]:
        """The cache a command uses, and why: "--cache" (named by `selector`), "pinned" (the
        store's default, see `pin`) or "newest" (the most recently finished)."""
        caches = self.feature_caches()
        if not caches:
            if any(self.caches_dir.glob("*.shard-*.h5")):
                raise HeadstartError(
                    f"Store {self.root} holds only shards, not a cache; run "
                    f"'{command(f'merge --store {self.root}')}' once every shard has finished.")
            raise HeadstartError(
                f"No finished cache in store {self.root}; run '{command('extract DATASET')}' "
                "first.")
        if selector is not None:
            return self._named(caches, selector), "--cache"
        pinned = self.pinned()
        if pinned is not None:
            found = [c for c in caches if c.fingerprint == pinned]
            if found:
                return found[0], "pinned"
        return caches[-1], "newest"

    def _named(self, caches: list[FeatureCache], selector: str) -> FeatureCache:
        matches = matching(caches, selector, lambda c: c.name, lambda c: c.fingerprint)
        if len(matches) == 1:
            return matches[0]
        if not matches:
            known = ", ".join(f"{c.name} ({c.short_id})" for c in caches)
            raise HeadstartError(f"No cache matches {selector!r}; caches in this store: {known}.")
        names = ", ".join(c.short_id for c in matches)
        raise HeadstartError(
            f"{selector!r} matches several caches ({names}); give a longer fingerprint prefix."
        )

    @property
    def pin_path(self) -> Path:
        """The file naming the store's pinned default cache (its fingerprint)."""
        return self.root / "default-cache"

    def pinned(self) -> str | None:
        """The fingerprint of the pinned default cache, if one is pinned."""
        try:
            text = self.pin_path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return text if re.fullmatch(r"[0-9a-f]{64}", text) else None

    def pin(self, selector: str | None) -> FeatureCache | None:
        """Make the named cache the default of every command (None: unpin, newest again)."""
        if selector is None:
            self.pin_path.unlink(missing_ok=True)
            return None
        cache = self.find_cache(selector)
        self.root.mkdir(parents=True, exist_ok=True)
        write_text(self.pin_path, cache.fingerprint + "\n")
        return cache

    def lock_path(self, fingerprint: str) -> Path:
        """The lock file of one cache: it exists only while a writer holds it (or a writer
        was killed; `stale_locks` lists those)."""
        return self.caches_dir / f"{fingerprint}.lock"

    def is_being_written(self, fingerprint: str) -> bool:
        """True when another process holds the write lock of this cache right now."""
        try:
            descriptor = os.open(self.lock_path(fingerprint), os.O_RDONLY)
        except OSError:
            return False
        try:
            if not _try_lock(descriptor):
                return True
            fcntl.flock(descriptor, fcntl.LOCK_UN)
            return False
        finally:
            os.close(descriptor)

    def stale_locks(self) -> list[Path]:
        """Lock files no process holds: left by a writer that was killed."""
        if not self.caches_dir.is_dir():
            return []
        return [p for p in sorted(self.caches_dir.glob("*.lock"))
                if not self.is_being_written(p.name.removesuffix(".lock"))]

    def remove_stale_lock(self, path: Path) -> bool:
        """Delete a lock file if no process holds it (under the lock itself); True if removed."""
        try:
            with self.locked(path, wait_message=None):
                return True
        except (HeadstartError, OSError):
            return False

    @contextlib.contextmanager
    def writing(self, fingerprint: str) -> Iterator[None]:
        """Hold the write lock of one cache; a second writer stops with a clear message."""
        self.caches_dir.mkdir(parents=True, exist_ok=True)
        message = (f"Another headstart process is writing cache {fingerprint[:12]} right now; "
                   "wait for it to finish (its work will be reused).")
        with self.locked(self.lock_path(fingerprint), message):
            try:
                # Only a killed writer of this cache can have left its temporary files.
                for stale in self.caches_dir.glob(f".{fingerprint}.tmp-*"):
                    stale.unlink(missing_ok=True)
                yield
            except OSError as error:
                if not is_disk_full(error):
                    raise
                raise HeadstartError(
                    f"The disk holding store {self.root} is full; the finished part of cache "
                    f"{fingerprint[:12]} is kept, so free some space and run the same command "
                    "again to resume."
                ) from None

    @contextlib.contextmanager
    def locked(self, path: Path, wait_message: str | None) -> Iterator[None]:
        """Hold an exclusive flock on `path`, and remove the file when done (while still
        holding it). A lock taken on a file another process has just removed is retried, so
        two writers never hold locks on different files of one name."""
        while True:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(descriptor):
                os.close(descriptor)
                raise HeadstartError(wait_message or f"{path} is held by another process.")
            try:
                same = os.fstat(descriptor).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(descriptor)  # removed (or replaced) by the previous holder: take the new one
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            fcntl.flock(descriptor, fcntl.LOCK_UN)
            os.close(descriptor)


def _try_lock(descriptor: int) -> bool:
    """Take an exclusive flock without waiting; False when another process holds it."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True
