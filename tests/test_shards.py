"""Sharded extraction and merge: shards + merge equal one extraction; bad sets get one sentence."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from store.cache import FeatureCache
from store.errors import HeadstartError
from store.shards import ShardSelection, ShardSpec, merge_shards
from store.store import Store
from tests.conftest import MINI_ARGS, ROOT

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [*args])


def shard_path(store: Path, fingerprint: str, index: int, count: int) -> Path:
    return store / "caches" / f"{fingerprint}.{ShardSpec(index, count).suffix}.h5"


@pytest.fixture(scope="module")
def shard_store(tmp_path_factory, shared_paths) -> Path:
    """A store holding shards 0/2 and 1/2 of the mini set (the same settings as mini_store)."""
    store = tmp_path_factory.mktemp("shards")
    for index in (0, 1):
        result = invoke("extract", str(shared_paths["mini"]), *MINI_ARGS, "--store", str(store),
                        "--shard", f"{index}/2")
        assert result.exit_code == 0, result.output
        assert f"Shard {index}/2 written" in result.output
    return store


@pytest.fixture
def fingerprint(mini_store) -> str:
    return Store(mini_store).find_cache().fingerprint


def copy_store(source: Path, target: Path, *keep: str) -> Path:
    """A store with copies of the shard files whose names contain one of `keep` (all without)."""
    (target / "caches").mkdir(parents=True)
    for path in (source / "caches").glob("*.shard-*.h5"):
        if not keep or any(k in path.name for k in keep):
            shutil.copy(path, target / "caches" / path.name)
    return target


def assert_same_cache(a: FeatureCache, b: FeatureCache) -> None:
    assert a.fingerprint == b.fingerprint and a.class_names == b.class_names
    assert a.split_sizes == b.split_sizes and a.skipped == b.skipped
    for split in a.split_sizes:
        assert np.array_equal(a.ids(split), b.ids(split))
        assert np.array_equal(a.labels(split), b.labels(split))
        assert np.array_equal(a.features(split), b.features(split))


def test_shards_and_merge_equal_one_extraction(mini_store, shard_store, fingerprint, tmp_path,
                                               shared_paths) -> None:
    store = copy_store(shard_store, tmp_path / "s")
    listed = json.loads(invoke("list", "--store", str(store), "--json").output)
    assert listed["caches"] == []
    assert listed["shards"][0]["fingerprint"] == fingerprint  # the FULL cache's fingerprint
    assert listed["shards"][0]["finished"] == [0, 1] and listed["shards"][0]["missing"] == []
    refused = invoke("fit", "--head", "logreg", "--store", str(store))
    assert refused.exit_code == 1 and "merge" in refused.output  # a shard is never a cache

    result = invoke("merge", "--store", str(store))
    assert result.exit_code == 0, result.output
    assert "Merged 2 shards" in result.output
    merged = Store(store).find_cache()
    assert merged.kind == "features" and merged.shard is None
    assert_same_cache(merged, Store(mini_store).find_cache())
    assert not list((store / "caches").glob("*.shard-*"))  # shards removed after the merge

    again = invoke("extract", str(shared_paths["mini"]), *MINI_ARGS, "--store", str(store))
    assert again.exit_code == 0 and "Reused cache" in again.output
    shard_again = invoke("extract", str(shared_paths["mini"]), *MINI_ARGS, "--store", str(store),
                         "--shard", "1/2")
    assert shard_again.exit_code == 0 and "Reused cache" in shard_again.output
    fitted = invoke("fit", "--head", "logreg", "--store", str(store))
    assert fitted.exit_code == 0, fitted.output


def test_shards_follow_sample_ids_and_stay_put_when_files_are_added() -> None:
    ids = [f"cat/{i:05d}.jpg" for i in range(2000)]
    parts = [ShardSelection.select(ShardSpec(i, 4), {"train": ids}).rows["train"] for i in range(4)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(2000))  # each sample once
    assert min(len(p) for p in parts) > 400  # roughly even
    grown = ids + [f"cat/new-{i}.jpg" for i in range(300)]
    for i, part in enumerate(parts):
        again = ShardSelection.select(ShardSpec(i, 4), {"train": grown}).rows["train"]
        assert set(part.tolist()) <= set(again.tolist())


@pytest.mark.parametrize("text", ["2/2", "-1/2", "1", "a/b", "0/0"])
def test_bad_shard_spec_is_one_sentence(text: str, shared_paths, tmp_path) -> None:
    result = invoke("extract", str(shared_paths["mini"]), *MINI_ARGS, "--store", str(tmp_path),
                    "--shard", text)
    assert result.exit_code != 0
    assert "--shard" in result.output


def test_missing_shard_is_named(shard_store, fingerprint, tmp_path) -> None:
    store = copy_store(shard_store, tmp_path / "s", ".shard-0000-")
    (store / "caches" / f"{fingerprint}.{ShardSpec(1, 2).suffix}.partial").mkdir()
    result = invoke("merge", "--store", str(store))
    assert result.exit_code == 1
    assert "1 of 2 shards not finished (1/2); 1/2 started: rerun the same extract --shard i/2 " \
        "to resume" in result.output
    assert not Store(store).caches()


def _rewrite(path: Path, target: Path, **attrs) -> None:
    shutil.copy(path, target)
    with h5py.File(target, "r+") as handle:
        info = json.loads(handle.attrs["shard"])
        info.update({k: v for k, v in attrs.items() if k != "fingerprint"})
        handle.attrs["shard"] = json.dumps(info)
        if "fingerprint" in attrs:
            handle.attrs["fingerprint"] = attrs["fingerprint"]


def test_mismatched_shards_are_named(shard_store, fingerprint, tmp_path) -> None:
    one = shard_path(shard_store, fingerprint, 1, 2)
    zero = shard_path(shard_store, fingerprint, 0, 2)

    counts = copy_store(shard_store, tmp_path / "counts", ".shard-0000-")
    _rewrite(one, shard_path(counts, fingerprint, 1, 3), count=3)
    result = invoke("merge", "--store", str(counts))
    assert result.exit_code == 1
    assert "disagree on the number of shards (0/2 cut it into 2; 1/3 cut it into 3)" in result.output

    renamed = copy_store(shard_store, tmp_path / "renamed", ".shard-0000-")
    shutil.copy(zero, shard_path(renamed, fingerprint, 1, 2))
    result = invoke("merge", "--store", str(renamed))
    assert result.exit_code == 1
    assert f"{fingerprint}.shard-0001-of-0002.h5 says it is shard 0/2" in result.output

    doubled = copy_store(shard_store, tmp_path / "doubled", ".shard-0000-")
    _rewrite(zero, shard_path(doubled, fingerprint, 1, 2), index=1)
    result = invoke("merge", "--store", str(doubled))
    assert result.exit_code == 1
    assert "Shards 0/2 and 1/2 both hold train sample" in result.output

    other = "f" * 64
    mixed = copy_store(shard_store, tmp_path / "mixed", ".shard-0000-")
    _rewrite(one, shard_path(mixed, other, 1, 2), fingerprint=other)
    name = FeatureCache(zero).name
    with pytest.raises(HeadstartError) as error:
        merge_shards(Store(mixed), name)
    text = str(error.value)
    assert "not finished (1/2)" in text and "not finished (0/2)" in text
    assert f"another fingerprint ({other[:12]}: 1/2)" in text
    assert "other images or settings" in text


def test_interrupted_shard_resumes(mini_store, shared_paths, tmp_path, monkeypatch) -> None:
    from extract import pipeline
    from extract.settings import ExtractSettings
    from store.partial import PartialCache

    from extract import plan as plan_module

    monkeypatch.setattr(plan_module, "SEGMENTS_PER_SPLIT", 1)  # one segment per split
    settings = ExtractSettings(str(shared_paths["mini"]), "mobilenet", str(shared_paths["weights"]),
                               0.25, 64)
    plan = settings.plan(ShardSpec(2, 3))
    store = Store(tmp_path)
    calls = {"n": 0}
    write = PartialCache.write_segment

    def dies_on_second(self, split, index, segment):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        write(self, split, index, segment)

    monkeypatch.setattr(PartialCache, "write_segment", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        pipeline.extract_features(plan, store, progress=False)
    assert store.partial_dir(plan.storage_key).is_dir()
    assert not store.cache_path(plan.storage_key).exists()
    monkeypatch.setattr(PartialCache, "write_segment", write)
    result = pipeline.extract_features(plan, store, progress=False)
    assert result.computed == len(plan.dataset.splits["test"])  # only the unfinished segment
    shard = result.cache
    assert shard.kind == "shard" and shard.shard["index"] == 2 and shard.shard["count"] == 3
    full = Store(mini_store).find_cache()
    for split in ("train", "test"):
        position = {sample_id: i for i, sample_id in enumerate(full.ids(split))}
        rows = [position[i] for i in shard.ids(split)]
        assert np.array_equal(shard.features(split), full.features(split, np.asarray(rows)))
        assert np.array_equal(shard.labels(split), full.labels(split)[rows])


def test_distribute_is_a_no_op_with_one_device() -> None:
    from extract.compute import ComputeOptions

    assert ComputeOptions(multi_gpu=True).strategy() is None  # no GPU here: plain forward pass


def test_distributed_batches_are_split_across_replicas_in_order() -> None:
    """Two logical CPU devices stand in for two GPUs (a fresh process: devices are set once)."""
    script = ROOT / "tests" / "distribute_check.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["replicas"] == 2, measured
    assert measured["shape"] == measured["expected_shape"] == [7, 256], measured
    assert measured["feature_spread"] > 0.1, measured  # real features, not zeros
    # every row equals its own image's features and is far from every other image's
    assert measured["max_diff"] <= 1e-5, measured
    assert measured["nearest_other_row"] > 100 * max(measured["max_diff"], 1e-6), measured
