"""store/store.py without a backbone: small cache files written with the store's own writer, the
store's paths, finished and reusable caches, leftovers, names, the pin and the locks. Every
expected path, order and sentence is written out by hand from the files made here; another
process's lock is stood in for by a second open file description (flock locks conflict between
them, also within one process)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

import numpy as np
import pytest

from store import store as store_module
from store.errors import HeadstartError, command  # the program's name, as the CLI sets it
from store.format import CacheAttributes
from store.store import (STORE_ENV, Store, _try_lock, default_store_root,
                         expand_path, is_disk_full)
from store.writer import write_cache

A, B, C = "a" * 64, "b" * 64, "c" * 64
NAME = "toy_mobilenet_8_avg"  # the generated name of every cache below (weights keras-imagenet)


def put(store: Store, fingerprint: str, created: str = "2026-01-01T00:00:00+00:00",
        kind: str = "features", parent: str | None = None, view: int | None = None,
        path: Path | None = None) -> Path:
    """A finished one-row cache file in the store, as the writer makes it."""
    attributes = CacheAttributes(
        fingerprint=fingerprint, preprocessing={}, dataset="toy", created=created, libraries={},
        inputs={"backbone": "mobilenet", "weights": "keras-imagenet", "image_size": 8,
                "pooling": "avg"}, kind=kind, parent=parent, view=view)
    path = path or store.cache_path(fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    with write_cache(path, attributes, ["x"]) as out:
        out.split("train", [np.ones((1, 2), np.float32)], rows=1, width=2, dtype="float32",
                  labels=np.zeros(1), ids=["i0"])
        out.skipped([])
    return path


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


class Held:
    """Another process's flock on `path` (a second open file description)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a+")
        fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX)

    def __enter__(self) -> "Held":
        return self

    def __exit__(self, *_: object) -> None:
        self.handle.close()


def unheld(path: Path) -> bool:
    """Whether nobody holds a lock on `path` (taken and given back at once)."""
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return True


# --- disk full, paths, the store's root ---------------------------------------------------------


@pytest.mark.parametrize(("error", "full"), [
    (OSError(errno.ENOSPC, "x"), True), (OSError(errno.EDQUOT, "x"), True),
    (OSError(errno.EACCES, "Permission denied"), False), (OSError(errno.EIO, "x"), False),
    (RuntimeError("Can't write data (No space left on device)"), True),
    (OSError("Unable to write (file write failed: errno = 28, error message = 'x')"), True),
    (OSError("Disk quota exceeded"), True), (RuntimeError("errno = 2"), False),
    (ValueError("no space left on device"), False), (KeyError("x"), False)])
def test_is_disk_full(error: BaseException, full: bool) -> None:
    assert is_disk_full(error) is full


def test_expand_path(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert expand_path("~/s") == tmp_path / "s"
    assert expand_path(Path("~/s")) == tmp_path / "s"
    assert expand_path("/x/~/y") == Path("/x/~/y")
    assert expand_path("~no-such-user-here/s") == Path("~no-such-user-here/s")


@pytest.mark.parametrize(("store_env", "xdg", "expected"), [
    ("~/mine", "/xdg", "HOME/mine"), ("/abs", None, "/abs"), ("", "/xdg", "/xdg/headstart"),
    (None, "/xdg", "/xdg/headstart"), (None, "", "HOME/.cache/headstart"),
    (None, None, "HOME/.cache/headstart")])
def test_default_store_root(monkeypatch, tmp_path: Path, store_env: str | None, xdg: str | None,
                            expected: str) -> None:
    assert STORE_ENV == "HEADSTART_STORE"
    monkeypatch.setenv("HOME", str(tmp_path))
    for name, text in ((STORE_ENV, store_env), ("XDG_CACHE_HOME", xdg)):
        if text is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, text)
    assert default_store_root() == Path(expected.replace("HOME", str(tmp_path)))
    assert Store().root == default_store_root() == Store("").root


def test_a_store_root_that_is_or_lies_below_a_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "f").write_text("")
    with pytest.raises(HeadstartError) as caught:
        Store(tmp_path / "f")
    assert str(caught.value) == f"Store {tmp_path / 'f'} is a file, not a folder."
    with pytest.raises(HeadstartError) as caught:
        Store(tmp_path / "f" / "a" / "b")
    assert str(caught.value) == (f"Store {tmp_path / 'f' / 'a' / 'b'} cannot be a folder: "
                                 f"{tmp_path / 'f'} is a file.")
    assert Store(tmp_path / "new" / "deep").root == tmp_path / "new" / "deep"
    assert not (tmp_path / "new").exists()
    assert Store("~/s").root == tmp_path / "s"


