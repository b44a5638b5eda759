"""Extraction: bad files, interruption (Ctrl-C and kill -9) and resume, unfinished caches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import extract.pipeline as pipeline
import extract.plan as plan_module
from tests.conftest import MINI, MINI_ARGS, ROOT
from tests.helpers import assert_clean_error, make_folder, make_plan, mini_files, run_cli
from store.cache import FeatureCache
from store.errors import HeadstartError
from store.store import Store


class CountingForward:
    """Wraps the backbone's forward function: counts batches (after the one warm-up call the
    pipeline makes), and can raise KeyboardInterrupt after some."""

    def __init__(self, forward: Any, interrupt_after: int | None = None) -> None:
        self.forward = forward
        self.interrupt_after = interrupt_after
        self.warmed_up = False
        self.batches = 0
        self.images = 0

    def __call__(self, batch: np.ndarray) -> Any:
        if not self.warmed_up:
            self.warmed_up = True
            return self.forward(batch)
        if self.interrupt_after is not None and self.batches >= self.interrupt_after:
            raise KeyboardInterrupt
        self.batches += 1
        self.images += len(batch)
        return self.forward(batch)


@pytest.fixture()
def counting(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install CountingForward around the pipeline's forward function; returns a function to
    set it up."""
    real = pipeline.runtime_forward
    built: list[CountingForward] = []

    def install(interrupt_after: int | None = None) -> list[CountingForward]:
        def make(*args: Any, **kwargs: Any) -> CountingForward:
            built.append(CountingForward(real(*args, **kwargs), interrupt_after))
            return built[-1]
        monkeypatch.setattr(pipeline, "runtime_forward", make)
        return built
    return install


def assert_same_cache(cache: FeatureCache, reference: FeatureCache, exact: bool = True) -> None:
    assert cache.fingerprint == reference.fingerprint
    assert cache.class_names == reference.class_names
    assert cache.split_sizes == reference.split_sizes
    assert cache.skipped == reference.skipped
    for split in ("train", "test"):
        np.testing.assert_array_equal(cache.ids(split), reference.ids(split))
        np.testing.assert_array_equal(cache.labels(split), reference.labels(split))
        if exact:
            np.testing.assert_array_equal(cache.features(split), reference.features(split))
        else:
            np.testing.assert_allclose(cache.features(split), reference.features(split),
                                       rtol=1e-2, atol=1e-2)


def segment_files(store: Path) -> list[Path]:
    """Finished segment files (not the hidden temporary file of one being written)."""
    return sorted(p for p in store.glob("caches/*.partial/*-*.npz") if not p.name.startswith("."))


