"""Caches of several blocks and of the mirrored view (`extract --blocks N --tta flip`, format 1.4).

One multi-block mirrored extraction of the mini set at 64 px (module fixture) is checked against
Keras directly, against today's cache (`mini_cache`), after an interruption, through shards and
merge, and by `verify`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

import extract.pipeline as pipeline
import extract.plan as plan_module
from extract.backbones import Weights, build_feature_model
from extract.multiblock import mirror
from store.cache import FeatureCache
from store.errors import HeadstartError
from store.store import Store
from tests.conftest import MINI, MINI_ARGS, WEIGHTS
from tests.helpers import assert_clean_error, make_folder, make_plan, run_cli
from tests.test_extract import CountingForward, segment_files
from tests.test_format_spec import spec_table

SIZE = 64
TOP3 = [("conv_pw_11_relu", 0, 128), ("conv_pw_12_relu", 128, 384), ("conv_pw_13_relu", 384, 640)]
#: The fingerprint of the mini cache at 64 px as the code before format 1.4 wrote it.
TODAYS_FINGERPRINT = "4fc815a231187ff402472b112a1c9ae6464e7e440b5a261fcdc0c220097f9e2a"


def views_plan(dataset: Any = MINI, **changes: Any) -> Any:
    return make_plan(dataset, image_size=SIZE, blocks=3, tta="flip", **changes)


@pytest.fixture(scope="module")
def views_cache(tmp_path_factory: pytest.TempPathFactory, shared_paths) -> FeatureCache:
    store = Store(tmp_path_factory.mktemp("views-store"))
    return pipeline.extract_features(views_plan(), store, progress=False).cache


def assert_same_views(cache: FeatureCache, reference: FeatureCache) -> None:
    """Same fingerprint, blocks, rows and bytes, original and mirrored."""
    assert cache.fingerprint == reference.fingerprint
    assert (cache.blocks, cache.tta) == (reference.blocks, reference.tta)
    for split in ("train", "test"):
        np.testing.assert_array_equal(cache.ids(split), reference.ids(split))
        for mirrored in (False, True):
            np.testing.assert_array_equal(cache.features(split, mirrored=mirrored),
                                          reference.features(split, mirrored=mirrored))


def test_each_blocks_columns_are_the_pooled_output_of_its_layer(views_cache) -> None:
    import keras

    assert views_cache.blocks == TOP3 and views_cache.tta == "flip"
    assert views_cache.width == 640 and "_b3_flip" in views_cache.name
    plan = views_plan()
    dataset, prep = plan.dataset, plan.preprocessing
    rows = list(range(0, 400, 25))
    assert views_cache.ids("train")[rows].tolist() == [dataset.splits["train"].ids[r] for r in rows]
    resized = prep.resize_batch(prep.stack([dataset.load("train", r, prep, resized=False)
                                            for r in rows]))
    base = build_feature_model(plan.backbone, 0.25, Weights.parse(str(WEIGHTS)), SIZE, "avg")
    for images, mirrored in ((resized, False), (mirror(resized), True)):
        cached = views_cache.features("train", np.asarray(rows), mirrored=mirrored)
        for name, start, stop in views_cache.blocks:
            layer = keras.Model(base.inputs, base.get_layer(name).output)
            pooled = np.asarray(layer.predict(prep.apply(images), verbose=0)).mean(axis=(1, 2))
            np.testing.assert_allclose(cached[:, start:stop], pooled, rtol=2e-2, atol=2e-3)


def test_the_original_view_and_last_block_are_todays_cache(views_cache, mini_cache) -> None:
    assert mini_cache.fingerprint == TODAYS_FINGERPRINT  # --blocks 1: today's fingerprint
    assert mini_cache.blocks == [("output", 0, 256)] and mini_cache.tta is None
    for split in ("train", "test"):
        today = mini_cache.features(split)
        np.testing.assert_array_equal(views_cache.features(split)[:, 384:], today)
        assert not np.allclose(views_cache.features(split, mirrored=True)[:, 384:], today,
                               atol=1e-2)
        blocks = list(views_cache.iter_feature_blocks(split, mirrored=True))
        np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]),
                                      views_cache.features(split, mirrored=True))
    with pytest.raises(HeadstartError, match="holds no mirrored view; extract it with --tta"):
        mini_cache.features("train", mirrored=True)


def test_blocks_one_writes_todays_file(mini_cache, tmp_path: Path) -> None:
    """No 1.4 attribute or dataset, the same datasets and storage as the session's cache."""
    result = run_cli("extract", str(MINI), *MINI_ARGS, "--blocks", "1", "--store", str(tmp_path))
    assert result.exit_code == 0, result.output
    (cache,) = Store(tmp_path).caches()
    assert cache.fingerprint == mini_cache.fingerprint

    def contents(path: Path) -> tuple[set[str], dict[str, Any]]:
        found: dict[str, Any] = {}
        with h5py.File(path, "r") as handle:
            handle.visititems(lambda name, item: found.__setitem__(name, (
                item.shape, item.dtype.str, item.chunks, item.fletcher32,
                item.asstr()[...].tolist() if item.dtype.kind == "O" else item[...].tobytes()))
                if isinstance(item, h5py.Dataset) else None)
            return set(handle.attrs), found

    attrs, datasets = contents(cache.path)
    assert not {"blocks", "tta"} & attrs and not any("mirrored" in d for d in datasets)
    assert (attrs, datasets) == contents(mini_cache.path)