def test_the_paths_of_a_store(store: Store) -> None:
    root = store.root
    assert store.caches_dir == root / "caches" and store.heads_dir == root / "heads"
    assert store.cache_path(A) == root / "caches" / f"{A}.h5"
    assert store.partial_dir(A) == root / "caches" / f"{A}.partial"
    assert store.lock_path(A) == root / "caches" / f"{A}.lock"
    assert store.names_path == root / "cache-names.json"
    assert store.pin_path == root / "default-cache"
    put(store, "0123456789abcdef" + "9" * 48)
    (cache,) = store.caches()
    assert store.head_dir(cache) == root / "heads" / "0123456789abcdef"


# --- finished caches, listing, leftovers ---------------------------------------------------------


def test_finished_is_the_file_of_that_fingerprint(store: Store) -> None:
    assert store.finished(A) is None and store.caches() == [] and store.unfinished() == []
    assert store.leftovers() == [] and store.stale_locks() == []
    store.cache_path(A).mkdir(parents=True)  # a folder of that name is no cache
    assert store.finished(A) is None
    put(store, B)
    cache = store.finished(B)
    assert cache.fingerprint == B and cache.path == store.cache_path(B) and cache.alias is None


def test_caches_lists_finished_files_oldest_first(store: Store) -> None:
    put(store, C, created="2026-01-02T00:00:00+00:00")
    put(store, B, created="2026-01-01T00:00:00+00:00")
    put(store, A, created="2026-01-01T00:00:00+00:00")
    os.utime(store.cache_path(A), ns=(2_000, 2_000))
    os.utime(store.cache_path(B), ns=(1_000, 1_000))
    put(store, "d" * 64, created="2026-01-01T00:00:00+00:00")
    os.utime(store.cache_path("d" * 64), ns=(1_000, 1_000))  # same time as B: by fingerprint
    for name in [f"{'E' * 64}.h5", f"{'e' * 63}.h5", f"{A}.shard-0000-of-0002.h5",
                 f".{A}.tmp-12.h5", "notes.h5"]:
        put(store, "e" * 64, path=store.caches_dir / name)
    assert [c.fingerprint[0] for c in store.caches()] == ["b", "d", "a", "c"]
    assert store.find_cache().fingerprint == C
    assert [store.resolve_cache()[0].fingerprint, store.resolve_cache()[1]] == [C, "newest"]


def test_views_and_feature_caches(store: Store) -> None:
    put(store, A)
    put(store, B, kind="views", parent=A, view=1, created="2026-01-01T00:00:00+00:00")
    put(store, C, kind="views", parent=A, view=0, created="2026-01-03T00:00:00+00:00")
    put(store, "d" * 64, kind="views", parent=A, view=0, created="2026-01-02T00:00:00+00:00")
    put(store, "e" * 64, kind="views", parent=B, view=0)
    assert [c.fingerprint for c in store.feature_caches()] == [A]
    (cache,) = store.feature_caches()
    assert [c.fingerprint[0] for c in store.views_of(cache)] == ["d", "c", "b"]


def test_unfinished_folders_and_leftovers(store: Store) -> None:
    put(store, A)
    for fingerprint in (C, A, B):
        store.partial_dir(fingerprint).mkdir()
    (store.caches_dir / f"{A}.partial.old").mkdir()
    assert store.unfinished() == [store.partial_dir(B), store.partial_dir(C)]
    assert store.leftovers() == [store.partial_dir(A)]


def test_reusable_removes_the_leftover_folder_unless_a_writer_holds_the_lock(store: Store) -> None:
    put(store, A)
    leftover = store.partial_dir(A)
    leftover.mkdir()
    (leftover / "manifest.json").write_text("{}")
    store.partial_dir(B).mkdir()  # unfinished, no cache: kept
    assert store.finished(A) is not None and leftover.is_dir()  # a lookup leaves it alone
    with Held(store.lock_path(A)):
        assert store.reusable(A).fingerprint == A
        assert leftover.is_dir()
    assert store.reusable(B) is None and store.partial_dir(B).is_dir()
    cache = store.reusable(A)
    assert cache.fingerprint == A and cache.path == store.cache_path(A)
    assert not leftover.exists() and not store.lock_path(A).exists()
    store.remove_leftover(B)
    assert store.partial_dir(B).is_dir() and not store.lock_path(B).exists()
    store.remove_leftover(C)  # nothing at all
    assert sorted(p.name for p in store.caches_dir.iterdir()) == [f"{A}.h5", f"{B}.partial"]


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "allowed"), [
    ("a", True), ("abc", True), ("toy.v2_final-1", True), ("x" * 64, True), ("9lives", True),
    ("abcd", False), ("ABCDEF", False), ("0123", False), ("x" * 65, False), ("", False),
    ("_x", False), ("-x", False), (".x", False), ("a b", False), ("a/b", False), ("é", False),
    ("abcdef01" * 8, False), ("x" + "abcdef01" * 8, False), ("abcdefgh" * 8, True)])