def test_ctrl_c_then_resume_recomputes_only_unfinished_segments(
        tmp_path: Path, mini_cache: FeatureCache, counting: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # 128-row segments of two 64-image batches: train 128+128+128+16, test 128+72
    monkeypatch.setattr(plan_module, "MAX_SEGMENT_SIZE", 128)
    monkeypatch.setattr(plan_module, "SEGMENTS_PER_SPLIT", 1)
    store = tmp_path / "store"
    built = counting(interrupt_after=3)  # the 4th batch is interrupted: 1 segment is finished
    result = run_cli("extract", str(MINI), *MINI_ARGS, "--store", str(store))
    assert result.exit_code == 130, result.output
    assert "Interrupted" in result.output and "run the same command again" in result.output
    assert "Traceback" not in result.output
    assert [p.name for p in segment_files(store)] == ["train-000000.npz"]

    # the unfinished cache is not a cache: not listed, not used, not reused
    the_store = Store(store)
    assert the_store.caches() == [] and len(the_store.unfinished()) == 1
    listing = json.loads(run_cli("list", "--json", "--store", str(store)).output)
    assert listing["caches"] == [] and len(listing["unfinished"]) == 1
    assert_clean_error(run_cli("fit", "--head", "logreg", "--store", str(store)),
                       "No finished cache")

    built = counting()
    resumed = pipeline.extract_features(make_plan(MINI, image_size=64), the_store,
                                        progress=False)
    assert not resumed.reused
    assert resumed.computed == 600 - 128 and built[-1].images == 600 - 128
    assert built[-1].batches == 11 - 2  # 7 train + 4 test batches, less segment 0's two
    assert the_store.unfinished() == [] and segment_files(store) == []
    assert_same_cache(resumed.cache, mini_cache)


def test_kill_9_then_resume_equals_an_uninterrupted_run(
        tmp_path: Path, mini_cache: FeatureCache, counting: Any) -> None:
    store = tmp_path / "store"
    # A real process, slowed down and with one-batch segments, killed once 3 segments exist.
    script = (
        "import sys, time\n"
        "import extract.pipeline as p\n"
        "import extract.plan\n"
        "extract.plan.MAX_SEGMENT_SIZE = 64\n"
        "real = p.runtime_forward\n"
        "def slow(*a, **k):\n"
        "    f = real(*a, **k)\n"
        "    return lambda b: (time.sleep(0.3), f(b))[1]\n"
        "p.runtime_forward = slow\n"
        "from cli import app\n"
        "app()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, "extract", str(MINI), *MINI_ARGS, "--store", str(store)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180
        while len(segment_files(store)) < 3:
            assert process.poll() is None, process.stderr.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no segments were written"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    the_store = Store(store)
    assert the_store.caches() == []  # never mistaken for a finished cache
    done = len(segment_files(store))
    assert 3 <= done < 11

    built = counting()
    resumed = pipeline.extract_features(make_plan(MINI, image_size=64), the_store,
                                        progress=False)
    assert resumed.computed == built[-1].images == 600 - 64 * done
    assert built[-1].batches == 11 - done
    assert_same_cache(resumed.cache, mini_cache)
    assert sorted(p.name for p in (store / "caches").iterdir() if p.suffix != ".lock") == [
        resumed.cache.path.name]


def test_resume_with_another_batch_size_redoes_only_missing_or_damaged_segments(
        tmp_path: Path, counting: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The segment size is fixed by the interrupted run; a new --batch-size only regroups;
    a damaged segment file is computed again."""
    root = make_folder(tmp_path / "d", {"cat": 8, "dog": 8, "ship": 8})
    reference = pipeline.extract_features(make_plan(root), Store(tmp_path / "ref"),
                                          progress=False).cache
    store = Store(tmp_path / "store")
    monkeypatch.setattr(plan_module, "MAX_SEGMENT_SIZE", 4)
    counting(interrupt_after=2)
    with pytest.raises(KeyboardInterrupt):
        pipeline.extract_features(make_plan(root, batch_size=4), store, progress=False)
    first, second = segment_files(tmp_path / "store")
    second.write_bytes(second.read_bytes()[:200])  # e.g. a disk error
    monkeypatch.setattr(plan_module, "MAX_SEGMENT_SIZE", 2048)
    built = counting()
    resumed = pipeline.extract_features(make_plan(root, batch_size=3), store, progress=False)
    assert resumed.computed == built[-1].images == 24 - 4
    assert_same_cache(resumed.cache, reference, exact=False)


def _odd_dataset(root: Path) -> Path:
    """train/test folders of real JPEGs, odd but good formats, and broken files."""
    make_folder(root, {"cat": 4, "dog": 4}, split="train")
    make_folder(root, {"cat": 2, "dog": 2}, split="test")
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    photo = Image.open(mini_files("train", "cat", 1)[0])
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(cat / "alpha.png")
    photo.convert("L").save(cat / "grey.jpg")
    deep = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(deep).save(cat / "deep.png")
    photo.convert("P").save(dog / "palette.gif")
    photo.resize((300, 200)).save(dog / "large.bmp")
    jpeg = mini_files("train", "dog", 1)[0].read_bytes()
    (cat / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (cat / "empty.jpg").write_bytes(b"")
    (dog / "text.jpg").write_text("this is not a picture")
    (root / "test" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return root


EXPECTED_SKIPS = {
    ("train", "train/cat/truncated.jpg"): "truncated",
    ("train", "train/cat/empty.jpg"): "empty file",
    ("train", "train/dog/text.jpg"): "not an image",
    ("test", "test/dog/broken.png"): "",
}


def test_bad_files_are_skipped_and_reported(tmp_path: Path) -> None:
    root = _odd_dataset(tmp_path / "odd")
    store = Store(tmp_path / "store")
    result = pipeline.extract_features(make_plan(root), store, progress=False)
    assert not result.reused
    assert result.computed == 9 + 7 + 5  # every listed file was tried once
    reasons = {(s["split"], s["id"]): s["reason"] for s in result.skipped}
    assert set(reasons) == set(EXPECTED_SKIPS)
    for key, fragment in EXPECTED_SKIPS.items():
        assert fragment in reasons[key] and reasons[key]
    cache = FeatureCache(result.cache.path)
    assert cache.skipped_count == len(EXPECTED_SKIPS)
    assert cache.split_sizes == {"train": 16 - 3, "test": 5 - 1}
    train_ids = list(cache.ids("train"))
    assert {"train/cat/alpha.png", "train/cat/grey.jpg", "train/cat/deep.png",
            "train/dog/palette.gif", "train/dog/large.bmp"} <= set(train_ids)
    assert not {i for _, i in EXPECTED_SKIPS} & set(train_ids + list(cache.ids("test")))
    for split in ("train", "test"):
        names = [cache.class_names[label] for label in cache.labels(split)]
        assert names == [i.split("/")[1] for i in cache.ids(split)]
    assert np.isfinite(cache.features("train")).all()

    # the CLI reports them too, also when the cache is reused
    output = run_cli("extract", str(root), *MINI_ARGS[:-3], "--image-size", "32", "--quiet",
                     "--store", str(store.root)).output
    assert "Reused cache" in output and "Skipped 4 unusable files" in output
    assert "  train/cat/empty.jpg (train): empty file (0 bytes)" in output.splitlines()


@pytest.mark.parametrize("case, fragment", [
    ("missing", "no such folder"),
    ("empty dataset", "holds no class folders"),
    ("empty class", "holds no image files"),
])
def test_unusable_datasets_fail_before_any_work(tmp_path: Path, case: str, fragment: str,
                                               counting: Any) -> None:
    root = tmp_path / "data"
    if case == "empty dataset":
        root.mkdir()
    elif case == "empty class":
        make_folder(root, {"cat": 2}, split="train")
        make_folder(root, {"cat": 2}, split="test")
        (root / "train" / "dog").mkdir()
    built = counting()
    result = run_cli("extract", str(root), *MINI_ARGS, "--store", str(tmp_path / "store"))
    assert_clean_error(result, fragment)
    assert built == [] and not (tmp_path / "store").exists()


def test_a_model_that_cannot_be_built_leaves_no_unfinished_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flatten at a size whose feature map is too wide is refused; nothing is left behind."""
    import extract.backbones

    store = Store(tmp_path / "store")
    root = make_folder(tmp_path / "d", {"cat": 3, "dog": 3})
    monkeypatch.setattr(extract.backbones, "MAX_FLATTEN_WIDTH", 100)
    with pytest.raises(HeadstartError, match="Flatten pooling of mobilenet at 32px gives 256"):
        pipeline.extract_features(make_plan(root, pooling="flatten"), store, progress=False)
    assert store.unfinished() == [] and store.caches() == []


def test_flatten_keeps_the_whole_feature_map(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"cat": 3, "dog": 3})
    result = pipeline.extract_features(make_plan(root, pooling="flatten", image_size=64,
                                                 dtype="float32"), Store(tmp_path / "s"),
                                       progress=False)
    assert result.cache.width == 2 * 2 * 256 and result.cache.dtype == "float32"


def test_a_keras_builtin_dataset_is_extracted_from_its_arrays(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mnist-like grey arrays (as keras.datasets returns them) become a three-channel cache."""
    import keras

    rng = np.random.default_rng(0)

    def load_data() -> tuple:
        return ((rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), np.arange(12) % 10),
                (rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.arange(5)))

    monkeypatch.setattr(keras.datasets.mnist, "load_data", load_data)
    result = run_cli("extract", "mnist", *MINI_ARGS[:-3], "--image-size", "32", "--quiet",
                     "--store", str(tmp_path / "store"))
    assert result.exit_code == 0, result.output
    assert "Dataset mnist: 10 classes, 12 train, 5 test images." in result.output
    (cache,) = Store(tmp_path / "store").caches()
    assert cache.class_names == [str(d) for d in range(10)]
    assert cache.split_sizes == {"train": 12, "test": 5}
    assert cache.ids("test").tolist() == [f"test/{i:06d}" for i in range(5)]
    assert cache.labels("train").tolist() == (np.arange(12) % 10).tolist()
    assert cache.inputs["dataset"]["source"] == {"kind": "keras", "name": "mnist"}


def test_ctrl_c_on_a_small_dataset_keeps_finished_segments_and_says_so(
        tmp_path: Path, counting: Any) -> None:
    """With default segment sizes the mini set is cut into 64-row segments (1/8 of its
    400 training rows, in whole batches), so an interruption keeps what was finished."""
    plan = make_plan(MINI, image_size=128)
    assert plan.segment_size == 64
    store = tmp_path / "store"
    counting(interrupt_after=3)
    result = run_cli("extract", str(MINI), *MINI_ARGS[:-3], "--image-size", "128", "--quiet",
                     "--store", str(store))
    assert result.exit_code == 130, result.output
    assert f"Kept 192 of 600 images in finished segments of cache {plan.fingerprint[:12]}" \
        in result.output
    assert len(segment_files(store)) == 3
    counting(interrupt_after=0)
    first = run_cli("extract", str(MINI), *MINI_ARGS[:-3], "--image-size", "40", "--quiet",
                    "--store", str(store))
    assert first.exit_code == 130 and "nothing was kept" in first.output
