"""--runtime onnx: the backbone converted once to ONNX, kept in the store, run on ONNX Runtime.

One onnx cache of cifar10-mini at 64 px (float32 features) is extracted in a subprocess (so the
test sees every byte written to stderr, TensorFlow's and the converter's C++ logs included) and
compared with the session's tf cache (`mini_store`, same settings, float16).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")

from tests.conftest import MINI, MINI_ARGS, ROOT  # noqa: E402
from tests.helpers import assert_clean_error, make_plan, run_cli  # noqa: E402


@pytest.fixture(scope="module")
def onnx_store(tmp_path_factory: pytest.TempPathFactory, shared_paths) -> Path:
    """A store with the onnx cache of the mini set and a logreg head fitted on it."""
    store = tmp_path_factory.mktemp("onnx-store")
    env = {**os.environ, "HEADSTART_STORE": str(store)}
    result = subprocess.run(
        [sys.executable, "cli.py", "extract", str(MINI), *MINI_ARGS, "--dtype", "float32",
         "--runtime", "onnx", "--store", str(store)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    # No TensorFlow, absl, oneDNN, tf2onnx or onnxruntime chatter reaches the user.
    chatter = [line for line in result.stderr.splitlines()
               if not line.startswith("Dataset ")]
    assert chatter == [], result.stderr
    fitted = run_cli("fit", "--head", "logreg", "--store", str(store))
    assert fitted.exit_code == 0, fitted.output
    return store


def _cache(store: Path):
    from store.store import Store

    return Store(store).find_cache()


def test_runtime_enters_the_fingerprint_only_when_not_tf() -> None:
    from extract.compute import ComputeOptions

    default = make_plan(MINI)
    tf = make_plan(MINI, compute=ComputeOptions(runtime="tf"))
    onnx = make_plan(MINI, compute=ComputeOptions(runtime="onnx"))
    assert "runtime" not in default.inputs and tf.inputs == default.inputs
    assert tf.fingerprint == default.fingerprint  # existing caches keep their fingerprints
    assert onnx.inputs["runtime"] == "onnx" and onnx.fingerprint != default.fingerprint


def test_settings_pass_the_runtime_and_onnx_refuses_gpu_options() -> None:
    from extract.compute import ComputeOptions
    from extract.settings import ExtractSettings
    from store.errors import HeadstartError

    assert ExtractSettings(str(MINI)).plan().compute.runtime == "tf"
    assert ExtractSettings(str(MINI), runtime="onnx").plan().compute.runtime == "onnx"
    for options in ({"precision": "mixed_float16"}, {"xla": True}, {"multi_gpu": True}):
        with pytest.raises(HeadstartError, match="--runtime onnx"):
            ComputeOptions(runtime="onnx", **options)
    with pytest.raises(HeadstartError, match="Unknown --runtime"):
        ComputeOptions(runtime="tensorrt")


def test_cli_runtime_choices_match_the_library() -> None:
    import cli
    from extract.compute import RUNTIMES

    assert tuple(e.value for e in cli.Runtime) == RUNTIMES


def test_the_converted_model_is_kept_in_the_store_and_reused(onnx_store: Path) -> None:
    from extract.onnx_runtime import converted_model, model_key
    from store.runtimes import runtimes_dir

    cache = _cache(onnx_store)
    assert cache.inputs["runtime"] == "onnx"
    (path,) = runtimes_dir(onnx_store).glob("*.onnx")
    assert path.name == f"{model_key(cache.inputs)}.onnx"
    assert not list(runtimes_dir(onnx_store).glob(".*"))  # no temporary file left
    before = path.stat().st_mtime_ns
    # The same backbone for another cache (another dtype): the file is found, not converted.
    again = converted_model(onnx_store, {**cache.inputs, "dtype": "float16"},
                            lambda: pytest.fail("converted again"), None)
    assert again == path and path.stat().st_mtime_ns == before
    # Another backbone setting or converter version is another key.
    assert model_key({**cache.inputs, "pooling": "max"}) != model_key(cache.inputs)
    # --blocks 2 is another graph: never the one-block file (whose key --blocks 1 keeps)
    assert "blocks" not in cache.inputs
    assert model_key({**cache.inputs, "blocks": 2}) != model_key(cache.inputs)
    assert model_key({**cache.inputs, "blocks": 1}) == model_key(cache.inputs)


def test_onnx_features_match_tf_features_and_logreg_answers(onnx_store: Path, mini_cache,
                                                            fitted_store) -> None:
    from classifiers.saved import load_saved_head
    from store.store import Store

    cache = _cache(onnx_store)
    assert cache.fingerprint != mini_cache.fingerprint
    for split in ("train", "test"):
        assert list(cache.ids(split)) == list(mini_cache.ids(split))
        onnx, tf = cache.features(split), mini_cache.features(split)
        # tf's are stored as float16: within half a float16 step of the float32 values
        np.testing.assert_allclose(onnx, tf, rtol=1e-3, atol=1e-3)
    # The tf cache's logreg head gives the same answers on the onnx features (>= 99.5 %).
    store = Store(fitted_store[0])
    estimator = load_saved_head(store, store.find_cache(), "logreg").estimator
    onnx_answers = estimator.predict(cache.features("test"))
    assert (onnx_answers == estimator.predict(mini_cache.features("test"))).mean() >= 0.995


def test_predict_on_an_onnx_cache_equals_the_head_on_cached_rows(onnx_store: Path) -> None:
    from endtoend.predict import open_predictor, predict_files
    from store.store import Store

    store = Store(onnx_store)
    cache = store.find_cache()
    model = open_predictor(store, cache, "logreg")
    assert model.runtime == "onnx" and model.describe()["runtime"] == "onnx"
    paths = [Path(cache.source["path"]) / i for i in cache.ids("test")[:60]]
    answers = list(predict_files(model, paths, top=1, batch_size=23))
    predicted = [model.class_names.index(a.top[0]["label"]) for a in answers]
    rows = cache.features("test")[:60]
    assert predicted == model.estimator.predict(rows).tolist()
    assert [a.top[0]["probability"] for a in answers] == pytest.approx(
        model.estimator.predict_proba(rows).max(axis=1).tolist(), abs=1e-5)


def test_a_head_answers_with_its_cache_runtime_only(onnx_store: Path, fitted_store) -> None:
    store_path = str(fitted_store[0])
    image = str(next(MINI.glob("test/*/*.jpg")))
    refused = run_cli("predict", image, "--head", "logreg", "--runtime", "onnx",
                      "--store", store_path)
    assert_clean_error(refused, "--runtime tf", "drop --runtime")
    refused = run_cli("predict", image, "--head", "logreg", "--runtime", "tf",
                      "--store", str(onnx_store))
    assert_clean_error(refused, "--runtime onnx", "drop --runtime")
    # The cache's own runtime, named or not, answers.
    for args in ((), ("--runtime", "onnx")):
        result = run_cli("predict", image, "--head", "logreg", "--format", "json", *args,
                         "--store", str(onnx_store))
        assert result.exit_code == 0, result.output


def test_export_onnx_float32_and_static_int8_in_the_export_table(onnx_store: Path,
                                                                  tmp_path: Path) -> None:
    import json

    result = run_cli("export", "--head", "logreg", "--format", "onnx", "--quantize", "int8",
                     "--out", str(tmp_path), "--store", str(onnx_store))
    assert result.exit_code == 0, result.output
    assert "onnx-float32" in result.output and "onnx-int8" in result.output
    summary = json.loads((tmp_path / "export.json").read_text())
    variants = {v["name"]: v for v in summary["variants"]}
    assert set(variants) == {"onnx-float32", "onnx-int8"}
    exact, int8 = variants["onnx-float32"], variants["onnx-int8"]
    assert exact["agreement"] == 1.0 and exact["max_abs_diff"] < 1e-4
    # int8 is measured, not promised: at 64 px this small backbone loses answers to int8
    assert int8["bytes"] < exact["bytes"] / 2 and int8["agreement"] >= 0.5
    assert int8["accuracy"] is not None and int8["seconds_per_image"] > 0
    assert "WARNING" not in result.output  # the quantizer's advice stays off the output


def test_an_interrupted_onnx_extraction_resumes_to_the_same_cache(
        onnx_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import extract.pipeline as pipeline
    import extract.plan as plan_module
    from extract.compute import ComputeOptions
    from store.runtimes import runtimes_dir
    from store.store import Store

    monkeypatch.setattr(plan_module, "MAX_SEGMENT_SIZE", 128)  # 2 batches per segment
    monkeypatch.setattr(plan_module, "SEGMENTS_PER_SPLIT", 1)
    store = tmp_path / "store"
    shutil.copytree(runtimes_dir(onnx_store), runtimes_dir(store))  # converted once, reused
    real, calls = pipeline.runtime_forward, []

    def interrupting(*args, **kwargs):
        forward = real(*args, **kwargs)

        def call(batch):
            calls.append(len(batch))
            if len(calls) > 4:  # the warm-up, then 3 batches: one segment finished
                raise KeyboardInterrupt
            return forward(batch)
        return call

    monkeypatch.setattr(pipeline, "runtime_forward", interrupting)
    result = run_cli("extract", str(MINI), *MINI_ARGS, "--dtype", "float32", "--runtime", "onnx",
                     "--store", str(store))
    assert result.exit_code == 130, result.output
    monkeypatch.setattr(pipeline, "runtime_forward", real)
    plan = make_plan(MINI, image_size=64, dtype="float32", compute=ComputeOptions(runtime="onnx"))
    resumed = pipeline.extract_features(plan, Store(store), progress=False)
    assert not resumed.reused and resumed.computed == 600 - 128
    reference = _cache(onnx_store)
    assert resumed.cache.fingerprint == reference.fingerprint
    for split in ("train", "test"):
        np.testing.assert_allclose(resumed.cache.features(split), reference.features(split),
                                   rtol=0, atol=1e-6)
    assert len(list(runtimes_dir(store).glob("*.onnx"))) == 1  # not converted again


def test_similar_on_an_onnx_cache_runs_its_onnx_forward_pass(
        onnx_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`similar` makes a new image's features as the cache was made: a cached training image
    is found first, at similarity ~1, by onnx features equal to its cached row."""
    import json

    import extract.forward as forward_module
    import extract.onnx_runtime as onnx_runtime

    real, made = onnx_runtime.onnx_forward_function, []

    def spying(*args, **kwargs):
        forward = real(*args, **kwargs)

        def call(batch):
            made.append(np.asarray(forward(batch)).reshape(len(batch), -1))
            return made[-1]
        return call

    monkeypatch.setattr(onnx_runtime, "onnx_forward_function", spying)
    monkeypatch.setattr(forward_module, "forward_function",
                        lambda *a, **k: pytest.fail("a tf forward pass for an onnx cache"))
    cache = _cache(onnx_store)
    row = 7
    sample_id = str(cache.ids("train")[row])
    image = Path(cache.source["path"]) / sample_id
    result = run_cli("similar", str(image), "--k", "2", "--json", "--store", str(onnx_store))
    assert result.exit_code == 0, result.output
    (answer,) = json.loads(result.stdout)
    assert answer["error"] is None and answer["similar"][0]["id"] == sample_id
    assert answer["similar"][0]["similarity"] > 0.999
    assert len(made) == 1
    np.testing.assert_allclose(made[0][0], cache.features("train")[row], rtol=0, atol=1e-3)