def test_which_cache_names_are_allowed(store: Store, name: str, allowed: bool) -> None:
    if allowed:
        store.check_cache_name(name)
        return
    with pytest.raises(HeadstartError) as caught:
        store.check_cache_name(name)
    assert str(caught.value) == (f"Cache name {name!r} is not allowed; use up to 64 letters, "
                                 "digits, '_', '.' or '-', not only hex digits (those name "
                                 "fingerprints).")


def test_aliases_read_the_names_file(store: Store) -> None:
    assert store.aliases() == {}
    store.root.mkdir()
    for text in ("{not json", "[1, 2]", '"x"', "\xff"):
        store.names_path.write_text(text, encoding="latin-1")
        assert store.aliases() == {}
    store.names_path.write_text(json.dumps({A: "one", B: 7}), encoding="utf-8")
    assert store.aliases() == {A: "one", B: "7"}
    store.names_path.write_text(json.dumps({A: "é"}), encoding="utf-8")
    assert store.aliases() == {A: "é"}
    store.names_path.unlink()
    store.names_path.mkdir()
    assert store.aliases() == {}


def test_naming_a_cache(store: Store) -> None:
    put(store, A)
    put(store, B)
    cache = store.finished(A)
    assert store.name_cache(cache, "mine") is cache and cache.alias == "mine"
    assert cache.name == "mine"
    text = store.names_path.read_text(encoding="utf-8")
    assert text == json.dumps({A: "mine"}, indent=2, sort_keys=True)
    store.names_path.write_text(json.dumps({B: "yours", A: "mine"}))  # another writer's order
    store.name_cache(store.finished(A), "mine-too")  # renaming keeps one entry per cache
    assert store.names_path.read_text() == (f'{{\n  "{A}": "mine-too",\n  "{B}": "yours"\n}}')
    assert store.finished(B).alias == "yours" and store.finished(B).name == "yours"
    assert [c.name for c in store.caches()] == ["mine-too", "yours"]
    assert store.find_cache("yours").fingerprint == B
    store.check_cache_name("yours", B)  # its own name again
    store.check_cache_name("yours")  # no cache given: only the rule
    with pytest.raises(HeadstartError) as caught:
        store.name_cache(store.finished(A), "yours")
    assert str(caught.value) == f"The name 'yours' is taken by cache {B[:12]}; choose another."
    assert json.loads(store.names_path.read_text()) == {A: "mine-too", B: "yours"}
    assert not (store.root / "cache-names.lock").exists()
    with Held(store.root / "cache-names.lock"):
        with pytest.raises(HeadstartError) as caught:
            store.name_cache(store.finished(A), "other")
    assert str(caught.value) == ("Another headstart process is naming a cache right now; try "
                                 "again in a moment.")


def test_naming_makes_the_store_folder(tmp_path: Path) -> None:
    source = Store(tmp_path / "a")
    put(source, A)
    cache = source.finished(A)
    fresh = Store(tmp_path / "b" / "c")
    fresh.name_cache(cache, "n")
    assert json.loads((tmp_path / "b" / "c" / "cache-names.json").read_text()) == {A: "n"}


# --- choosing a cache, the pin --------------------------------------------------------------------


def test_an_empty_store_or_one_of_shards_only_is_refused(store: Store) -> None:
    with pytest.raises(HeadstartError) as caught:
        store.find_cache()
    assert str(caught.value) == (f"No finished cache in store {store.root}; run "
                                 f"'{command('extract DATASET')}' first.")
    put(store, A, kind="views", parent=B, view=0)
    with pytest.raises(HeadstartError, match="^No finished cache in store"):
        store.find_cache(A[:8])
    put(store, A, path=store.caches_dir / f"{B}.shard-0000-of-0002.h5", kind="shard")
    with pytest.raises(HeadstartError) as caught:
        store.resolve_cache()
    assert str(caught.value) == (f"Store {store.root} holds only shards, not a cache; run "
                                 f"'{command(f'merge --store {store.root}')}' once every shard "
                                 "has finished.")
    (store.caches_dir / f"{C}.shard-0000-of-0002.partial").mkdir()
    store.caches_dir.joinpath(f"{B}.shard-0000-of-0002.h5").unlink()
    with pytest.raises(HeadstartError, match="^No finished cache in store"):
        store.find_cache()


