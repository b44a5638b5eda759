"""--engine ray on a local Ray instance of two workers (offline; about a minute on 2 cores).

Slow by this suite's standards (Ray start-up, and TensorFlow imported in each worker): marked
`ray`; skip it with `-m "not ray"`. Skipped where Ray is not installed (`pip install -e '.[ray]'`).
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli import app
from store.store import Store
from tests.conftest import MINI_ARGS
from tests.test_shards import assert_same_cache

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    from extract.ray_engine import start_ray

    start_ray(local_cpus=2)
    yield
    ray.shutdown()


def test_ray_shards_retry_and_merge_to_one_extraction(local_ray, mini_store, shared_paths,
                                                      tmp_path) -> None:
    from extract.ray_engine import RayOptions, extract_on_ray
    from extract.settings import ExtractSettings

    settings = ExtractSettings(str(shared_paths["mini"]), "mobilenet", str(shared_paths["weights"]),
                               0.25, 64)
    marker = tmp_path / "shard-1-crashed-once"
    run = extract_on_ray(settings, Store(tmp_path / "s"),
                         RayOptions(shards=2, cpus_per_shard=1, retries=1),
                         progress=False, fail_once=(1, str(marker), 2))
    # shard 1's first worker died after writing 2 segments of 64 images; Ray ran it again, and
    # the retry computed only the rest of the shard
    assert marker.read_text() == "2"
    assert run.count == 2 and sorted(s["shard"] for s in run.shards) == ["0/2", "1/2"]
    assert not any("error" in s for s in run.shards)
    full = Store(mini_store).find_cache()
    total = sum(full.split_sizes.values()) + len(full.skipped)
    computed = {s["shard"]: s["computed"] for s in run.shards}
    assert computed["0/2"] + computed["1/2"] == total - 2 * 64, computed
    assert run.merge is not None and run.merge.shards == 2
    assert_same_cache(Store(tmp_path / "s").find_cache(), Store(mini_store).find_cache())

    # the command line, on the same (already running) instance, with progress shown
    result = CliRunner().invoke(app, ["extract", str(shared_paths["mini"]),
                                      *[a for a in MINI_ARGS if a != "--quiet"],
                                      "--store", str(tmp_path / "cli"), "--engine", "ray",
                                      "--shards", "2", "--cpus-per-shard", "1"])
    assert result.exit_code == 0, result.output
    assert "in 2 shards on Ray" in result.output and "Merged 2 shards" in result.output
    assert_same_cache(Store(tmp_path / "cli").find_cache(), Store(mini_store).find_cache())


def test_ray_user_error_in_a_task_is_one_sentence(local_ray, shared_paths, tmp_path) -> None:
    """The α=0.25 weights file does not fit α=0.5: found in the task, reported, not retried."""
    args = [a if a != "0.25" else "0.5" for a in MINI_ARGS]
    result = CliRunner().invoke(app, ["extract", str(shared_paths["mini"]), *args, "--store",
                                      str(tmp_path), "--engine", "ray", "--shards", "2",
                                      "--cpus-per-shard", "1"])
    assert result.exit_code == 1
    assert "Error: Shard 0/2: The weights file" in result.output
    assert "does not fit backbone mobilenet" in result.output
    assert not Store(tmp_path).caches()


def test_ray_shards_run_the_onnx_runtime(local_ray, mini_store, shared_paths, tmp_path) -> None:
    """--engine ray --runtime onnx: every shard runs the converted backbone (one file in the
    store, whichever shard converted it), and the merged cache is the onnx cache of the mini
    set: its runtime in the fingerprint, TensorFlow's features within float16 error."""
    import numpy as np

    pytest.importorskip("onnxruntime")
    store = tmp_path / "s"
    result = CliRunner().invoke(app, ["extract", str(shared_paths["mini"]), *MINI_ARGS,
                                      "--runtime", "onnx", "--store", str(store),
                                      "--engine", "ray", "--shards", "2",
                                      "--cpus-per-shard", "1"])
    assert result.exit_code == 0, result.output
    cache, tf = Store(store).find_cache(), Store(mini_store).find_cache()
    assert cache.inputs["runtime"] == "onnx" and cache.fingerprint != tf.fingerprint
    assert len(list((store / "runtimes").glob("*.onnx"))) == 1
    for split in ("train", "test"):
        assert list(cache.ids(split)) == list(tf.ids(split))
        # both float16: one float16 step apart at most where the last bits differ
        np.testing.assert_allclose(cache.features(split), tf.features(split), rtol=1e-3,
                                   atol=1e-3)