def test_fingerprint_changes_with_blocks_and_tta() -> None:
    default = make_plan(MINI, image_size=SIZE)
    assert default.fingerprint == make_plan(MINI, image_size=SIZE, blocks=1).fingerprint
    assert not {"blocks", "tta"} & set(default.inputs)
    prints = {make_plan(MINI, image_size=SIZE, **c).fingerprint
              for c in ({}, {"blocks": 2}, {"blocks": 3}, {"tta": "flip"},
                        {"blocks": 3, "tta": "flip"})}
    assert len(prints) == 5
    assert views_plan().inputs["blocks"] == 3 and views_plan().inputs["tta"] == "flip"


def test_the_file_holds_only_what_the_spec_lists(views_cache) -> None:
    names: list[str] = []
    with h5py.File(views_cache.path, "r") as handle:
        attrs = set(handle.attrs)
        handle.visititems(lambda name, item: names.append(name)
                          if isinstance(item, h5py.Dataset) else None)
        for split in ("train", "test"):
            features, mirrored = handle[split]["features"], handle[split]["mirrored"]
            assert (mirrored.shape, mirrored.dtype, mirrored.chunks, mirrored.fletcher32) == (
                features.shape, features.dtype, features.chunks, True)
    assert attrs <= set(spec_table("Root attributes")) and {"blocks", "tta"} <= attrs
    import re

    generic = {"/" + re.sub(r"^(train|test)/", "<split>/", name) for name in names}
    assert "/<split>/mirrored" in generic and generic <= set(spec_table("Datasets"))


@pytest.mark.parametrize("args, fragments", [
    (["--blocks", "2", "--pooling", "flatten"], ["--blocks above 1", "avg or max"]),
])
def test_flatten_takes_one_block(args: list[str], fragments: list[str], tmp_path: Path) -> None:
    assert_clean_error(run_cli("extract", str(MINI), *MINI_ARGS, *args, "--store",
                               str(tmp_path)), *fragments)
    assert not (tmp_path / "caches").exists() or not any((tmp_path / "caches").iterdir())


@pytest.mark.parametrize("args", [["--blocks", "9"], ["--blocks", "0"], ["--tta", "mirror"]])
def test_out_of_range_blocks_and_unknown_tta_are_refused(args: list[str], tmp_path) -> None:
    result = run_cli("extract", str(MINI), *MINI_ARGS, *args, "--store", str(tmp_path))
    assert result.exit_code == 2 and "Invalid value" in result.output, result.output