def test_a_cache_is_chosen_by_name_prefix_pin_or_newest(store: Store) -> None:
    put(store, A, created="2026-01-01T00:00:00+00:00")
    put(store, "ab" + "0" * 62, created="2026-01-02T00:00:00+00:00")
    put(store, B, created="2026-01-03T00:00:00+00:00")
    store.name_cache(store.finished(A), "first")
    assert (store.resolve_cache()[0].fingerprint, store.resolve_cache()[1]) == (B, "newest")
    chosen, why = store.resolve_cache("first")
    assert (chosen.fingerprint, why, chosen.alias) == (A, "--cache", "first")
    assert store.find_cache("BBBB").fingerprint == B
    with pytest.raises(HeadstartError) as caught:
        store.find_cache("ffff")
    assert str(caught.value) == (f"No cache matches 'ffff'; caches in this store: first "
                                 f"({A[:12]}), {NAME} (ab0000000000), {NAME} ({B[:12]}).")
    with pytest.raises(HeadstartError) as caught:
        store.find_cache(NAME)
    assert str(caught.value) == (f"{NAME!r} matches several caches (ab0000000000, {B[:12]}); give "
                                 "a longer fingerprint prefix.")
    assert store.find_cache("aaaa").fingerprint == A
    assert store.find_cache("AB00").fingerprint == "ab" + "0" * 62
    for selector in ("abab", "ab", "aa"):  # under 4 hex digits: not a prefix
        with pytest.raises(HeadstartError, match=f"^No cache matches '{selector}'; "):
            store.find_cache(selector)

    assert store.pinned() is None
    assert store.pin("ab00").fingerprint == "ab" + "0" * 62
    assert store.pin_path.read_text(encoding="ascii") == "ab" + "0" * 62 + "\n"
    assert store.pinned() == "ab" + "0" * 62
    assert store.resolve_cache()[0].fingerprint == "ab" + "0" * 62
    assert store.resolve_cache()[1] == "pinned"
    assert store.resolve_cache("first")[1] == "--cache"
    store.pin_path.write_text(C + "\n")  # pinned, then deleted: the newest again
    assert store.resolve_cache()[0].fingerprint == B and store.resolve_cache()[1] == "newest"
    assert store.pin(None) is None and not store.pin_path.exists()
    assert store.pin(None) is None  # unpinning twice is harmless


@pytest.mark.parametrize(("text", "pinned"), [
    (f"{A}\n", A), (f"  {A} \n\n", A), (A, A), (A.upper(), None), (A[:-1], None),
    (A + "0", None), ("not a fingerprint", None), ("", None)])
def test_pinned_reads_one_fingerprint(store: Store, text: str, pinned: str | None) -> None:
    store.root.mkdir()
    store.pin_path.write_text(text, encoding="ascii")
    assert store.pinned() == pinned


def test_pinned_ignores_a_file_that_is_not_ascii_or_not_a_file(store: Store) -> None:
    store.root.mkdir()
    store.pin_path.write_bytes(A.encode() + "é".encode("utf-8"))
    assert store.pinned() is None
    store.pin_path.unlink()
    store.pin_path.mkdir()
    assert store.pinned() is None


