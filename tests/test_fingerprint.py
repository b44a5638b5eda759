"""The cache fingerprint: what changes it, what does not, and reuse without a backbone pass."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import MINI_ARGS, WEIGHTS
from extract.backbones import Weights
from tests.helpers import make_folder, make_plan, run_cli, snapshot
from store.store import Store

PER_CLASS = {"cat": 6, "dog": 6, "ship": 6}


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "pets", PER_CLASS)


def _first_image(folder: Path) -> Path:
    return sorted((folder / "cat").glob("*.jpg"))[0]


def test_same_inputs_same_fingerprint(folder: Path) -> None:
    assert make_plan(folder).fingerprint == make_plan(folder).fingerprint


def test_times_batch_size_workers_and_location_do_not_change_it(folder: Path, tmp_path: Path
                                                                ) -> None:
    reference = make_plan(folder).fingerprint
    image = _first_image(folder)
    os.utime(image, (1_000_000, 1_000_000))
    assert make_plan(folder).fingerprint == reference
    assert make_plan(folder, batch_size=7, workers=1).fingerprint == reference
    moved = shutil.copytree(folder, tmp_path / "elsewhere" / "pets")
    assert make_plan(moved).fingerprint == reference


def _changed_contents(folder: Path) -> str:
    image = _first_image(folder)
    other = sorted((folder / "dog").glob("*.jpg"))[0]
    image.write_bytes(other.read_bytes())  # same name and label, other pixels
    return make_plan(folder).fingerprint


def _changed_label(folder: Path) -> str:
    image = _first_image(folder)
    image.rename(folder / "dog" / f"moved-{image.name}")
    return make_plan(folder).fingerprint


def _renamed_class(folder: Path) -> str:
    (folder / "ship").rename(folder / "boat")
    return make_plan(folder).fingerprint


def _changed_weights(folder: Path) -> str:
    copy = folder.parent / "weights.h5"
    data = bytearray(WEIGHTS.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    return make_plan(folder, weights=Weights.parse(str(copy))).fingerprint


CHANGES = {
    "file contents": _changed_contents,
    "a label": _changed_label,
    "a class name": _renamed_class,
    "weights file": _changed_weights,
    "random weights": lambda f: make_plan(f, weights=Weights.parse("none")).fingerprint,
    "pooling": lambda f: make_plan(f, pooling="max").fingerprint,
    "image size": lambda f: make_plan(f, image_size=48).fingerprint,
    "dtype": lambda f: make_plan(f, dtype="float32").fingerprint,
    "interpolation": lambda f: make_plan(f, interpolation="bicubic").fingerprint,
    "test fraction": lambda f: make_plan(f, test_fraction=0.4).fingerprint,
}


@pytest.mark.parametrize("change", CHANGES)
def test_each_input_changes_it(folder: Path, change: str) -> None:
    reference = make_plan(folder).fingerprint
    assert CHANGES[change](folder) != reference


def test_repeating_an_extract_reuses_the_cache(mini_store: Path, shared_paths: dict,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import extract.pipeline

    def no_backbone(*args: object, **kwargs: object) -> None:
        raise AssertionError("the backbone was built for a cached extraction")

    monkeypatch.setattr(extract.pipeline, "build_feature_model", no_backbone)
    before = snapshot(mini_store)
    result = run_cli("extract", str(shared_paths["mini"]), *MINI_ARGS, "--batch-size", "16",
                     "--store", str(mini_store))
    assert result.exit_code == 0, result.output
    assert "Reused cache" in result.output and "no backbone pass" in result.output
    assert snapshot(mini_store) == before

    plan = make_plan(shared_paths["mini"], image_size=64)
    outcome = extract.pipeline.extract_features(plan, Store(mini_store), progress=False)
    assert outcome.reused and outcome.computed == 0
    assert outcome.cache.path.parent == mini_store / "caches"


def test_a_changed_setting_makes_a_new_cache(folder: Path, tmp_path: Path) -> None:
    from extract.pipeline import extract_features

    store = Store(tmp_path / "store")
    # 64 px: MobileNet's last feature map is 2x2, so avg and max pooling differ
    first = extract_features(make_plan(folder, image_size=64), store, progress=False)
    second = extract_features(make_plan(folder, image_size=64, pooling="max"), store,
                              progress=False)
    assert not first.reused and not second.reused
    assert first.computed == second.computed == sum(PER_CLASS.values())
    assert first.cache.path != second.cache.path
    assert len(store.caches()) == 2
    assert (first.cache.features("train") != second.cache.features("train")).any()