def test_resume_after_interrupting_a_multiblock_mirrored_extraction(
        views_cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 128-row segments: train 128+128+128+16, test 128+72
    monkeypatch.setattr(plan_module, "MAX_SEGMENT_SIZE", 128)
    monkeypatch.setattr(plan_module, "SEGMENTS_PER_SPLIT", 1)
    real = pipeline.runtime_forward
    built: list[CountingForward] = []

    def counting(interrupt_after: int | None) -> None:
        def make(*args: Any, **kwargs: Any) -> CountingForward:
            built.append(CountingForward(real(*args, **kwargs), interrupt_after))
            return built[-1]
        monkeypatch.setattr(pipeline, "runtime_forward", make)

    store = Store(tmp_path / "store")
    counting(interrupt_after=3)  # the 4th batch is interrupted: segment 0 is finished
    with pytest.raises(KeyboardInterrupt, match="Kept 128 of 600 images"):
        pipeline.extract_features(views_plan(), store, progress=False)
    (segment,) = segment_files(store.root)
    with np.load(segment) as data:
        assert data["mirrored"].shape == data["features"].shape == (128, 640)
    assert len(built) == 2  # the original and the mirrored view's forward functions
    counting(interrupt_after=None)
    resumed = pipeline.extract_features(views_plan(), store, progress=False)
    assert resumed.computed == 600 - 128 and built[-2].images == built[-1].images == 600 - 128
    assert store.unfinished() == [] and segment_files(store.root) == []
    assert_same_views(resumed.cache, views_cache)


def test_shards_merge_and_verify(views_cache, tmp_path: Path) -> None:
    from store.shards import ShardSpec, merge_shards
    from store.verify import verify_store

    store = Store(tmp_path / "store")
    for index in range(2):
        plan = views_plan()
        plan = dataclasses.replace(plan, dataset=plan.dataset.sharded(ShardSpec(index, 2)))
        shard = pipeline.extract_features(plan, store, progress=False).cache
        assert shard.kind == "shard" and shard.blocks == TOP3 and shard.tta == "flip"
    (merged,) = merge_shards(store)
    assert_same_views(merged.cache, views_cache)
    assert verify_store(store, say=lambda line: None).problems == []

    path = merged.cache.path
    with h5py.File(path, "r+") as handle:
        handle["test/mirrored"][3, 5] = np.nan
    sentences: list[str] = []
    report = verify_store(store, say=sentences.append)
    assert "NaN or infinite mirrored feature in test row 3" in sentences[0]
    assert report.problems[0].remove == [path]
    with h5py.File(path, "r+") as handle:
        del handle["test/mirrored"]
    assert "has no test/mirrored" in verify_store(store, say=lambda line: None).problems[0].sentence


def test_views_of_a_multiblock_mirrored_plan_have_the_blocks_not_the_mirror(
        tmp_path: Path) -> None:
    from extract.augment import Augmentation
    from extract.pipeline import extract_views

    root = make_folder(tmp_path / "d", {"cat": 4, "dog": 4})
    plan = make_plan(root, blocks=2, tta="flip")
    parent = pipeline.extract_features(plan, Store(tmp_path / "s"), progress=False).cache
    (view,) = extract_views(plan, Augmentation(), 1, Store(tmp_path / "s"), progress=False)
    assert view.cache.kind == "views" and view.cache.parent == parent.fingerprint
    assert view.cache.blocks == parent.blocks and len(parent.blocks) == 2
    assert view.cache.tta is None and list(view.cache.split_sizes) == ["train"]
    with pytest.raises(HeadstartError, match="no mirrored view"):
        view.cache.features("train", mirrored=True)


def test_cache_forward_gives_the_cached_rows(views_cache) -> None:
    from extract.rebuild import cache_feature_model, cache_forward, cache_weights

    weights = cache_weights(views_cache)
    assert cache_feature_model(views_cache, weights).output_shape[-1] == 640
    plan = views_plan()
    prep = plan.preprocessing
    pixels = prep.stack([plan.dataset.load("test", r, prep, resized=False) for r in range(8)])
    features, mirrored = cache_forward(views_cache, weights)(pixels)
    rows = slice(0, 8)
    np.testing.assert_allclose(features, views_cache.features("test", rows), rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(mirrored, views_cache.features("test", rows, mirrored=True),
                               rtol=1e-2, atol=1e-3)
    assert cache_forward(views_cache, weights, tta=False)(pixels)[1] is None


def test_a_run_killed_before_assembly_records_the_blocks_from_its_segments(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from store.partial import PartialCache

    root = make_folder(tmp_path / "d", {"cat": 3, "dog": 3})
    reference = pipeline.extract_features(make_plan(root, blocks=2, tta="flip"),
                                          Store(tmp_path / "ref"), progress=False).cache
    store = Store(tmp_path / "store")
    assemble = PartialCache.assemble

    def dies(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("killed")

    monkeypatch.setattr(PartialCache, "assemble", dies)
    with pytest.raises(RuntimeError):
        pipeline.extract_features(make_plan(root, blocks=2, tta="flip"), store, progress=False)
    monkeypatch.setattr(PartialCache, "assemble", assemble)
    resumed = pipeline.extract_features(make_plan(root, blocks=2, tta="flip"), store,
                                        progress=False)
    assert resumed.computed == 0
    assert_same_views(resumed.cache, reference)


def test_settings_carry_blocks_and_tta_to_shard_workers() -> None:
    import pickle

    from extract.settings import ExtractSettings
    from store.shards import ShardSpec

    settings = ExtractSettings(str(MINI), "mobilenet", str(WEIGHTS), 0.25, SIZE, blocks=3,
                               tta="flip")
    plan = pickle.loads(pickle.dumps(settings)).plan(ShardSpec(1, 2))
    assert (plan.blocks, plan.tta) == (3, "flip")
    assert plan.fingerprint == views_plan().fingerprint  # a shard has the full cache's


def test_the_checker_refuses_blocks_that_do_not_tile_the_columns(tmp_path: Path) -> None:
    from store.arrays import write_array_cache
    from store.check import layout_problems

    rng = np.random.default_rng(0)
    cache = write_array_cache(Store(tmp_path), "toy", ["a", "b"], {
        "train": ([f"t{i}" for i in range(4)], rng.integers(0, 2, 4), [rng.normal(size=(4, 5))]),
    }, block_rows=4)
    good = [{"name": "x", "start": 0, "stop": 2}, {"name": "y", "start": 2, "stop": 5}]
    with h5py.File(cache.path, "r") as handle:
        assert layout_problems(handle, cache.attributes.replace(blocks=good), 2)[0] == []
        for bad in ([{"name": "x", "start": 0, "stop": 2}], [{"name": "x", "start": 1, "stop": 5}],
                    [{"start": 0, "stop": 5}]):
            assert layout_problems(handle, cache.attributes.replace(blocks=bad), 2)[0] == [
                "has a blocks attribute that does not tile its 5 feature columns"]
        assert layout_problems(handle, cache.attributes.replace(tta="flip"), 2)[0] == [
            "has no train/mirrored"]