def _mini_batch(count: int = 64) -> np.ndarray:
    from PIL import Image

    paths = sorted(MINI.glob("train/*/*.jpg"))[:count]
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


@pytest.mark.parametrize("size", [64, 96, 128, 160, 224, 256, 480, 48, 75, 192])
def test_the_graph_enlarges_to_tensorflows_arrays_at_the_factors_it_is_handed(size: int) -> None:
    """The converted graph's resize (ONNX Resize, then rounding) gives the uint8 arrays
    TensorFlow's resize gives at every factor `enlarges_exactly` admits (2, 3, 4, 5, 7, 8, 15
    from 32 px, and a 16×32 crop), so a cache's image is the same array whichever path resized
    it; at the factors it refuses (1.5, 2.34, 6) the two differ, which is why."""
    from extract.backbones import get_backbone
    from extract.onnx_runtime import convert_function, enlarges_exactly, session

    preprocessing = get_backbone("mobilenet").preprocessing(size)
    runner = session(convert_function(preprocessing.enlarge_tensor, None))
    admitted = enlarges_exactly(32, 32, size)
    assert admitted == (size not in (48, 75, 192))
    batches = [_mini_batch()] + ([_mini_batch()[:, 8:24]] if size in (64, 128) else [])
    for batch in batches:
        enlarged = runner.run(None, {runner.get_inputs()[0].name: batch.astype(np.float32)})[0]
        expected = preprocessing.resize_batch(batch).astype(np.float32)
        assert expected.shape == (len(batch), size, size, 3)
        assert np.array_equal(enlarged, expected) == admitted


