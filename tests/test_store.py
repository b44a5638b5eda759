"""The feature store: a cache's contents, attributes and numbers, and what readers refuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import MINI, MINI_ARGS, WEIGHTS
from tests.helpers import assert_clean_error, copy_store, run_cli, snapshot
from store import layout
from store.cache import FeatureCache
from store.errors import HeadstartError
from store.store import Store


def test_rows_ids_and_labels_match_the_folders(mini_cache: FeatureCache) -> None:
    assert mini_cache.class_names == sorted(p.name for p in (MINI / "train").iterdir())
    assert mini_cache.split_sizes == {"train": 400, "test": 200}
    for split in ("train", "test"):
        ids = mini_cache.ids(split)
        labels = mini_cache.labels(split)
        assert len(set(ids)) == len(ids) == len(labels) == mini_cache.split_sizes[split]
        on_disk = {p.relative_to(MINI).as_posix() for p in (MINI / split).rglob("*.jpg")}
        assert set(ids) == on_disk  # ids are paths relative to the dataset folder
        folder_of_id = [mini_cache.class_names.index(i.split("/")[1]) for i in ids]
        assert labels.tolist() == folder_of_id
    assert mini_cache.skipped == []


def test_width_dtype_and_attributes(mini_cache: FeatureCache) -> None:
    assert mini_cache.width == 256  # MobileNet alpha 0.25, avg pooling
    assert mini_cache.dtype == "float16"
    features = mini_cache.features("train")
    assert features.shape == (400, 256) and features.dtype == np.float32
    assert np.isfinite(features).all() and features.std() > 0
    with h5py.File(mini_cache.path, "r") as handle:
        attrs = dict(handle.attrs)
        assert handle["train/features"].dtype == np.float16
        assert handle["train/features"].chunks is not None
        assert handle["train/labels"].dtype == np.int32
    assert attrs["encoding-type"] == layout.ENCODING_TYPE == "headstart.feature-cache"
    assert attrs["encoding-version"] == layout.ENCODING_VERSION
    assert attrs["fingerprint"] == mini_cache.fingerprint == mini_cache.path.stem
    inputs = json.loads(attrs["inputs"])
    assert inputs["backbone"] == "mobilenet" and inputs["alpha"] == 0.25
    assert inputs["image_size"] == 64 and inputs["pooling"] == "avg" and inputs["dtype"] == "float16"
    assert inputs["weights"].startswith("file-sha256:")
    assert inputs["dataset"]["classes"] == mini_cache.class_names
    assert inputs["dataset"]["source"] == {"kind": "folder", "layout": "split-folders",
                                           "test_folder": "test"}
    preprocessing = json.loads(attrs["preprocessing"])
    assert preprocessing == inputs["preprocessing"]
    assert preprocessing["image_size"] == 64
    assert preprocessing["preprocess_input"] == "keras.applications.mobilenet.preprocess_input"
    libraries = json.loads(attrs["libraries"])
    assert {"tensorflow", "keras", "h5py", "numpy"} <= set(libraries)
    assert libraries["h5py"] == h5py.__version__
    assert attrs["created"] and attrs["dataset"] == "cifar10-mini"


def test_features_equal_a_direct_forward_pass(mini_cache: FeatureCache) -> None:
    """Rebuild the model and the preprocessing from the cache and recompute a few rows."""
    from extract.backbones import Weights, build_feature_model, get_backbone
    from extract.preprocessing import Preprocessing

    preprocessing = Preprocessing.from_dict(mini_cache.preprocessing)
    model = build_feature_model(get_backbone("mobilenet"), 0.25, Weights.parse(str(WEIGHTS)),
                                64, "avg")
    for split in ("train", "test"):
        ids = mini_cache.ids(split)
        rows = np.array([0, 7, len(ids) // 2, len(ids) - 1])
        pixels = np.stack([preprocessing.load_file(MINI / ids[r]) for r in rows])
        expected = np.asarray(model.predict_on_batch(preprocessing.apply(pixels)))
        stored = mini_cache.features(split, rows)
        np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
        # and the rows are not interchangeable: each matches its own image best
        distances = np.linalg.norm(stored[:, None, :] - expected[None, :, :], axis=2)
        assert (distances.argmin(axis=1) == np.arange(len(rows))).all()


def test_blocks_cover_the_split_in_order(mini_cache: FeatureCache) -> None:
    blocks = list(mini_cache.iter_feature_blocks("test"))
    assert blocks[0][0] == 0
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]),
                                  mini_cache.features("test"))


def _with_version(cache: FeatureCache, target: Path, version: str) -> Path:
    path = target / "caches" / cache.path.name
    path.parent.mkdir(parents=True)
    shutil.copy(cache.path, path)
    with h5py.File(path, "r+") as handle:
        handle.attrs["encoding-version"] = version
    return path


def test_unknown_major_version_is_refused(mini_cache: FeatureCache, tmp_path: Path) -> None:
    path = _with_version(mini_cache, tmp_path, "2.0")
    with pytest.raises(HeadstartError) as caught:
        FeatureCache(path)
    message = str(caught.value)
    assert "2.0" in message and layout.ENCODING_VERSION in message
    assert "upgrade headstart" in message and "extract again" in message
    before = snapshot(tmp_path)
    result = run_cli("fit", "--head", "logreg", "--store", str(tmp_path))
    assert_clean_error(result, "format version 2.0", "upgrade headstart")
    assert snapshot(tmp_path) == before


def test_a_newer_minor_version_is_read(mini_cache: FeatureCache, tmp_path: Path) -> None:
    cache = FeatureCache(_with_version(mini_cache, tmp_path, "1.7"))
    assert cache.version == "1.7" and cache.split_sizes == mini_cache.split_sizes


@pytest.mark.parametrize("damage", ["garbage", "foreign-hdf5", "no-version"])
def test_a_file_that_is_not_a_cache_is_refused(tmp_path: Path, mini_cache: FeatureCache,
                                               damage: str) -> None:
    path = tmp_path / "caches" / mini_cache.path.name
    path.parent.mkdir()
    if damage == "garbage":
        path.write_bytes(b"not hdf5 at all")
    elif damage == "foreign-hdf5":
        with h5py.File(path, "w") as handle:
            handle["x"] = np.zeros(3)
    else:
        shutil.copy(mini_cache.path, path)
        with h5py.File(path, "r+") as handle:
            del handle.attrs["encoding-version"]
    with pytest.raises(HeadstartError, match="cache"):
        FeatureCache(path)


def test_cache_selection_by_prefix_and_name(mini_store: Path, mini_cache: FeatureCache) -> None:
    store = Store(mini_store)
    assert store.find_cache().fingerprint == mini_cache.fingerprint
    assert store.find_cache(mini_cache.short_id[:6]).path == mini_cache.path
    assert store.find_cache(mini_cache.name).path == mini_cache.path
    with pytest.raises(HeadstartError, match="No cache matches 'ffffffff'"):
        store.find_cache("ffffffff")


def test_temporary_and_partial_files_are_not_caches(mini_store: Path, tmp_path: Path,
                                                    mini_cache: FeatureCache) -> None:
    """Debris a crash can leave next to a finished cache is never listed as a cache."""
    root = copy_store(mini_store, tmp_path)
    caches = root / "caches"
    shutil.copy(mini_cache.path, caches / f".{mini_cache.fingerprint}.tmp-123.h5")
    (caches / f"{'0' * 64}.partial").mkdir()
    shutil.copy(mini_cache.path, caches / "notes.h5")
    store = Store(root)
    assert [c.path for c in store.caches()] == [caches / mini_cache.path.name]
    assert store.unfinished() == [caches / f"{'0' * 64}.partial"]


def test_an_extraction_folder_left_beside_its_finished_cache(mini_store: Path, tmp_path: Path,
                                                            mini_cache: FeatureCache) -> None:
    """A writer killed between the final rename and the folder's removal: lookups leave the
    folder alone and do not list it as unfinished; the next extract of that cache removes it,
    unless a writer holds the cache's lock."""
    store = Store(copy_store(mini_store, tmp_path))
    leftover = store.partial_dir(mini_cache.fingerprint)
    leftover.mkdir()
    (leftover / "manifest.json").write_text("{}")
    assert store.finished(mini_cache.fingerprint).path == store.cache_path(mini_cache.fingerprint)
    assert leftover.is_dir()
    assert store.unfinished() == [] and store.leftovers() == [leftover]
    listing = run_cli("list", "--store", str(store.root))
    assert "1 extraction folder(s) left beside finished caches" in listing.output, listing.output
    assert "unfinished" not in listing.output
    report = run_cli("verify", "--store", str(store.root))
    assert report.exit_code == 1 and "finished but its extraction folder was left behind" in (
        " ".join(report.output.split())), report.output
    with store.writing(mini_cache.fingerprint):
        store.remove_leftover(mini_cache.fingerprint)
        assert leftover.is_dir()
    result = run_cli("extract", str(MINI), *MINI_ARGS, "--store", str(store.root))
    assert "reused" in result.output.lower(), result.output
    assert not leftover.exists() and store.leftovers() == []