def test_pin_makes_the_store_folder(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    put(store, A)
    assert store.pin(A[:4]).fingerprint == A
    assert (tmp_path / "s" / "default-cache").read_text() == A + "\n"


# --- locks --------------------------------------------------------------------------------------


def test_writing_holds_the_lock_and_removes_it(store: Store) -> None:
    old = os.umask(0)
    try:
        with store.writing(A):
            assert store.caches_dir.is_dir() and store.lock_path(A).is_file()
            assert os.stat(store.lock_path(A)).st_mode & 0o777 == 0o644
            assert not unheld(store.lock_path(A)) and store.is_being_written(A)
            assert store.stale_locks() == []
    finally:
        os.umask(old)
    assert not store.lock_path(A).exists() and not store.is_being_written(A)
    with pytest.raises(KeyError):
        with store.writing(A):
            raise KeyError("a failing writer")
    assert not store.lock_path(A).exists()


def test_a_second_writer_is_refused_in_a_sentence(store: Store) -> None:
    with Held(store.lock_path(A)):
        with pytest.raises(HeadstartError) as caught:
            with store.writing(A):
                pass
        assert store.lock_path(A).exists()
    assert str(caught.value) == (f"Another headstart process is writing cache {A[:12]} right "
                                 "now; wait for it to finish (its work will be reused).")
    with Held(store.root / "x.lock"):
        with pytest.raises(HeadstartError) as caught:
            with store.locked(store.root / "x.lock", None):
                pass
    assert str(caught.value) == f"{store.root / 'x.lock'} is held by another process."


def test_writing_removes_only_its_own_stale_temporary_files(store: Store) -> None:
    store.caches_dir.mkdir(parents=True)
    names = [f".{A}.tmp-1.h5", f".{A}.tmp-", f".{B}.tmp-1.h5", f"{A}.tmp-1.h5", f".{A}.h5"]
    for name in names:
        (store.caches_dir / name).write_text("")
    with store.writing(A):
        left = sorted(p.name for p in store.caches_dir.iterdir() if p.suffix != ".lock")
        assert left == sorted([f".{B}.tmp-1.h5", f"{A}.tmp-1.h5", f".{A}.h5"])


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("No space left on device")])
def test_a_full_disk_is_one_sentence(store: Store, error: BaseException) -> None:
    with pytest.raises((HeadstartError, RuntimeError)) as caught:
        with store.writing(A):
            raise error
    if isinstance(error, OSError):
        assert type(caught.value) is HeadstartError
        assert str(caught.value) == (
            f"The disk holding store {store.root} is full; the finished part of cache {A[:12]} "
            "is kept, so free some space and run the same command again to resume.")
        assert caught.value.__suppress_context__
    else:
        assert caught.value is error  # not an OSError: not caught
    assert not store.lock_path(A).exists()


def test_another_os_error_is_raised_as_it_is(store: Store) -> None:
    error = OSError(errno.EIO, "input/output error")
    with pytest.raises(OSError) as caught:
        with store.writing(A):
            raise error
    assert caught.value is error


def test_stale_locks_and_their_removal(store: Store) -> None:
    store.caches_dir.mkdir(parents=True)
    for fingerprint in (C, A, B):
        store.lock_path(fingerprint).write_text("")
    (store.caches_dir / "notes.txt").write_text("")
    with Held(store.lock_path(B)):
        assert store.stale_locks() == [store.lock_path(A), store.lock_path(C)]
        assert not store.is_being_written(A) and store.is_being_written(B)
        assert unheld(store.lock_path(A))  # looking did not leave it locked
        assert store.remove_stale_lock(store.lock_path(B)) is False
        assert store.lock_path(B).exists()
        assert store.remove_stale_lock(store.lock_path(A)) is True
        assert not store.lock_path(A).exists()
    assert store.stale_locks() == [store.lock_path(B), store.lock_path(C)]
    assert store.remove_stale_lock(store.root / "no" / "such.lock") is False


def test_a_lock_file_removed_or_replaced_while_taking_it_is_taken_again(store: Store,
                                                                        monkeypatch) -> None:
    path = store.root / "x.lock"
    store.root.mkdir()
    for replace in (False, True):
        calls: list[int] = []

        def racing(descriptor: int) -> bool:
            calls.append(descriptor)
            if len(calls) == 1:  # the previous holder removes (or replaces) the file meanwhile
                path.unlink()
                if replace:
                    path.write_text("")
            return _try_lock(descriptor)

        monkeypatch.setattr(store_module, "_try_lock", racing)
        with store.locked(path, "busy"):
            assert len(calls) == 2 and path.exists()
            monkeypatch.setattr(store_module, "_try_lock", _try_lock)
            assert not unheld(path)
        assert not path.exists()


def test_try_lock(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "l"
    path.write_text("")
    descriptor = os.open(path, os.O_RDWR)
    try:
        assert _try_lock(descriptor) is True
        other = os.open(path, os.O_RDWR)
        try:
            assert _try_lock(other) is False
        finally:
            os.close(other)
    finally:
        os.close(descriptor)
    bad = os.open(path, os.O_RDWR)
    os.close(bad)
    with pytest.raises(OSError) as caught:
        _try_lock(bad)
    assert caught.value.errno == errno.EBADF

    def denied(descriptor: int, operation: int) -> None:
        assert operation == fcntl.LOCK_EX | fcntl.LOCK_NB
        raise OSError(errno.EACCES, "denied")
    monkeypatch.setattr(store_module.fcntl, "flock", denied)
    assert _try_lock(0) is False