def test_which_enlargements_the_graph_is_handed() -> None:
    """Both factors powers of two (up to 16) or both odd (up to 15), a side of factor 1 with
    either; mixed kinds (3 and 2: a 32 x 48 crop to 96 px), larger and fractional factors not."""
    from extract.onnx_runtime import enlarges_exactly

    admitted = [(32, 32, 64), (16, 32, 128), (32, 32, 512), (32, 32, 480), (32, 96, 96),
                (32, 160, 160), (96, 96, 96), (12, 48, 48), (32, 96, 480)]
    refused = [(32, 48, 96), (16, 24, 48), (32, 20, 160), (32, 32, 1024), (32, 32, 544),
               (32, 32, 192), (32, 32, 48), (64, 64, 32), (32, 30, 64), (0, 32, 64)]
    assert all(enlarges_exactly(*case) for case in admitted)
    assert not any(enlarges_exactly(*case) for case in refused)


def test_a_converted_graph_onnx_runtime_cannot_load_is_one_sentence_and_not_kept(
        onnx_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import extract.onnx_runtime as onnx_runtime
    from extract.rebuild import cache_feature_model, cache_weights
    from extract.preprocessing import Preprocessing
    from store.errors import HeadstartError
    from store.runtimes import runtimes_dir

    cache = _cache(onnx_store)

    def refuses(model, threads=None):
        raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an "
                           "implementation for Frobnicate(1) node\nmore")

    monkeypatch.setattr(onnx_runtime, "session", refuses)
    with pytest.raises(HeadstartError, match=r"ONNX Runtime cannot run backbone mobilenet as "
                                             r"converted \(.*Frobnicate.*\); use --runtime tf\.$"):
        onnx_runtime.converted_model(tmp_path, cache.inputs,
                                     cache_feature_model(cache, cache_weights(cache)),
                                     Preprocessing.from_dict(cache.preprocessing))
    assert not runtimes_dir(tmp_path).exists() or not list(runtimes_dir(tmp_path).iterdir())


