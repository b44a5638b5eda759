"""store/format.py, store/writer.py and store/check.py on small HDF5 files written by the one
writer (no backbone, no TensorFlow). Expected attribute names, encodings, shapes and the
checker's phrases are written out here from docs/format.md, not taken from the modules."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest

from store.check import layout_problems, split_problem
from store.format import CacheAttributes, utc_now
from store.writer import write_cache

FP = "ab" * 32


def _attributes(**changes: Any) -> CacheAttributes:
    return CacheAttributes(fingerprint=FP, inputs={"image_size": 32}, preprocessing={"s": 1},
                           dataset="toy", created="2026-01-01T00:00:00+00:00",
                           libraries={"h5py": "3"}, **changes)


# --- format -----------------------------------------------------------------------------------

def test_the_required_attributes_and_their_encodings() -> None:
    assert _attributes().to_attrs() == {
        "encoding-type": "headstart.feature-cache", "encoding-version": "1.4",
        "fingerprint": FP, "inputs": '{"image_size": 32}', "preprocessing": '{"s": 1}',
        "dataset": "toy", "source": "{}", "created": "2026-01-01T00:00:00+00:00",
        "libraries": '{"h5py": "3"}', "kind": "features"}


#: field -> (value, its attribute name, its stored form): every optional attribute, by hand.
OPTIONAL = {
    "weights_path": ("w.h5", "weights-path", "w.h5"),
    "parent": ("cd" * 32, "parent", "cd" * 32),
    "view": (3, "view", 3),
    "augmentation": ({"seed": 1}, "augmentation", '{"seed": 1}'),
    "lineage": ({"p": "q"}, "lineage", '{"p": "q"}'),
    "shard": ({"index": 0}, "shard", '{"index": 0}'),
    "merged": ({"shards": 2}, "merged", '{"shards": 2}'),
    "blocks": ([{"name": "b", "start": 0, "stop": 2}], "blocks",
               '[{"name": "b", "start": 0, "stop": 2}]'),
    "tta": ("flip", "tta", "flip"),
    "source": ({"kind": "folder"}, "source", '{"kind": "folder"}'),
}


@pytest.mark.parametrize("name", OPTIONAL)
def test_each_optional_attribute_is_stored_and_read_back(name: str) -> None:
    value, attr, stored = OPTIONAL[name]
    attrs = _attributes(**{name: value}).to_attrs()
    assert attrs[attr] == stored
    assert len(attrs) == 10 + (name != "source")
    again = CacheAttributes.from_attrs(attrs)
    assert getattr(again, name) == value and again == _attributes(**{name: value})


def test_optional_attributes_may_be_missing_and_required_ones_may_not() -> None:
    required = _attributes().to_attrs()
    del required["source"], required["kind"]
    record = CacheAttributes.from_attrs(required)
    assert (record.source, record.kind, record.weights_path, record.view, record.tta) == (
        {}, "features", None, None, None)
    for attr in ("encoding-type", "encoding-version", "fingerprint", "inputs", "preprocessing",
                 "dataset", "created", "libraries"):
        broken = dict(required)
        del broken[attr]
        with pytest.raises(KeyError, match=attr):
            CacheAttributes.from_attrs(broken)


def test_read_values_get_their_types_and_unknown_attributes_are_kept() -> None:
    attrs = {**_attributes().to_attrs(), "view": np.int64(2), "dataset": np.str_("toy"),
             "weights-path": "", "future": "x"}
    record = CacheAttributes.from_attrs(attrs)
    assert record.view == 2 and type(record.view) is int
    assert type(record.dataset) is str and record.weights_path is None  # 1.1's "" for no file
    assert record.extra == {"future": "x"} and record.to_attrs()["future"] == "x"
    assert record.image_size == 32 and type(record.image_size) is int
    assert CacheAttributes.from_attrs({**attrs, "weights-path": "w.h5"}).weights_path == "w.h5"
    assert record.replace(dataset="other").dataset == "other" and record.dataset == "toy"


def test_utc_now_is_utc_to_the_second() -> None:
    stamp = utc_now()
    parsed = datetime.fromisoformat(stamp)
    assert parsed.utcoffset() == timedelta(0) and parsed.microsecond == 0
    assert len(stamp) == len("2026-01-01T00:00:00+00:00")
    assert abs(datetime.now(parsed.tzinfo) - parsed) < timedelta(seconds=5)
    assert "." in utc_now("microseconds")


# --- writer -----------------------------------------------------------------------------------

def _write(path: Path, attributes: CacheAttributes, rows: dict[str, int], width: int = 3,
           dtype: str = "float32", compression: str | None = None, shard: bool = False,
           skipped: list[tuple[str, str, str]] = (), block: int = 2) -> dict[str, np.ndarray]:
    """Write a cache of `rows` per split (features 0, 1, 2, ... in blocks of `block` rows)."""
    written = {}
    with write_cache(path, attributes, ["a", "b", "c"]) as cache:
        for split, count in rows.items():
            features = np.arange(count * width, dtype=np.float32).reshape(count, width) / 4
            written[split] = features
            blocks = [features[i:i + block] for i in range(0, count, block)]
            cache.split(split, iter(blocks), rows=count, width=width, dtype=dtype,
                        labels=np.arange(count) % 3, ids=[f"{split}-{i}" for i in range(count)],
                        compression=compression,
                        source_rows=np.arange(count) * 2 if shard else None,
                        mirrored=iter([-b for b in blocks]) if attributes.tta else None)
        cache.skipped(list(skipped), [7] * len(skipped) if shard else None)
    return written


def test_the_writer_stores_the_layout_of_the_spec(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    features = _write(path, _attributes(), {"train": 5, "test": 0},
                      skipped=[("train", "bad.jpg", "truncated")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]  # no temporary left
    with h5py.File(path, "r") as handle:
        assert dict(handle.attrs) == _attributes().to_attrs()
        assert handle["classes"].asstr()[...].tolist() == ["a", "b", "c"]
        train = handle["train"]
        assert sorted(train) == ["features", "ids", "labels"]
        assert train["features"].dtype == np.float32 and train["features"].shape == (5, 3)
        np.testing.assert_array_equal(train["features"][...], features["train"])
        assert train["features"].fletcher32 and train["features"].chunks == (5, 3)
        assert train["features"].compression is None
        assert train["labels"].dtype == np.int32 and train["labels"][...].tolist() == [0, 1, 2, 0, 1]
        assert train["ids"].asstr()[...].tolist() == [f"train-{i}" for i in range(5)]
        empty = handle["test/features"]
        assert empty.shape == (0, 3) and empty.chunks is None and not empty.fletcher32
        skipped = handle["skipped"]
        assert sorted(skipped) == ["id", "reason", "split"]
        assert [skipped[c].asstr()[...].tolist() for c in ("split", "id", "reason")] == [
            ["train"], ["bad.jpg"], ["truncated"]]


def test_chunks_are_whole_rows_of_about_64_kib(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    _write(path, _attributes(), {"train": 300}, width=100, dtype="float16", block=64)
    with h5py.File(path, "r") as handle:
        data = handle["train/features"]
        assert data.dtype == np.float16
        assert data.chunks == (300, 100)  # 65536 // 200 bytes = 327 rows > 300 rows
    _write(path, _attributes(), {"train": 300}, width=100, block=64)
    with h5py.File(path, "r") as handle:
        assert handle["train/features"].chunks == (163, 100)  # 65536 // 400 bytes


def test_views_shards_mirrored_and_compression(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    views = _attributes(kind="views", parent="cd" * 32, view=2, augmentation={"seed": 0},
                        tta="flip")
    features = _write(path, views, {"train": 3}, compression="gzip")
    with h5py.File(path, "r") as handle:
        train = handle["train"]
        assert train["views"].dtype == np.int32 and train["views"][...].tolist() == [2, 2, 2]
        np.testing.assert_array_equal(train["mirrored"][...], -features["train"])
        assert train["mirrored"].fletcher32 and train["features"].compression == "gzip"
        assert "rows" not in train
    shard = _attributes(kind="shard", shard={"index": 0})
    _write(path, shard, {"train": 3}, shard=True, skipped=[("train", "x", "y")])
    with h5py.File(path, "r") as handle:
        assert handle["train/rows"].dtype == np.int64
        assert handle["train/rows"][...].tolist() == [0, 2, 4]
        assert handle["skipped/row"][...].tolist() == [7]
        assert "views" not in handle["train"] and "mirrored" not in handle["train"]


def test_empty_skipped_columns_and_row_lists_keep_their_types(tmp_path: Path) -> None:
    """No skipped file, and a shard split given as plain (empty) lists: text and int64 still,
    so readers can take /skipped as text and the rows as indices."""
    path = tmp_path / "c.h5"
    shard = _attributes(kind="shard", shard={"index": 0})
    with write_cache(path, shard, ["a"]) as cache:
        cache.split("train", [], rows=0, width=2, dtype="float32", labels=[], ids=[],
                    source_rows=[])
        cache.skipped([], [])
    with h5py.File(path, "r") as handle:
        for column in ("split", "id", "reason"):
            data = handle["skipped"][column]
            assert data.shape == (0,) and h5py.check_string_dtype(data.dtype).encoding == "utf-8"
        assert handle["skipped/row"].dtype == np.int64 and handle["skipped/row"].shape == (0,)
        assert handle["train/rows"].dtype == np.int64 and handle["train/rows"].shape == (0,)
        assert handle["train/labels"].dtype == np.int32
        assert h5py.check_string_dtype(handle["train/ids"].dtype).encoding == "utf-8"
    assert _problems(path, shard) == ([], 0)


@pytest.mark.parametrize("tta", [None, "flip"])
def test_mirrored_goes_with_the_tta_attribute_only(tmp_path: Path, tta: str | None) -> None:
    with pytest.raises(ValueError, match=r"^/<split>/mirrored is written exactly when the tta "
                                         r"attribute is set$"):
        with write_cache(tmp_path / "c.h5", _attributes(tta=tta), ["a"]) as cache:
            cache.split("train", [np.zeros((1, 2))], rows=1, width=2, dtype="float32",
                        labels=[0], ids=["x"], mirrored=None if tta else [np.zeros((1, 2))])
    assert list(tmp_path.iterdir()) == []  # a failed write leaves nothing


# --- check ------------------------------------------------------------------------------------

def _problems(path: Path, attributes: CacheAttributes, classes: int = 3,
              contents: bool = True) -> tuple[list[str], int]:
    with h5py.File(path, "r") as handle:
        return layout_problems(handle, attributes, classes, contents)


def _healthy(path: Path, attributes: CacheAttributes | None = None, **options: Any) -> CacheAttributes:
    attributes = attributes or _attributes()
    _write(path, attributes, {"train": 5, "test": 2}, **options)
    assert _problems(path, attributes) == ([], 7)
    return attributes


def _edit(path: Path, change: Callable[[h5py.File], None]) -> None:
    with h5py.File(path, "r+") as handle:
        change(handle)


def _replace(key: str, data: Any, **options: Any) -> Callable[[h5py.File], None]:
    def change(handle: h5py.File) -> None:
        if key in handle:
            del handle[key]
        handle.create_dataset(key, data=data, **options)
    return change


def _set(key: str, index: Any, value: Any) -> Callable[[h5py.File], None]:
    def change(handle: h5py.File) -> None:
        handle[key][index] = value
    return change


#: a damage to a healthy features file -> the checker's problems, written by hand.
DAMAGE: dict[str, tuple[Callable[[h5py.File], None], list[str]]] = {
    "no ids": (lambda h: h.__delitem__("test/ids"), ["has no test/ids"]),
    "no labels": (lambda h: h.__delitem__("train/labels"), ["has no train/labels"]),
    "no features": (lambda h: h.__delitem__("test/features"), ["has no test/features"]),
    "a label short": (_replace("train/labels", np.zeros(4, np.int32)),
                      ["has 5 train feature rows, 4 labels and 5 ids; they must agree"]),
    "an id short": (_replace("test/ids", ["x"]),
                    ["has 2 test feature rows, 2 labels and 1 ids; they must agree"]),
    "features of 1 dimension": (_replace("test/features", np.zeros(2, np.float32),
                                         fletcher32=True, chunks=(2,)),
                                ["has 2 test feature rows, 2 labels and 2 ids; they must agree"]),
    "no checksums": (_replace("train/features", np.zeros((5, 3), np.float32)),
                     ["stores train/features without Fletcher-32 checksums"]),
    "a NaN": (_set("train/features", (3, 1), np.nan), ["has a NaN or infinite feature in train row 3"]),
    "an infinity in row 0": (_set("test/features", (0, 2), np.inf),
                             ["has a NaN or infinite feature in test row 0"]),
    "a negative label": (_set("test/labels", 1, -1), ["has test labels outside 0..2"]),
    "a label too large": (_set("train/labels", 0, 3), ["has train labels outside 0..2"]),
    "duplicate ids": (_set("train/ids", 4, "train-0"), ["has duplicate train sample ids"]),
    "no skipped reason": (lambda h: h.__delitem__("skipped/reason"), ["has no complete /skipped group"]),
    "no skipped group": (lambda h: h.__delitem__("skipped"), ["has no complete /skipped group"]),
    "skipped columns of two lengths": (_replace("skipped/id", ["a"]),
                                       ["has /skipped columns of different lengths"]),
    "mirrored without tta": (_replace("train/mirrored", np.zeros((5, 3), np.float32)),
                             ["has train/mirrored without the tta attribute"]),
    "two problems": (lambda h: (h.__delitem__("train/ids"), h.__delitem__("skipped")),
                     ["has no train/ids", "has no complete /skipped group"]),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_the_checker_names_each_damage(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "c.h5"
    attributes = _healthy(path)
    change, expected = DAMAGE[damage]
    _edit(path, change)
    assert _problems(path, attributes)[0] == expected


def test_the_row_count_and_a_problem_in_the_second_split(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    attributes = _healthy(path)
    _edit(path, _replace("test/ids", ["x"]))
    assert _problems(path, attributes) == (
        ["has 2 test feature rows, 2 labels and 1 ids; they must agree"], 7)
    _edit(path, lambda h: h.__delitem__("test/labels"))
    assert _problems(path, attributes) == (["has no test/labels"], 5)


def test_without_contents_values_are_not_read(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    attributes = _healthy(path)
    _edit(path, _set("train/features", (1, 1), np.nan))
    _edit(path, _set("train/labels", 1, 9))
    assert _problems(path, attributes, contents=False) == ([], 7)
    assert _problems(path, attributes)[0] == ["has a NaN or infinite feature in train row 1"]


@pytest.mark.parametrize("row", [250, 390, 399])
def test_a_nan_past_the_first_chunks_is_found(tmp_path: Path, row: int) -> None:
    path = tmp_path / "c.h5"
    attributes = _attributes()
    _write(path, attributes, {"train": 400}, width=100, block=100)  # chunks of 163 rows
    _edit(path, _set("train/features", (row, 99), np.nan))
    assert _problems(path, attributes) == ([f"has a NaN or infinite feature in train row {row}"], 400)


def test_contents_are_read_by_default(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    attributes = _healthy(path)
    _edit(path, _set("train/features", (1, 1), np.nan))
    with h5py.File(path, "r") as handle:
        assert layout_problems(handle, attributes, 3)[0] == [
            "has a NaN or infinite feature in train row 1"]
        assert split_problem(handle["train"], "train", 3, attributes) == (
            "has a NaN or infinite feature in train row 1", 5)


def test_an_empty_split_is_healthy(tmp_path: Path) -> None:
    """0 rows: no chunks and no checksums (HDF5 has no chunk to check), mirrored view alike."""
    for attributes in (_attributes(), _attributes(tta="flip")):
        path = tmp_path / "c.h5"
        _write(path, attributes, {"train": 3, "test": 0})
        assert _problems(path, attributes) == ([], 3)


def test_blocks_of_a_file_without_columns(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    _write(path, _attributes(), {"train": 0}, width=0)
    assert _problems(path, _attributes(blocks=[]))[0] == [
        "has a blocks attribute that does not tile its 0 feature columns"]


def test_a_file_without_splits(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    with write_cache(path, _attributes(), ["a"]) as cache:
        cache.skipped([])
    assert _problems(path, _attributes(kind="nonsense")) == (["holds no split"], 0)


#: attributes that break the spec -> the checker's problem (on an otherwise healthy file).
BAD_ATTRIBUTES = {
    "an unknown kind": (dict(kind="thumbnails"),
                        ["has kind 'thumbnails', not one of features, views, shard"]),
    "views without parent and view": (dict(kind="views", augmentation={"a": 1}), [
        "is a views file without its parent, view attribute", "has no train/views",
        "has no test/views"]),
    "a shard without shard": (dict(kind="shard"), [
        "is a shard file without its shard attribute", "has no train/rows", "has no test/rows",
        "has no complete /skipped group"]),
    "tta other than flip": (dict(tta="rotate"), ["has tta 'rotate', not 'flip'"] * 2),
    "tta without mirrored": (dict(tta="flip"), ["has no train/mirrored", "has no test/mirrored"]),
}


@pytest.mark.parametrize("case", BAD_ATTRIBUTES)
def test_the_checker_names_bad_attributes(tmp_path: Path, case: str) -> None:
    path = tmp_path / "c.h5"
    _healthy(path)
    changes, expected = BAD_ATTRIBUTES[case]
    assert _problems(path, _attributes(**changes))[0] == expected


def test_healthy_views_shards_and_mirrored_files(tmp_path: Path) -> None:
    views = _attributes(kind="views", parent="cd" * 32, view=1, augmentation={"a": 1}, tta="flip")
    _healthy(tmp_path / "v.h5", views)
    shard = _attributes(kind="shard", shard={"index": 1})
    _healthy(tmp_path / "s.h5", shard, shard=True)
    _edit(tmp_path / "s.h5", _replace("train/rows", np.zeros(4, np.int64)))
    assert _problems(tmp_path / "s.h5", shard)[0] == ["has 4 train/rows for 5 rows"]
    _edit(tmp_path / "s.h5", lambda h: h.__delitem__("skipped/row"))
    assert _problems(tmp_path / "s.h5", shard)[0] == ["has 4 train/rows for 5 rows",
                                                      "has no complete /skipped group"]
    _edit(tmp_path / "v.h5", _replace("train/views", np.zeros((5, 1), np.int32)))
    assert _problems(tmp_path / "v.h5", views)[0] == ["has 5 train/views for 5 rows"]


MIRRORED_DAMAGE = {
    "a NaN": (_set("test/mirrored", (1, 0), np.nan),
              ["has a NaN or infinite mirrored feature in test row 1"]),
    "another shape": (_replace("train/mirrored", np.zeros((5, 2), np.float32), fletcher32=True),
                      ["has train/mirrored of shape (5, 2) (float32) for features of shape "
                       "(5, 3) (float32)"]),
    "another dtype": (_replace("train/mirrored", np.zeros((5, 3), np.float16), fletcher32=True),
                      ["has train/mirrored of shape (5, 3) (float16) for features of shape "
                       "(5, 3) (float32)"]),
    "no checksums": (_replace("train/mirrored", np.zeros((5, 3), np.float32)),
                     ["stores train/mirrored without Fletcher-32 checksums"]),
}


@pytest.mark.parametrize("damage", MIRRORED_DAMAGE)
def test_the_checker_names_mirrored_damage(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "c.h5"
    attributes = _healthy(path, _attributes(tta="flip"))
    change, expected = MIRRORED_DAMAGE[damage]
    _edit(path, change)
    assert _problems(path, attributes)[0] == expected


#: blocks attributes for 3 feature columns -> tiles them or not (worked out by hand).
BLOCKS = [
    ([{"name": "a", "start": 0, "stop": 3}], True),
    ([{"name": "a", "start": 0, "stop": 1}, {"name": "b", "start": 1, "stop": 3}], True),
    ([{"name": "a", "start": 0, "stop": 2}], False),  # stops short
    ([{"name": "a", "start": 1, "stop": 3}], False),  # starts late
    ([{"name": "a", "start": 0, "stop": 2}, {"name": "b", "start": 1, "stop": 3}], False),  # overlap
    ([{"name": "a", "start": 0, "stop": 0}, {"name": "b", "start": 0, "stop": 3}], False),  # empty
    ([{"name": 1, "start": 0, "stop": 3}], False),  # a name that is not text
    ([{"start": 0, "stop": 3}], False),  # no name
    ([{"name": "a", "start": "x", "stop": 3}], False),
    ([{"name": "a", "start": 0, "stop": 3}, "b"], False),
    ([], False),
    ([{"name": "a", "start": 0, "stop": 3}, {"name": 2, "start": 3, "stop": 3}], False),  # one dropped
]


@pytest.mark.parametrize(("blocks", "tiles"), BLOCKS)
def test_the_blocks_attribute_must_tile_the_columns(tmp_path: Path, blocks: list, tiles: bool) -> None:
    path = tmp_path / "c.h5"
    _healthy(path)
    expected = [] if tiles else ["has a blocks attribute that does not tile its 3 feature columns"]
    assert _problems(path, _attributes(blocks=blocks))[0] == expected


def test_blocks_of_one_dimensional_features(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    _healthy(path)
    _edit(path, _replace("train/features", np.zeros(5, np.float32), fletcher32=True, chunks=(5,)))
    assert _problems(path, _attributes(blocks=[{"name": "a", "start": 0, "stop": 3}]))[0] == [
        "has a blocks attribute that does not tile its -1 feature columns",
        "has 5 train feature rows, 5 labels and 5 ids; they must agree"]


def test_the_spec_json_encodings_are_plain_json(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    _healthy(path, _attributes(lineage={"parent": "x"}))
    with h5py.File(path, "r") as handle:
        assert json.loads(handle.attrs["lineage"]) == {"parent": "x"}