def test_the_newest_cache_is_the_default_even_within_one_second(
        mini_store: Path, tmp_path: Path, mini_cache: FeatureCache) -> None:
    """Two caches finished in the same second (same `created`): the later file wins."""
    import os

    root = copy_store(mini_store, tmp_path)
    original = root / "caches" / mini_cache.path.name
    for name, seconds in (("f" * 64, 1_000), ("0" * 64, 2_000)):
        copy = root / "caches" / f"{name}.h5"
        shutil.copy(original, copy)
        with h5py.File(copy, "r+") as handle:
            handle.attrs["fingerprint"] = name
        os.utime(copy, (seconds, seconds))
    os.utime(original, (3_000, 3_000))
    store = Store(root)
    assert [c.fingerprint[0] for c in store.caches()] == ["f", "0", mini_cache.fingerprint[0]]
    os.utime(original, (500, 500))
    assert store.find_cache().fingerprint == "0" * 64


def test_lock_files_exist_only_while_held_and_verify_reports_stale_ones(tmp_path) -> None:
    """A writer removes its lock file when done (also when it fails); one left by a killed
    writer is listed as stale, reported by verify and removed by --fix; a held lock is not."""
    import fcntl

    from store.errors import HeadstartError
    from store.store import Store
    from store.verify import verify_store

    store = Store(tmp_path)
    key = "ab" * 32
    with store.writing(key):
        assert store.lock_path(key).is_file() and store.is_being_written(key)
        assert store.stale_locks() == []
    assert not store.lock_path(key).exists()
    with pytest.raises(RuntimeError):
        with store.writing(key):
            raise RuntimeError("a failing extraction")
    assert not store.lock_path(key).exists()

    store.lock_path(key).write_text("")  # what a killed writer leaves
    assert store.stale_locks() == [store.lock_path(key)]
    said: list[str] = []
    report = verify_store(store, say=said.append)
    assert any("lock file no process holds" in line for line in said)
    assert len(report.unfixed) == 1
    verify_store(store, fix=True, say=said.append)
    assert not store.lock_path(key).exists()

    with open(store.lock_path(key), "a+") as held:  # another process's lock
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert store.stale_locks() == [] and store.is_being_written(key)
        with pytest.raises(HeadstartError, match="Another headstart process"):
            with store.writing(key):
                pass
        assert store.lock_path(key).exists()