def test_small_batches_cross_as_they_are_and_larger_ones_are_resized_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from extract.backbones import get_backbone
    from extract.onnx_runtime import onnx_forward_function

    preprocessing = get_backbone("mobilenet").preprocessing(48)
    seen: list[tuple[int, ...]] = []

    class Runner:  # what the forward function hands the session
        def get_inputs(self):
            return [type("Input", (), {"name": "images"})()]

        def run(self, _, feed):
            seen.append(feed["images"].shape)
            return [np.zeros((len(feed["images"]), 4), np.float32)]

    forward = onnx_forward_function(Runner(), preprocessing)
    for shape in ((2, 24, 24, 3), (2, 48, 48, 3), (2, 12, 48, 3), (2, 60, 40, 3),
                  (2, 32, 32, 3), (2, 8, 8, 3), (2, 16, 24, 3)):
        forward(np.zeros(shape, np.uint8))
    # whole factors 2, 1, 4 x 1: to the graph as they are; larger images (TensorFlow's
    # antialiased resize), factors 1.5 and 6, and 3 x 2: resized first
    assert seen == [(2, 24, 24, 3), (2, 48, 48, 3), (2, 12, 48, 3), (2, 48, 48, 3),
                    (2, 48, 48, 3), (2, 48, 48, 3), (2, 48, 48, 3)]
    bicubic = get_backbone("mobilenet").preprocessing(48, interpolation="bicubic")
    seen.clear()
    onnx_forward_function(Runner(), bicubic)(np.zeros((2, 32, 32, 3), np.uint8))
    assert seen == [(2, 48, 48, 3)]  # no bicubic resize in the graph: resized first


