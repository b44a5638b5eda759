"""`verify` and `verify --fix` on deliberately damaged stores: every problem is found and named in a
sentence, --fix removes only what cannot be trusted, and healthy caches and heads stay byte-identical."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from tests.reliability_support import lock_held_elsewhere, tree_digest

runner = CliRunner()
CLONE = "c" * 64  # the damaged copy's fingerprint (the original stays healthy)


@pytest.fixture
def store(fitted_store: tuple, tmp_path: Path) -> Path:
    """A copy of the fitted store with a second, healthy cache file (a clone) to damage."""
    copy = tmp_path / "store"
    shutil.copytree(fitted_store[0], copy)
    original = next((copy / "caches").glob("*.h5"))
    clone = copy / "caches" / f"{CLONE}.h5"
    shutil.copy(original, clone)
    with h5py.File(clone, "r+") as handle:
        handle.attrs["fingerprint"] = CLONE
    return copy


def verify(store: Path, *extra: str):
    return runner.invoke(app, ["verify", *extra, "--store", str(store)])


def test_healthy_store_is_clean_and_fix_touches_nothing(store: Path) -> None:
    before = tree_digest(store)
    for args in ((), ("--fix",)):
        result = verify(store, *args)
        assert result.exit_code == 0, result.output
        assert "0 findings" in result.output and "2 caches" in result.output
        assert "2 heads" in result.output
    assert tree_digest(store) == before


def flip_feature_byte(path: Path) -> None:
    with h5py.File(path, "r") as handle:
        offset = handle["train/features"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as raw:
        raw.seek(offset + 100)
        byte = raw.read(1)
        raw.seek(offset + 100)
        raw.write(bytes([byte[0] ^ 0xFF]))


def edit(path: Path, change: Callable[[h5py.File], None]) -> None:
    with h5py.File(path, "r+") as handle:
        change(handle)


def set_row(name: str, value) -> Callable[[h5py.File], None]:
    def change(handle: h5py.File) -> None:
        handle[name][3] = value
    return change


def set_dataset(name: str, value) -> Callable[[h5py.File], None]:
    def change(handle: h5py.File) -> None:
        del handle[name]
        handle.create_dataset(name, data=value)
    return change


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "flipped byte": (flip_feature_byte, "cannot be read completely"),
    "nan": (lambda p: edit(p, set_row("train/features", np.full(256, np.nan))), "NaN or infinite"),
    "inf": (lambda p: edit(p, set_row("test/features", np.full(256, np.inf))), "NaN or infinite"),
    "label": (lambda p: edit(p, set_row("train/labels", 10)), "labels outside 0..9"),
    "negative label": (lambda p: edit(p, set_row("test/labels", -1)), "labels outside 0..9"),
    "duplicate ids": (lambda p: edit(p, lambda h: h["train/ids"].__setitem__(3, h["train/ids"][0])),
                      "duplicate train sample ids"),
    "rows": (lambda p: edit(p, set_dataset("test/labels", np.zeros(5, np.int32))), "must agree"),
    "missing split data": (lambda p: edit(p, lambda h: h.__delitem__("train/ids")), "no train/ids"),
    "fingerprint": (lambda p: edit(p, lambda h: h.attrs.__setitem__("fingerprint", "d" * 64)),
                    "records fingerprint dddddddddddd"),
    "truncated file": (lambda p: os.truncate(p, p.stat().st_size // 2), "cannot be opened"),
    "not hdf5": (lambda p: p.write_bytes(b"junk" * 1000), "cannot be opened"),
    "no checksums": (lambda p: edit(p, set_dataset("train/features",
                                                    np.zeros((400, 256), np.float16))),
                     "without Fletcher-32"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_cache_is_named_and_fix_removes_only_it(store: Path, kind: str) -> None:
    damage, words = DAMAGE[kind]
    victim = store / "caches" / f"{CLONE}.h5"
    damage(victim)
    healthy = tree_digest(store, skip=lambda p: p == victim or p.suffix == ".lock")
    result = verify(store)
    assert result.exit_code == 1, result.output
    assert words in result.output and f"Cache {CLONE}.h5" in result.output, result.output
    assert "Traceback" not in result.output
    assert victim.exists()  # plain verify changes nothing
    fixed = verify(store, "--fix")
    assert fixed.exit_code == 0, fixed.output
    assert f"--fix: removing {victim}" in fixed.output
    assert not victim.exists()
    assert tree_digest(store) == healthy
    assert verify(store).exit_code == 0


def test_newer_major_version_is_reported_but_never_deleted(store: Path) -> None:
    victim = store / "caches" / f"{CLONE}.h5"
    edit(victim, lambda h: h.attrs.__setitem__("encoding-version", "2.0"))
    result = verify(store, "--fix")
    assert "format version 2.0" in result.output and result.exit_code == 0
    assert victim.exists()


def head_files(store: Path) -> tuple[Path, Path]:
    sidecar = next((store / "heads").glob("*/logreg.json"))
    record = json.loads(sidecar.read_text())
    return sidecar, sidecar.parent / record["file"]


def test_tampered_head_orphans_and_leftovers_are_removed(store: Path) -> None:
    sidecar, model = head_files(store)
    folder = sidecar.parent
    (folder / "logreg.0123456789ab.joblib").write_bytes(b"orphan")  # a save killed mid-way
    (folder / ".logreg.staging.tmp-999999999.joblib").write_bytes(b"half")  # dead writer
    (store / "caches" / f".{CLONE}.tmp-999999999.h5").write_bytes(b"half")
    partial = store / "caches" / f"{'e' * 64}.partial"
    partial.mkdir()
    (partial / "manifest.json").write_text("{}")
    result = verify(store)
    assert result.exit_code == 1
    for words in ("no head sidecar names", "temporary file left by an interrupted write",
                  "is unfinished (0 segments done)"):
        assert words in result.output, result.output
    keep = tree_digest(store, skip=lambda p: p.suffix == ".lock" or "999999999" in p.name
                       or "0123456789ab" in p.name or ".partial" in str(p))
    assert verify(store, "--fix").exit_code == 0
    assert tree_digest(store) == keep and not partial.exists()
    # now damage the head itself: its model file no longer matches the sidecar's SHA-256
    model.write_bytes(model.read_bytes() + b"\0")
    result = verify(store)
    assert result.exit_code == 1 and "does not match the SHA-256" in result.output
    assert verify(store, "--fix").exit_code == 0
    assert not sidecar.exists() and not model.exists()
    assert verify(store).exit_code == 0


def test_extraction_in_progress_is_left_alone(store: Path) -> None:
    fingerprint = "f" * 64
    partial = store / "caches" / f"{fingerprint}.partial"
    partial.mkdir()
    with lock_held_elsewhere(store, fingerprint):
        result = verify(store, "--fix")
    assert "being extracted by another process right now (left alone)" in result.output
    assert partial.exists() and result.exit_code == 0


@pytest.mark.parametrize("head", ["logreg", "mlp"])
def test_a_damaged_chunk_read_by_fit_is_one_sentence_naming_the_cache(store: Path,
                                                                      head: str) -> None:
    """fit reads every training row: a flipped byte fails HDF5's checksum, and the user is told
    which cache is damaged and how to remove it, not h5py's raw message."""
    from tests.helpers import assert_clean_error

    flip_feature_byte(store / "caches" / f"{CLONE}.h5")
    heads_before = tree_digest(store / "heads")
    options = ["-p", "epochs=1"] if head == "mlp" else []
    result = runner.invoke(app, ["fit", "--head", head, *options, "--name", f"{head}-x",
                                 "--cache", CLONE[:12], "--store", str(store)])
    sentence = assert_clean_error(result, f"({CLONE[:12]}) is damaged", "verify --fix")
    assert "Can't synchronously read data" in sentence or "checksum" in sentence.lower() or \
        "filter" in sentence.lower()
    assert tree_digest(store / "heads") == heads_before
