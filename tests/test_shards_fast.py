"""store/shards.py without a backbone: shard files written with the store's own writer from a
tiny dataset, found in a store, checked and merged. Which shard a sample belongs to is worked out
by hand (sha256 of "headstart-shard:" + split/id, its first 8 bytes as a big-endian fraction),
and so are every merged row, id, label, skipped entry and error sentence.

The dataset: train t0..t7, test s0..s3. By hand, with 2 shards: train t4-t7 and test s0, s2 are
shard 0, train t0-t3 and test s1, s3 shard 1 (3 shards: `BY_HAND`). Feature j of row r is
10 r + j (+1000 for test), label r % 3; t2 and t5 are skipped (bad files)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from store import shards
from store.cache import FeatureCache
from store.errors import HeadstartError, command  # the program's name, as the CLI sets it
from store.format import CacheAttributes
from store.shards import (MAX_SHARDS, SHARD_SALT, MergeResult, ShardSelection, ShardSet,
                          ShardSpec, check_set, ids_digest, merge_shards, select_sets, shard_of,
                          shard_sets)
from store.store import Store
from store.writer import write_cache

FP = "ab" * 32
OTHER = "cd" * 32
IDS = {"train": [f"t{i}" for i in range(8)], "test": [f"s{i}" for i in range(4)]}
CLASSES = ["cat", "dog", "fox"]
INPUTS = {"backbone": "mobilenet", "alpha": 0.25, "weights": "keras-imagenet", "image_size": 8,
          "pooling": "avg"}
NAME = "toy_mobilenet-a0.25_8_avg"
#: shard of each sample (in IDS order) for 2 and 3 shards, worked out with `by_hand`
BY_HAND = {2: {"train": [1, 1, 1, 1, 0, 0, 0, 0], "test": [0, 1, 0, 1]},
           3: {"train": [2, 2, 2, 2, 0, 0, 1, 0], "test": [0, 2, 0, 1]}}
SKIPPED = {("train", "t2"): "truncated", ("train", "t5"): "not an image"}


def by_hand(split: str, sample_id: str, count: int) -> int:
    head = hashlib.sha256(f"headstart-shard:{split}/{sample_id}".encode("utf-8")).digest()[:8]
    return min(count - 1, int.from_bytes(head, "big") * count >> 64)


def digest_by_hand(ids: list[str]) -> str:
    return hashlib.sha256("".join(f"{i}\n" for i in ids).encode("utf-8")).hexdigest()


def value(split: str, row: int, width: int = 2) -> list[float]:
    return [(1000 if split == "test" else 0) + 10 * row + j for j in range(width)]


def shard_file(store: Store, fingerprint: str, index: int, count: int, ext: str = "h5") -> Path:
    return store.caches_dir / f"{fingerprint}.shard-{index:04d}-of-{count:04d}.{ext}"


def write_shard(store: Store, index: int, count: int, fingerprint: str = FP, *,
                ids: dict[str, list[str]] | None = None, skipped: dict | None = None,
                width: int = 2, dtype: str = "float32", tta: str | None = None,
                compression: str | None = None, info: dict | None = None, kind: str = "shard",
                libraries: dict | None = None,
                extra_rows: dict[str, list[int]] | None = None,
                drop_rows: dict[str, list[int]] | None = None, path: Path | None = None,
                omit: tuple[str, ...] = ()) -> Path:
    """Shard index/count of IDS as an extraction writes it (`/<split>/rows`, `/skipped/row`);
    `extra_rows` adds rows of other shards, `drop_rows` leaves some of its own out (a damaged
    or mixed-up shard)."""
    ids = IDS if ids is None else ids
    skipped = SKIPPED if skipped is None else skipped
    shard_info = {"index": index, "count": count, "totals": {s: len(v) for s, v in ids.items()},
                  "ids": {s: digest_by_hand(v) for s, v in ids.items()}, **(info or {})}
    attributes = CacheAttributes(fingerprint=fingerprint, inputs=INPUTS, preprocessing={},
                                 dataset="toy", created="2026-01-01T00:00:00+00:00",
                                 libraries=libraries or {},
                                 kind=kind, shard=shard_info if kind == "shard" else None, tta=tta)
    path = path or shard_file(store, fingerprint, index, count)
    path.parent.mkdir(parents=True, exist_ok=True)
    lost, lost_rows = [], []
    with write_cache(path, attributes, CLASSES) as out:
        for split, names in ids.items():
            mine = [r for r, i in enumerate(names) if by_hand(split, i, count) == index]
            rows = [r for r in mine if (split, names[r]) not in skipped
                    and r not in (drop_rows or {}).get(split, [])]
            rows = sorted(rows + (extra_rows or {}).get(split, []))
            for r in mine:
                if (split, names[r]) in skipped:
                    lost.append((split, names[r], skipped[split, names[r]]))
                    lost_rows.append(r)
            if split in omit:  # a split the shard holds no row of, left out of its file
                continue
            features = np.array([value(split, r, width) for r in rows], dtype).reshape(len(rows), width)
            out.split(split, [features], rows=len(rows), width=width, dtype=dtype,
                      labels=np.array([r % 3 for r in rows]),
                      ids=[names[r] if r < len(names) else f"x{r}" for r in rows],
                      compression=compression, source_rows=np.array(rows, np.int64),
                      mirrored=[-features] if tta else None)
        out.skipped(lost, source_rows=lost_rows)
    return path


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def refused(store: Store, selector: str | None = None) -> str:
    with pytest.raises(HeadstartError) as caught:
        merge_shards(store, selector)
    assert [p for p in store.caches_dir.glob("*.h5") if ".shard-" not in p.name] == []
    return str(caught.value)


# --- which shard a sample belongs to -----------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shard_of_is_the_hash_fraction_times_n(count: int) -> None:
    assert SHARD_SALT == "headstart-shard:"
    for split in ("train", "test"):
        for sample_id in [*IDS[split], "cat/00001.jpg", "ü.png"]:
            assert shard_of(split, sample_id, count) == by_hand(split, sample_id, count)
    for count_, table in BY_HAND.items():
        for split, expected in table.items():
            assert [shard_of(split, i, count_) for i in IDS[split]] == expected


def test_every_shard_gets_samples_and_the_last_one_is_reached() -> None:
    ids = [f"{i}.jpg" for i in range(200)]
    assert {shard_of("train", i, 7) for i in ids} == set(range(7))
    assert {shard_of("train", i, 1) for i in ids} == {0}


def test_ids_digest_is_sha256_of_the_ids_one_a_line() -> None:
    assert ids_digest(["a", "b"]) == hashlib.sha256(b"a\nb\n").hexdigest()
    assert ids_digest([]) == hashlib.sha256(b"").hexdigest()
    assert ids_digest(["é"]) == hashlib.sha256("é\n".encode("utf-8")).hexdigest()
    assert ids_digest(["a", "b"]) != ids_digest(["b", "a"])


@pytest.mark.parametrize(("index", "count", "ok"), [
    (0, 1, True), (1, 2, True), (0, MAX_SHARDS, True), (MAX_SHARDS - 1, MAX_SHARDS, True),
    (0, 0, False), (2, 2, False), (-1, 2, False), (0, MAX_SHARDS + 1, False), (3, 2, False)])
def test_shard_spec_bounds(index: int, count: int, ok: bool) -> None:
    assert MAX_SHARDS == 100_000
    if ok:
        spec = ShardSpec(index, count)
        assert (spec.index, spec.count) == (index, count)
        return
    with pytest.raises(HeadstartError) as caught:
        ShardSpec(index, count)
    assert str(caught.value) == (f"--shard {index}/{count} is not a shard: use i/N with 0 <= i < N"
                                 " and 1 <= N <= 100000.")


@pytest.mark.parametrize(("text", "parsed"), [("3/16", (3, 16)), (" 3 / 16 ", (3, 16)),
                                              ("0/1", (0, 1)), ("007/0010", (7, 10))])
def test_shard_spec_parses_i_over_n(text: str, parsed: tuple[int, int]) -> None:
    spec = ShardSpec.parse(text)
    assert (spec.index, spec.count) == parsed
    assert str(spec) == f"{parsed[0]}/{parsed[1]}"


@pytest.mark.parametrize("text", ["3", "3/", "/16", "a/b", "3/16x", "x3/16", "3//16", "-1/2", ""])
def test_shard_spec_refuses_other_text(text: str) -> None:
    with pytest.raises(HeadstartError) as caught:
        ShardSpec.parse(text)
    assert str(caught.value) == f"--shard expects i/N, e.g. 3/16 (shards 0 to 15); got {text!r}."


def test_shard_spec_suffix_owns_and_is_hashable() -> None:
    assert ShardSpec(3, 16).suffix == "shard-0003-of-0016"
    assert ShardSpec(12345, 99999).suffix == "shard-12345-of-99999"
    assert str(ShardSpec(3, 16)) == "3/16"
    assert [ShardSpec(1, 2).owns("train", i) for i in IDS["train"]] == [True] * 4 + [False] * 4
    assert [ShardSpec(0, 2).owns("test", i) for i in IDS["test"]] == [True, False, True, False]
    assert ShardSpec(1, 2) == ShardSpec(1, 2) and len({ShardSpec(1, 2), ShardSpec(1, 2)}) == 1


def test_a_selection_lists_its_rows_totals_and_ids() -> None:
    selection = ShardSelection.select(ShardSpec(2, 3), IDS)
    assert selection.rows["train"].tolist() == [0, 1, 2, 3]
    assert selection.rows["test"].tolist() == [1]
    assert selection.rows["train"].dtype == np.int64
    assert ShardSelection.select(ShardSpec(1, 3), {"x": []}).rows["x"].dtype == np.int64
    assert selection.totals == {"train": 8, "test": 4}
    assert selection.info() == {"index": 2, "count": 3, "totals": {"train": 8, "test": 4},
                                "ids": {s: digest_by_hand(v) for s, v in IDS.items()}}


# --- finding shards in a store -------------------------------------------------------------------


def test_shard_sets_of_a_store_without_caches(store: Store) -> None:
    assert shard_sets(store) == []
    with pytest.raises(HeadstartError) as caught:
        select_sets(store, None)
    assert str(caught.value) == (f"Store {store.root} holds no shards; make them with "
                                 f"'{command('extract DATASET ... --shard i/N')}'.")


def test_shard_sets_read_finished_files_and_unfinished_folders_only(store: Store) -> None:
    first = write_shard(store, 0, 3)
    running = shard_file(store, FP, 1, 3, "partial")
    running.mkdir()
    other = write_shard(store, 1, 2, OTHER)
    for name in [f"{FP}.shard-0002-of-0003.tmp", f"{FP}.shard-0003-of-0003.h5",
                 f"{FP}.shard-0002-of-0000.h5", f"{FP.upper()}.shard-0002-of-0003.h5",
                 f"{FP[:-1]}.shard-0002-of-0003.h5", f"{FP}.shard-0002-of-0003x.h5",
                 f"{FP}.h5", f"{FP}.shard-2-of-3"]:
        (store.caches_dir / name).write_text("")
    found = shard_sets(store)
    assert [s.fingerprint for s in found] == [FP, OTHER]
    assert found[0].finished == {ShardSpec(0, 3): first}
    assert found[0].unfinished == {ShardSpec(1, 3): running}
    assert found[1].finished == {ShardSpec(1, 2): other} and found[1].unfinished == {}
    assert found[0].short_id == "ab" * 6 and found[0].counts == {3}
    (store.caches_dir / f"{FP}.shard-7-of-9.h5").write_text("")  # digits need no padding
    assert shard_sets(store)[0].counts == {3, 9}


def test_a_shard_set_summary(store: Store) -> None:
    write_shard(store, 0, 4)
    write_shard(store, 3, 4)
    shard_file(store, FP, 1, 4, "partial").mkdir()
    write_shard(store, 0, 2)
    shard_file(store, FP, 2, 3, "partial").mkdir()  # another N: not this count's
    (found,) = shard_sets(store)
    assert found.summary() == {"fingerprint": FP, "name": NAME, "count": 4, "finished": [0, 3],
                               "unfinished": [1], "missing": [2], "other_counts": [2, 3]}


def test_a_shard_set_is_named_by_a_readable_finished_shard(store: Store) -> None:
    bad = shard_file(store, FP, 0, 2)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not hdf5")
    shard_file(store, FP, 1, 2, "partial").mkdir()
    assert ShardSet(FP, {ShardSpec(0, 2): bad}).name() == "unnamed"
    assert ShardSet(FP, unfinished={ShardSpec(1, 2): bad}).name() == "unnamed"
    good = write_shard(store, 1, 2)
    assert ShardSet(FP, {ShardSpec(0, 2): bad, ShardSpec(1, 2): good}).name() == NAME


def test_select_sets_by_name_or_fingerprint_prefix(store: Store) -> None:
    write_shard(store, 0, 2)
    write_shard(store, 0, 2, OTHER, ids={"train": ["t0"], "test": []})
    assert [s.fingerprint for s in select_sets(store, None)] == [FP, OTHER]
    assert [s.fingerprint for s in select_sets(store, "cdcd")] == [OTHER]
    assert [s.fingerprint for s in select_sets(store, NAME)] == [FP, OTHER]
    with pytest.raises(HeadstartError) as caught:
        select_sets(store, "ffff")
    assert str(caught.value) == (f"No shards match 'ffff'; shards in this store are of: {NAME} "
                                 f"({FP[:12]}), {NAME} ({OTHER[:12]}).")


# --- merging ---------------------------------------------------------------------------------------


def read(path: Path) -> dict:
    with h5py.File(path, "r") as handle:
        out = {s: {"features": handle[s]["features"][...].tolist(),
                   "labels": handle[s]["labels"][...].tolist(),
                   "ids": handle[s]["ids"].asstr()[...].tolist(),
                   "keys": sorted(handle[s])} for s in ("train", "test")}
        out["skipped"] = list(zip(*(handle["skipped"][c].asstr()[...].tolist()
                                    for c in ("split", "id", "reason"))))
        out["skipped_keys"] = sorted(handle["skipped"])
        out["dtype"] = str(handle["train"]["features"].dtype)
        out["compression"] = handle["train"]["features"].compression
        out["mirrored"] = {s: handle[s]["mirrored"][...].tolist() for s in ("train", "test")
                           if "mirrored" in handle[s]}
    return out


#: the full splits in order, skipped rows left out (train rows 2 and 5)
TRAIN_ROWS, TEST_ROWS = [0, 1, 3, 4, 6, 7], [0, 1, 2, 3]


def assert_merged(path: Path, width: int = 2, dtype: str = "float32") -> dict:
    merged = read(path)
    assert merged["train"]["features"] == [value("train", r, width) for r in TRAIN_ROWS]
    assert merged["test"]["features"] == [value("test", r, width) for r in TEST_ROWS]
    assert merged["train"]["labels"] == [r % 3 for r in TRAIN_ROWS]
    assert merged["test"]["labels"] == [0, 1, 2, 0]
    assert merged["train"]["ids"] == ["t0", "t1", "t3", "t4", "t6", "t7"]
    assert merged["test"]["ids"] == ["s0", "s1", "s2", "s3"]
    assert merged["skipped"] == [("train", "t2", "truncated"), ("train", "t5", "not an image")]
    assert merged["train"]["keys"] == ["features", "ids", "labels"] + (
        ["mirrored"] if merged["mirrored"] else [])
    assert merged["skipped_keys"] == ["id", "reason", "split"]
    assert merged["dtype"] == dtype
    cache = FeatureCache(path)
    assert cache.kind == "features" and cache.shard is None
    with h5py.File(path, "r") as handle:
        assert handle.attrs["kind"] == "features" and "shard" not in handle.attrs
    assert cache.fingerprint == FP and cache.class_names == CLASSES and cache.width == width
    return merged


def test_two_shards_merge_into_the_full_splits_in_order(store: Store) -> None:
    zero, one = write_shard(store, 0, 2), write_shard(store, 1, 2)
    running = shard_file(store, FP, 1, 2, "partial")  # a run's folder left beside its shard
    running.mkdir()
    (result,) = merge_shards(store)
    assert not running.exists()
    assert result.shards == 2 and not result.reused and 0 <= result.seconds < 60
    assert result.cache.path == store.cache_path(FP)
    assert FeatureCache(store.cache_path(FP)).attributes.merged == {"shards": 2}
    assert_merged(store.cache_path(FP))
    assert FeatureCache(store.cache_path(FP)).created != "2026-01-01T00:00:00+00:00"
    assert result.removed == [zero, one, running] and not zero.exists() and not one.exists()
    assert result.lines() == [
        f"Merged 2 shards into cache {NAME} ({FP[:12]}), train 6, test 4 rows x 2 (float32); "
        f"written to {store.cache_path(FP)}",
        "Removed 3 shard files (use --keep-shards to keep them)."]
    assert not store.lock_path(FP).exists()


def test_merge_keeps_the_shards_when_asked_and_removes_unfinished_runs(store: Store) -> None:
    paths = [write_shard(store, i, 3) for i in range(3)]
    (result,) = merge_shards(store, NAME, keep_shards=True)
    assert result.removed == [] and all(p.exists() for p in paths)
    assert FeatureCache(store.cache_path(FP)).attributes.merged == {"shards": 3}
    assert_merged(store.cache_path(FP))
    assert result.lines() == [f"Merged 3 shards into cache {NAME} ({FP[:12]}), train 6, test 4 "
                              f"rows x 2 (float32); written to {store.cache_path(FP)}"]
    # merged already: reused, and the shards (and an unfinished run of one) are removed now
    running = shard_file(store, FP, 1, 3, "partial")
    running.mkdir()
    (running / "manifest.json").write_text("{}")
    before = store.cache_path(FP).read_bytes()
    (again,) = merge_shards(store, FP[:8])
    assert again.reused and again.shards == 0
    assert store.cache_path(FP).read_bytes() == before
    assert sorted(again.removed) == sorted([*paths, running])
    assert not any(p.exists() for p in [*paths, running])
    assert again.lines()[0].startswith(f"Already merged: cache {NAME} ({FP[:12]}), train 6, test 4")
    assert again.lines()[1] == "Removed 4 shard files (use --keep-shards to keep them)."


def test_merge_copies_in_blocks_and_keeps_views_type_and_compression(store: Store,
                                                                     monkeypatch) -> None:
    for i in range(2):
        write_shard(store, i, 2, width=3, dtype="float16", tta="flip", compression="gzip")
    monkeypatch.setattr(shards, "_MERGE_BLOCK_BYTES", 3 * 2 * 4)  # 4 float16 rows of 3 a block
    merge_shards(store)
    merged = assert_merged(store.cache_path(FP), width=3, dtype="float16")
    assert merged["compression"] == "gzip"
    assert merged["mirrored"] == {"train": [[-x for x in value("train", r, 3)] for r in TRAIN_ROWS],
                                  "test": [[-x for x in value("test", r, 3)] for r in TEST_ROWS]}
    assert FeatureCache(store.cache_path(FP)).tta == "flip"


@pytest.mark.parametrize("block_rows", [1, 2, 5])
def test_merge_in_blocks_of_one_two_or_five_rows(store: Store, monkeypatch, block_rows: int) -> None:
    for i in range(3):
        write_shard(store, i, 3)
    monkeypatch.setattr(shards, "_MERGE_BLOCK_BYTES", block_rows * 2 * 4)
    merge_shards(store)
    assert read(store.cache_path(FP))["compression"] is None
    assert_merged(store.cache_path(FP))


def test_an_empty_shard_takes_its_width_from_the_others(store: Store) -> None:
    ids = {"train": ["t0", "t4"], "test": []}  # with 3 shards: t0 in 2, t4 in 0; shard 1 empty
    write_shard(store, 1, 3, ids=ids, skipped={}, width=0, dtype="float16")
    write_shard(store, 0, 3, ids=ids, skipped={})
    write_shard(store, 2, 3, ids=ids, skipped={})
    merge_shards(store)
    with h5py.File(store.cache_path(FP), "r") as handle:
        assert handle["train/features"][...].tolist() == [value("train", 0), value("train", 1)]
        assert handle["train/ids"].asstr()[...].tolist() == ["t0", "t4"]
        assert handle["train/labels"][...].tolist() == [0, 1]
        assert handle["train/features"].dtype == np.float32
        assert handle["test/features"].shape == (0, 2)


def test_an_all_empty_set_merges_with_the_first_shards_layout(store: Store) -> None:
    ids = {"train": [], "test": []}
    write_shard(store, 0, 2, ids=ids, skipped={}, width=0, dtype="float16")
    write_shard(store, 1, 2, ids=ids, skipped={}, width=5, dtype="float32")
    merge_shards(store)
    with h5py.File(store.cache_path(FP), "r") as handle:
        assert handle["train/features"].shape == (0, 0)
        assert str(handle["train/features"].dtype) == "float16"


# --- sets that cannot be merged: one sentence each -------------------------------------------------

TITLE = f"Shards of cache {NAME} ({FP[:12]})"


def test_shards_cut_into_different_numbers(store: Store) -> None:
    write_shard(store, 0, 2)
    write_shard(store, 1, 3)
    write_shard(store, 2, 3)
    assert refused(store) == (f"{TITLE} disagree on the number of shards (0/2 cut it into 2; "
                              "1/3, 2/3 cut it into 3); delete the odd ones, or rerun them with "
                              "the same N.")


def test_missing_and_running_shards_are_named(store: Store) -> None:
    write_shard(store, 0, 3)
    shard_file(store, FP, 1, 3, "partial").mkdir()
    assert refused(store) == (f"{TITLE} cannot be merged: 2 of 3 shards not finished (1/3, 2/3); "
                              "1/3 started: rerun the same extract --shard i/3 to resume.")
    write_shard(store, 2, 3)
    assert refused(store) == (f"{TITLE} cannot be merged: 1 of 3 shards not finished (1/3); 1/3 "
                              "started: rerun the same extract --shard i/3 to resume.")


def test_a_long_list_of_missing_shards_is_cut_after_ten(store: Store) -> None:
    write_shard(store, 0, 13)
    listed = ", ".join(f"{i}/13" for i in range(1, 11))
    assert refused(store) == (f"{TITLE} cannot be merged: 12 of 13 shards not finished ({listed} "
                              "... and 2 more).")
    write_shard(store, 1, 13)
    listed = ", ".join(f"{i}/13" for i in range(2, 12))
    assert refused(store).endswith(f"11 of 13 shards not finished ({listed} ... and 1 more).")
    write_shard(store, 2, 13)
    listed = ", ".join(f"{i}/13" for i in range(3, 13))  # exactly ten: all of them
    assert refused(store).endswith(f"10 of 13 shards not finished ({listed}).")
    write_shard(store, 3, 13)
    listed = ", ".join(f"{i}/13" for i in range(4, 13))
    assert refused(store).endswith(f"9 of 13 shards not finished ({listed}).")


def test_shards_of_another_fingerprint_are_not_mixed_in(store: Store) -> None:
    write_shard(store, 0, 2)
    write_shard(store, 1, 2, OTHER)
    write_shard(store, 1, 2, "ee" * 32, ids={"train": ["t0"], "test": []})
    write_shard(store, 0, 3, "ee" * 32, ids={"train": ["t0"], "test": []})
    (store.caches_dir / f"{'ff' * 32}.shard-0000-of-0002.partial").mkdir()  # unnamed: no stray
    text = refused(store, NAME)
    ee = "ee" * 6
    assert text == (
        f"{TITLE} cannot be merged: 1 of 2 shards not finished (1/2); shards of the same dataset "
        f"and backbone with another fingerprint ({OTHER[:12]}: 1/2, {ee}: 0/3, 1/3) were made "
        "from other images or settings and cannot be mixed in. "
        f"Shards of cache {NAME} ({OTHER[:12]}) cannot be merged: 1 of 2 shards not finished "
        f"(0/2); shards of the same dataset and backbone with another fingerprint ({FP[:12]}: "
        f"0/2, {ee}: 0/3, 1/3) were made from other images or settings and cannot be mixed in. "
        f"Shards of cache {NAME} ({ee}) disagree on the number of shards (1/2 cut it into 2; 0/3 "
        "cut it into 3); delete the odd ones, or rerun them with the same N.")
    assert refused(store, FP[:6]).endswith("(1/2).")  # the others are not chosen, not listed


def test_a_good_set_is_not_merged_beside_a_bad_one(store: Store) -> None:
    write_shard(store, 0, 2)
    write_shard(store, 1, 2)
    write_shard(store, 0, 2, OTHER)
    assert refused(store).startswith(f"Shards of cache {NAME} ({OTHER[:12]}) cannot be merged")


@pytest.mark.parametrize(("kind", "info", "fingerprint", "said"), [
    ("shard", {"index": 0}, FP, f"shard 0/2 of cache {FP[:12]}"),
    ("shard", {"count": 3}, FP, f"shard 1/3 of cache {FP[:12]}"),
    ("shard", {}, OTHER, f"shard 1/2 of cache {OTHER[:12]}"),
    ("features", {}, FP, f"a features cache {FP[:12]}"),
])
def test_a_renamed_shard_is_named(store: Store, kind: str, info: dict, fingerprint: str,
                                  said: str) -> None:
    write_shard(store, 0, 2)
    path = shard_file(store, FP, 1, 2)
    write_shard(store, 1, 2, fingerprint, info=info, kind=kind, path=path)
    assert refused(store) == (f"{path.name} says it is {said}, not what its file name says; it "
                              "was renamed or copied in by mistake: delete it and rerun that "
                              "shard.")


def test_a_renamed_first_shard_is_named(store: Store) -> None:
    path = shard_file(store, FP, 0, 2)
    write_shard(store, 1, 2, path=path)
    write_shard(store, 1, 2)
    assert refused(store).startswith(f"{path.name} says it is shard 1/2 of cache {FP[:12]}, ")


@pytest.mark.parametrize("odd", [0, 1, 2])
@pytest.mark.parametrize("info", [{"totals": {"train": 9, "test": 4}},
                                  {"ids": {"train": "0" * 64, "test": digest_by_hand(IDS["test"])}}])
def test_shards_of_different_full_datasets_are_refused(store: Store, info: dict, odd: int) -> None:
    for i in range(3):
        write_shard(store, i, 3, info=info if i == odd else None)
    assert refused(store) == (f"{TITLE} disagree on the samples of the full dataset (shard "
                              f"{max(odd, 1)}/3 against 0/3); rerun them from the same images.")


def test_shards_of_different_widths_or_types_are_refused(store: Store) -> None:
    write_shard(store, 0, 2)
    write_shard(store, 1, 2, width=3)
    assert refused(store) == (f"{TITLE} disagree on feature width or type ([(2, 'float32'), "
                              "(3, 'float32')]).")
    write_shard(store, 1, 2, dtype="float16")
    assert refused(store).endswith("([(2, 'float16'), (2, 'float32')]).")


def test_a_sample_held_twice_is_named(store: Store) -> None:
    write_shard(store, 0, 2)
    write_shard(store, 1, 2, extra_rows={"train": [4]})  # t4, shard 0's
    assert refused(store) == ("Shards 0/2 and 1/2 both hold train sample 't4'; delete one of "
                              "them and rerun it.")


def test_a_sample_in_the_wrong_shard_is_named(store: Store) -> None:
    write_shard(store, 0, 2, extra_rows={"train": [0]})  # t0, which is shard 1's
    write_shard(store, 1, 2, drop_rows={"train": [0]})
    assert refused(store) == ("Shard 0/2 holds train sample 't0', which belongs to shard 1/2; it "
                              "was made another way: rerun it with this headstart.")
    write_shard(store, 0, 2, drop_rows={"train": [4]})
    write_shard(store, 1, 2, extra_rows={"train": [4]})  # t4, which is shard 0's
    assert refused(store) == ("Shard 1/2 holds train sample 't4', which belongs to shard 0/2; it "
                              "was made another way: rerun it with this headstart.")


def test_a_row_outside_the_full_split_is_named(store: Store) -> None:
    write_shard(store, 0, 2)
    write_shard(store, 1, 2, extra_rows={"test": [4]})
    assert refused(store) == ("Shard 1/2 holds test sample 'x4' at row 4, outside the 4 rows of "
                              "the full split; it is damaged.")
    write_shard(store, 1, 2, extra_rows={"test": [-1]})
    assert refused(store).startswith("Shard 1/2 holds test sample ")
    assert "at row -1, outside the 4 rows" in refused(store)


def test_samples_held_by_no_shard_are_named(store: Store) -> None:
    write_shard(store, 0, 2, skipped={}, drop_rows={"train": [6]})
    write_shard(store, 1, 2, skipped={}, drop_rows={"train": [1, 3]})
    assert refused(store) == ("The shards hold no train sample at 3 row(s) of the full split "
                              "(first: row 1); they were cut from different images: rerun them "
                              "from the same ones.")


def test_ids_that_differ_from_the_full_datasets_are_named(store: Store) -> None:
    info = {"ids": {"train": digest_by_hand(IDS["train"][::-1]),
                    "test": digest_by_hand(IDS["test"])}}
    write_shard(store, 0, 2, info=info)
    write_shard(store, 1, 2, info=info)
    assert refused(store) == ("The train sample ids of the shards differ from the full dataset's; "
                              "rerun the shards from the same images.")
    info = {"ids": {"train": digest_by_hand(IDS["train"]), "test": "0" * 64}}
    write_shard(store, 0, 2, info=info)
    write_shard(store, 1, 2, info=info)
    assert refused(store).startswith("The test sample ids of the shards differ")


def test_check_set_returns_the_shards_in_index_order(store: Store) -> None:
    paths = [write_shard(store, i, 3) for i in (2, 0, 1)]
    (found,) = shard_sets(store)
    checked = check_set(found)
    assert [c.path for c in checked] == [paths[1], paths[2], paths[0]]
    assert [c.shard["index"] for c in checked] == [0, 1, 2]


def test_merge_result_lines_without_removal() -> None:
    class Cache:
        name, short_id, width, dtype, path = "n", "0123", 7, "float16", Path("/s/x.h5")
        split_sizes = {"train": 3}
    assert MergeResult(Cache(), 4, 0.5).lines() == [
        "Merged 4 shards into cache n (0123), train 3 rows x 7 (float16); written to /s/x.h5"]
    assert MergeResult(Cache(), 4, 0.5, reused=True, removed=[Path("a")]).lines() == [
        "Already merged: cache n (0123), train 3 rows x 7 (float16); written to /s/x.h5",
        "Removed 1 shard files (use --keep-shards to keep them)."]


def test_merge_reads_the_skipped_rows_of_a_split_with_no_features(store: Store) -> None:
    # every train sample of shard 1 was skipped: its train split has no rows
    skipped = {("train", f"t{i}"): "bad" for i in range(4)}
    write_shard(store, 0, 2, skipped=skipped)
    write_shard(store, 1, 2, skipped=skipped)
    merge_shards(store)
    merged = read(store.cache_path(FP))
    assert merged["train"]["ids"] == ["t4", "t5", "t6", "t7"]
    assert merged["skipped"] == [("train", f"t{i}", "bad") for i in range(4)]
    with h5py.File(store.cache_path(FP), "r") as handle:
        assert json.loads(handle.attrs["merged"]) == {"shards": 2}


def test_a_merged_store_holds_the_cache_alone(store: Store) -> None:
    """No shard file, unfinished run or lock is left after a merge."""
    write_shard(store, 0, 2)
    write_shard(store, 1, 2)
    merge_shards(store)
    assert sorted(p.name for p in store.caches_dir.iterdir()) == [f"{FP}.h5"]


def test_a_shard_file_without_a_split_it_has_no_sample_of(store: Store) -> None:
    ids = {"train": IDS["train"], "test": ["s1", "s3"]}  # both of shard 1
    write_shard(store, 0, 2, ids=ids, omit=("test",), tta="flip")
    write_shard(store, 1, 2, ids=ids, tta="flip")
    merge_shards(store)
    with h5py.File(store.cache_path(FP), "r") as handle:
        assert handle["test/ids"].asstr()[...].tolist() == ["s1", "s3"]
        assert handle["test/features"][...].tolist() == [value("test", 0), value("test", 1)]
        assert handle["test/labels"][...].tolist() == [0, 1]
        assert handle["test/mirrored"][...].tolist() == [[-x for x in value("test", r)]
                                                         for r in (0, 1)]
        assert handle["train/ids"].asstr()[...].tolist() == ["t0", "t1", "t3", "t4", "t6", "t7"]


def test_one_shard_merges_into_the_whole_cache(store: Store) -> None:
    write_shard(store, 0, 1)
    (result,) = merge_shards(store)
    assert result.shards == 1
    assert FeatureCache(store.cache_path(FP)).attributes.merged == {"shards": 1}
    assert_merged(store.cache_path(FP))


def test_the_merged_cache_takes_shard_zeros_attributes(store: Store) -> None:
    for i in range(2):
        write_shard(store, i, 2, libraries={"machine": f"m{i}"})
    merge_shards(store)
    assert FeatureCache(store.cache_path(FP)).libraries == {"machine": "m0"}


def test_compression_comes_from_the_first_shard_with_rows(store: Store) -> None:
    ids = {"train": ["t0", "t6"], "test": ["s3"]}  # with 3 shards: t0 in 2, t6 and s3 in 1
    write_shard(store, 0, 3, ids=ids, skipped={}, compression="gzip")  # no rows at all
    write_shard(store, 1, 3, ids=ids, skipped={})
    write_shard(store, 2, 3, ids=ids, skipped={}, compression="gzip")
    merge_shards(store)
    with h5py.File(store.cache_path(FP), "r") as handle:
        assert handle["train/features"].compression is None
        assert handle["train/ids"].asstr()[...].tolist() == ["t0", "t6"]


def test_a_shard_file_without_a_split_but_with_skipped_files_of_it(store: Store) -> None:
    ids = {"train": IDS["train"], "test": ["s1", "s3", "s0"]}  # s0 is shard 0's, and skipped
    skipped = {("test", "s0"): "bad"}
    write_shard(store, 0, 2, ids=ids, omit=("test",), skipped=skipped)
    write_shard(store, 1, 2, ids=ids, skipped=skipped)
    merge_shards(store)
    merged = FeatureCache(store.cache_path(FP))
    assert merged.ids("test").tolist() == ["s1", "s3"]
    assert merged.skipped == [{"split": "test", "id": "s0", "reason": "bad"}]