def test_throughput_mode_runs_slices_at_once_and_keeps_their_order() -> None:
    """threads=2 (the extraction pass): two slices per thread, run concurrently on the same
    session, features back in row order; a single image is never split."""
    import threading

    from extract.backbones import get_backbone
    from extract.onnx_runtime import onnx_forward_function

    preprocessing = get_backbone("mobilenet").preprocessing(32)
    seen: list[int] = []
    inside, most = [0], [0]
    lock, gate = threading.Lock(), threading.Barrier(2, timeout=10)

    class Runner:
        def get_inputs(self):
            return [type("Input", (), {"name": "images"})()]

        def run(self, _, feed):
            images = feed["images"]
            with lock:
                seen.append(len(images))
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            if len(images) > 1:
                gate.wait()  # returns only once a second slice is running beside this one
            with lock:
                inside[0] -= 1
            return [images.reshape(len(images), -1)[:, :1].astype(np.float32)]

    forward = onnx_forward_function(Runner(), preprocessing, threads=2)
    batch = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1) * np.ones((1, 32, 32, 3), np.uint8)
    np.testing.assert_array_equal(forward(batch)[:, 0], np.arange(10))
    assert sorted(seen) == [2, 2, 3, 3] and most[0] == 2
    seen.clear()
    np.testing.assert_array_equal(forward(batch[3:4])[:, 0], [3])
    assert seen == [1]


def test_test_time_views_on_onnx(onnx_store: Path, tmp_path: Path) -> None:
    """--tta flip --runtime onnx: the original view is the one-view onnx cache's, bit for bit;
    the mirrored view is TensorFlow's mirrored view (within float error); a head fitted with
    the views answers in predict as on its cached rows, both views averaged."""
    import shutil

    from endtoend.predict import open_predictor, predict_files
    from extract.forward import forward_function
    from extract.rebuild import cache_feature_model, cache_weights
    from store.runtimes import runtimes_dir
    from store.store import Store

    store = tmp_path / "store"
    shutil.copytree(runtimes_dir(onnx_store), runtimes_dir(store))  # the one-view graph
    result = run_cli("extract", str(MINI), *MINI_ARGS, "--dtype", "float32", "--runtime", "onnx",
                     "--tta", "flip", "--store", str(store))
    assert result.exit_code == 0, result.output
    assert len(list(runtimes_dir(store).glob("*.onnx"))) == 2  # the mirrored graph added
    cache, single = Store(store).find_cache(), _cache(onnx_store)
    assert cache.fingerprint != single.fingerprint
    for split in ("train", "test"):
        np.testing.assert_array_equal(cache.features(split), single.features(split))
    mirrored = cache.features("test", mirrored=True)
    assert np.abs(mirrored - cache.features("test")).max() > 0.01  # another view indeed
    # TensorFlow's mirrored view of the first test images
    from extract.preprocessing import Preprocessing

    preprocessing = Preprocessing.from_dict(cache.preprocessing)
    ids = list(cache.ids("test")[:32])
    batch = preprocessing.stack([preprocessing.decode_file(Path(cache.source["path"]) / i)
                                 for i in ids])
    tf_mirrored = forward_function(cache_feature_model(cache, cache_weights(cache)), preprocessing,
                                   mirror=True)(batch)
    np.testing.assert_allclose(mirrored[:32], tf_mirrored, rtol=0, atol=1e-3)

    fitted = run_cli("fit", "--head", "logreg", "--store", str(store))
    assert fitted.exit_code == 0, fitted.output
    model = open_predictor(Store(store), cache, "logreg")
    assert model.views and model.decoded
    paths = [Path(cache.source["path"]) / i for i in ids]
    answers = list(predict_files(model, paths, top=1, batch_size=10))
    head = model.head
    expected = head.feature_proba({cache.fingerprint: cache.features("test")[:32]},
                                  {cache.fingerprint: mirrored[:32]})
    assert [a.top[0]["probability"] for a in answers] == pytest.approx(
        np.asarray(expected).max(axis=1).tolist(), abs=1e-5)


