"""store/partial.py, the resume logic: segments written one at a time, kept across a restart with
the same fingerprint, redone when damaged, assembled in order (no backbone, no TensorFlow).
Expected rows, names and values are worked out by hand from the segments written here."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from store.format import CacheAttributes
from store.partial import MANIFEST, PartialCache, Segment

MANIFEST_A = {"fingerprint": "a" * 64, "segment_size": 4}


def _segment(rows: list[int], width: int = 2, skipped: dict[int, str] | None = None,
             mirrored: bool = False) -> Segment:
    features = np.array([[row * 10 + c for c in range(width)] for row in rows], np.float32)
    features = features.reshape(len(rows), width)
    skipped = skipped or {}
    return Segment(features, np.array(rows), np.array(list(skipped), np.int64),
                   list(skipped.values()), -features if mirrored else None)


def test_a_new_partial_cache_writes_its_manifest(tmp_path: Path) -> None:
    directory = tmp_path / "p" / "deep"
    partial = PartialCache.open(directory, MANIFEST_A)
    assert json.loads((directory / "manifest.json").read_text()) == MANIFEST_A
    assert MANIFEST == "manifest.json"
    assert partial.manifest == MANIFEST_A and partial.is_empty()
    assert partial.segment_size == 4 and not partial.mirrored


def test_the_same_fingerprint_resumes_with_its_own_manifest(tmp_path: Path) -> None:
    first = PartialCache.open(tmp_path / "p", MANIFEST_A)
    first.write_segment("train", 0, _segment([0, 1, 2, 3]))
    again = PartialCache.open(tmp_path / "p", {**MANIFEST_A, "segment_size": 8})
    assert again.segment_size == 4 and again.manifest == MANIFEST_A  # the stored settings
    assert not again.is_empty() and again.has_segment("train", 0)
    assert json.loads((tmp_path / "p" / "manifest.json").read_text()) == MANIFEST_A


@pytest.mark.parametrize("stored", ['{"fingerprint": "' + "b" * 64 + '", "segment_size": 4}',
                                    "{not json", '{"segment_size": 4}'])
def test_another_or_unreadable_manifest_starts_afresh(tmp_path: Path, stored: str) -> None:
    directory = tmp_path / "p"
    directory.mkdir()
    (directory / "manifest.json").write_text(stored)
    (directory / "train-000000.npz").write_bytes(b"old segment")
    partial = PartialCache.open(directory, MANIFEST_A)
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json"]
    assert partial.manifest == MANIFEST_A and partial.is_empty()
    assert json.loads((directory / "manifest.json").read_text()) == MANIFEST_A


def test_a_manifest_folder_is_not_a_manifest(tmp_path: Path) -> None:
    directory = tmp_path / "p"
    (directory / "manifest.json").mkdir(parents=True)
    with pytest.raises(OSError):  # not a file: not read; the folder cannot be written over
        PartialCache.open(directory, MANIFEST_A)


@pytest.mark.parametrize(("rows", "segments"), [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2),
                                                (9, 3)])
def test_segment_count_is_rows_over_size_rounded_up(tmp_path: Path, rows: int, segments: int) -> None:
    assert PartialCache.open(tmp_path / "p", MANIFEST_A).segment_count(rows) == segments


def test_segment_files_are_named_by_split_and_six_digits(tmp_path: Path) -> None:
    partial = PartialCache.open(tmp_path / "p", MANIFEST_A)
    assert partial.segment_path("train", 7) == tmp_path / "p" / "train-000007.npz"
    assert partial.segment_path("test", 123456) == tmp_path / "p" / "test-123456.npz"


def test_a_segment_round_trips(tmp_path: Path) -> None:
    partial = PartialCache.open(tmp_path / "p", MANIFEST_A)
    assert partial.read_segment("train", 0) is None and not partial.has_segment("train", 0)
    partial.write_segment("train", 0, _segment([0, 2, 3], skipped={1: "truncated"}))
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["manifest.json",
                                                                 "train-000000.npz"]
    with np.load(tmp_path / "p" / "train-000000.npz") as data:  # the file's own arrays
        assert sorted(data.files) == ["features", "rows", "skipped_reasons", "skipped_rows"]
        assert data["rows"].dtype == np.int64 and data["skipped_rows"].dtype == np.int64
    read = partial.read_segment("train", 0)
    np.testing.assert_array_equal(read.features, [[0, 1], [20, 21], [30, 31]])
    assert read.rows.tolist() == [0, 2, 3] and read.skipped_rows.tolist() == [1]
    assert read.skipped_reasons == ["truncated"] and type(read.skipped_reasons[0]) is str
    assert read.mirrored is None and partial.has_segment("train", 0)
    assert not partial.has_segment("test", 0) and partial.read_segment("train", 1) is None


def test_a_mirrored_partial_cache_keeps_and_requires_the_mirrored_view(tmp_path: Path) -> None:
    partial = PartialCache.open(tmp_path / "p", {**MANIFEST_A, "mirrored": True})
    assert partial.mirrored
    partial.write_segment("train", 0, _segment([0, 1], mirrored=True))
    np.testing.assert_array_equal(partial.read_segment("train", 0).mirrored, [[0, -1], [-10, -11]])
    partial.write_segment("train", 1, _segment([4, 5]))  # a segment without it: redone
    assert partial.has_segment("train", 0) and not partial.has_segment("train", 1)
    assert partial.read_segment("train", 1) is None
    assert not partial.segment_path("train", 1).exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "an array missing"])
def test_a_damaged_segment_is_removed_and_redone(tmp_path: Path, damage: str) -> None:
    partial = PartialCache.open(tmp_path / "p", MANIFEST_A)
    partial.write_segment("train", 0, _segment([0, 1]))
    path = partial.segment_path("train", 0)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
    elif damage == "garbage":
        path.write_bytes(b"PK\x03\x04 not a zip at all")
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        np.savez(path.open("wb"), features=np.zeros((2, 2)), rows=np.arange(2))
    assert not partial.has_segment("train", 0)
    assert partial.read_segment("train", 0) is None
    assert not path.exists()


def test_is_empty_counts_segment_files_only(tmp_path: Path) -> None:
    partial = PartialCache.open(tmp_path / "p", MANIFEST_A)
    (tmp_path / "p" / "notes.txt").write_text("x")
    assert partial.is_empty()
    partial.write_segment("test", 3, _segment([12]))
    assert not partial.is_empty()


def _attributes(**changes: object) -> CacheAttributes:
    return CacheAttributes(fingerprint="a" * 64, inputs={"image_size": 8}, preprocessing={},
                           dataset="toy", created="2026-01-01T00:00:00+00:00", libraries={},
                           **changes)


def test_assemble_copies_every_segment_in_order(tmp_path: Path) -> None:
    partial = PartialCache.open(tmp_path / "p", MANIFEST_A)
    ids = {"train": [f"t{i}" for i in range(6)], "test": ["s0", "s1"]}
    labels = {"train": np.array([0, 1, 2, 0, 1, 2]), "test": np.array([2, 1])}
    # written out of order, as a resumed pass does; row 2 of train and row 0 of test were skipped
    partial.write_segment("train", 1, _segment([4, 5]))
    partial.write_segment("test", 0, _segment([1], skipped={0: "not an image"}))
    partial.write_segment("train", 0, _segment([0, 1, 3], skipped={2: "truncated"}))
    target = tmp_path / "cache.h5"
    partial.assemble(target, _attributes(), ["a", "b", "c"], ids, labels, width=2, dtype="float16")
    with h5py.File(target, "r") as handle:
        train = handle["train"]
        np.testing.assert_array_equal(train["features"][...],
                                      [[0, 1], [10, 11], [30, 31], [40, 41], [50, 51]])
        assert train["features"].dtype == np.float16
        assert train["labels"][...].tolist() == [0, 1, 0, 1, 2]
        assert train["ids"].asstr()[...].tolist() == ["t0", "t1", "t3", "t4", "t5"]
        assert handle["test/ids"].asstr()[...].tolist() == ["s1"]
        assert handle["test/labels"][...].tolist() == [1]
        assert "rows" not in train and "mirrored" not in train and "row" not in handle["skipped"]
        skipped = [handle["skipped"][c].asstr()[...].tolist() for c in ("split", "id", "reason")]
        assert skipped == [["train", "test"], ["t2", "s0"], ["truncated", "not an image"]]
    assert partial.segment_path("train", 0).exists()  # kept until remove()
    partial.remove()
    assert not (tmp_path / "p").exists()
    partial.remove()  # twice is harmless


def test_assemble_a_shard_with_its_source_rows_and_mirrored_views(tmp_path: Path) -> None:
    partial = PartialCache.open(tmp_path / "p", {**MANIFEST_A, "mirrored": True})
    ids = {"train": ["a", "b", "c"], "test": []}
    labels = {"train": np.array([1, 0, 1]), "test": np.zeros(0, int)}
    partial.write_segment("train", 0, _segment([0, 2], skipped={1: "bad"}, mirrored=True))
    target = tmp_path / "shard.h5"
    source_rows = {"train": np.array([10, 11, 12]), "test": np.zeros(0, np.int64)}
    partial.assemble(target, _attributes(tta="flip", kind="shard", shard={"index": 0}), ["x", "y"],
                     ids, labels, width=2, dtype="float32", source_rows=source_rows)
    with h5py.File(target, "r") as handle:
        assert handle["train/rows"][...].tolist() == [10, 12]
        np.testing.assert_array_equal(handle["train/mirrored"][...], [[0, -1], [-20, -21]])
        assert handle["skipped/row"][...].tolist() == [11]
        assert handle["test/features"].shape == (0, 2) and handle["test/rows"].shape == (0,)


def test_assemble_refuses_a_missing_segment(tmp_path: Path) -> None:
    partial = PartialCache.open(tmp_path / "p", MANIFEST_A)
    partial.write_segment("train", 0, _segment([0, 1, 2, 3]))
    partial.write_segment("train", 2, _segment([8]))
    target = tmp_path / "cache.h5"
    with pytest.raises(RuntimeError, match=r"^Segment missing in .*; run again\.$"):
        partial.assemble(target, _attributes(), ["a"], {"train": [str(i) for i in range(9)]},
                         {"train": np.zeros(9, int)}, width=2, dtype="float32")
    assert not target.exists()  # no half-written cache under the final name


def test_a_partial_folder_left_without_its_manifest_is_resumed(tmp_path: Path) -> None:
    directory = tmp_path / "p"
    directory.mkdir()  # a crash between the folder and its manifest
    partial = PartialCache.open(directory, MANIFEST_A)
    assert json.loads((directory / "manifest.json").read_text()) == MANIFEST_A
    assert partial.is_empty()


def test_a_segment_holding_pickled_objects_is_never_unpickled(tmp_path: Path) -> None:
    partial = PartialCache.open(tmp_path / "p", MANIFEST_A)
    path = partial.segment_path("train", 0)
    with path.open("wb") as handle:
        np.savez(handle, features=np.zeros((1, 2), np.float32), rows=np.arange(1),
                 skipped_rows=np.zeros(0, np.int64),
                 skipped_reasons=np.array([{"not": "text"}], dtype=object))
    assert partial.read_segment("train", 0) is None  # redone, not loaded with pickle
    assert not path.exists()


def test_segments_given_as_lists_and_empty_segments_assemble(tmp_path: Path) -> None:
    """rows and skipped rows given as plain lists (an empty one too) are stored as integers."""
    partial = PartialCache.open(tmp_path / "p", {**MANIFEST_A, "segment_size": 2})
    partial.write_segment("train", 0, Segment(np.zeros((0, 2), np.float32), [], [0, 1],
                                              ["bad", "worse"]))
    partial.write_segment("train", 1, Segment(np.ones((2, 2), np.float32), [2, 3], [], []))
    for index in (0, 1):
        with np.load(partial.segment_path("train", index)) as data:
            assert data["rows"].dtype == np.int64 and data["skipped_rows"].dtype == np.int64
    target = tmp_path / "shard.h5"
    partial.assemble(target, _attributes(kind="shard", shard={"index": 0}), ["x"],
                     {"train": ["a", "b", "c", "d"]}, {"train": np.zeros(4, int)}, width=2,
                     dtype="float32", compression="gzip",
                     source_rows={"train": np.array([5, 6, 7, 8])})
    with h5py.File(target, "r") as handle:
        assert handle["train/ids"].asstr()[...].tolist() == ["c", "d"]
        assert handle["train/rows"][...].tolist() == [7, 8]
        assert handle["skipped/row"][...].tolist() == [5, 6]
        assert handle["train/features"].compression == "gzip"