def test_serve_on_an_onnx_cache_answers_uploads_as_the_cached_rows(onnx_store: Path) -> None:
    """serve hands the onnx graph the upload as decoded (32 px here: the graph enlarges it);
    queued uploads of other sizes are batched at the input size. Either way, a cached image's
    answer is the head's on its cached row."""
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from endtoend.predict import open_predictor
    from service.app import ServiceSettings, create_app
    from store.store import Store

    store = Store(onnx_store)
    cache = store.find_cache()
    model = open_predictor(store, cache, "logreg")
    path = Path(cache.source["path"]) / cache.ids("test")[3]
    assert model.load_bytes(path.read_bytes()).shape == (32, 32, 3)  # not resized first
    expected = model.estimator.predict_proba(cache.features("test")[3:4])[0]
    with TestClient(create_app(model, ServiceSettings())) as client:
        answer = client.post("/predict?top=10", content=path.read_bytes(),
                             headers={"Content-Type": "image/jpeg"})
        assert answer.status_code == 200, answer.text
    got = {row["label"]: row["probability"] for row in answer.json()["predictions"]}
    assert [got[name] for name in model.class_names] == pytest.approx(expected.tolist(), abs=1e-5)
    # a batch of a 32 px and a 40 px image: both at the input size, the same answers
    larger = io.BytesIO()
    Image.open(path).resize((40, 40)).save(larger, format="PNG")
    images = [model.load_bytes(path.read_bytes()), model.load_bytes(larger.getvalue())]
    assert images[1].shape == (64, 64, 3)  # 40 to 64 px is no whole factor: resized at load
    batch = model.stack(images)
    assert batch.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(model.proba(batch)[0], expected, rtol=0, atol=1e-5)


def test_a_damaged_converted_file_is_converted_again_once(onnx_store: Path,
                                                          tmp_path: Path) -> None:
    import shutil

    from extract.onnx_runtime import converted_session, onnx_forward_function
    from extract.preprocessing import Preprocessing
    from extract.rebuild import cache_feature_model, cache_weights
    from store.runtimes import runtimes_dir

    store = tmp_path / "store"
    shutil.copytree(runtimes_dir(onnx_store), runtimes_dir(store))
    (path,) = runtimes_dir(store).glob("*.onnx")
    path.write_bytes(b"not an onnx model")
    cache = _cache(onnx_store)
    preprocessing = Preprocessing.from_dict(cache.preprocessing)
    runner = converted_session(store, cache.inputs,
                               lambda: cache_feature_model(cache, cache_weights(cache)),
                               preprocessing)
    assert path.read_bytes() != b"not an onnx model"  # converted and written again
    ids = cache.ids("train")[:4]
    batch = preprocessing.stack([preprocessing.decode_file(Path(cache.source["path"]) / i)
                                 for i in ids])
    features = onnx_forward_function(runner, preprocessing)(batch)
    np.testing.assert_allclose(features, cache.features("train")[:4], rtol=0, atol=1e-5)
    again = converted_session(store, cache.inputs, lambda: pytest.fail("converted again"),
                              preprocessing)  # the file written is the one loaded next time
    assert again.get_inputs()[0].name == runner.get_inputs()[0].name
