"""The cache fingerprint: what changes it, what does not, and reuse without a backbone pass."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from typing import Any, Callable

from extract.backbones import Weights, get_backbone
from extract.compute import ComputeOptions
from tests.conftest import MINI_ARGS, WEIGHTS
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


def _touched(folder: Path) -> str:
    os.utime(_first_image(folder), (1_000_000, 1_000_000))
    return make_plan(folder).fingerprint


def _moved_folder(folder: Path) -> str:
    moved = shutil.copytree(folder, folder.parent / "elsewhere" / "pets")
    shutil.rmtree(folder)
    return make_plan(moved).fingerprint


#: What must not change it: one row each (the reference is make_plan(folder) before the change).
KEPT = {
    "file times (mtime)": _touched,
    "batch size": lambda f: make_plan(f, batch_size=7).fingerprint,
    "workers": lambda f: make_plan(f, workers=1).fingerprint,
    "folder path": _moved_folder,
    "XLA": lambda f: make_plan(f, compute=ComputeOptions(xla=True)).fingerprint,
}


@pytest.mark.parametrize("kept", KEPT)
def test_what_does_not_change_it(folder: Path, kept: str) -> None:
    reference = make_plan(folder).fingerprint
    assert KEPT[kept](folder) == reference


def _before_after(change: Callable[[Path], object], **overrides: Any
                  ) -> Callable[[Path], tuple[str, str]]:
    """A row: the fingerprint of `folder`, then again after change(folder) (and overrides)."""
    def row(folder: Path) -> tuple[str, str]:
        before = make_plan(folder).fingerprint
        change(folder)
        return before, make_plan(folder, **overrides).fingerprint
    return row


def _setting(**overrides: Any) -> Callable[[Path], tuple[str, str]]:
    return _before_after(lambda folder: None, **overrides)


def _settings_pair(reference: dict[str, Any], changed: dict[str, Any]
                   ) -> Callable[[Path], tuple[str, str]]:
    return lambda f: (make_plan(f, **reference).fingerprint, make_plan(f, **changed).fingerprint)


def _new_contents(folder: Path) -> None:
    other = sorted((folder / "dog").glob("*.jpg"))[0]
    _first_image(folder).write_bytes(other.read_bytes())  # same name and label, other pixels


def _new_label(folder: Path) -> None:
    image = _first_image(folder)
    image.rename(folder / "dog" / image.name)  # same name and pixels, another class


def _new_id(folder: Path) -> None:
    image = _first_image(folder)
    # same pixels and class, and still the first file of its class: only the id differs
    image.rename(image.with_name(image.stem + "a" + image.suffix))


def _other_split(folder: Path) -> tuple[str, str]:
    """A file moved from train/ to test/ (same name, class and pixels)."""
    root = folder.parent / "split"
    make_folder(root, {"cat": 3, "dog": 3}, split="train")
    make_folder(root, {"cat": 2, "dog": 2}, split="test")
    before = make_plan(root).fingerprint
    image = sorted((root / "train" / "cat").glob("*.jpg"))[0]
    image.rename(root / "test" / "cat" / image.name)
    return before, make_plan(root).fingerprint


def _weights_file(folder: Path) -> tuple[str, str]:
    copy = folder.parent / "weights.h5"
    data = bytearray(WEIGHTS.read_bytes())
    data[-1] ^= 1  # one bit of the file
    copy.write_bytes(bytes(data))
    return make_plan(folder).fingerprint, make_plan(folder, weights=Weights.parse(str(copy))).fingerprint


NONE, IMAGENET = Weights.parse("none"), Weights.parse("imagenet")
#: Every input the fingerprint claims, one row each: (fingerprint before, fingerprint after).
CHANGES: dict[str, Callable[[Path], tuple[str, str]]] = {
    "file contents": _before_after(_new_contents),
    "a label": _before_after(_new_label),
    "a sample id (file renamed)": _before_after(_new_id),
    "a file moved from train/ to test/": _other_split,
    "a class name": _before_after(lambda f: (f / "ship").rename(f / "boat")),
    "test fraction": _settings_pair({"test_fraction": 0.2}, {"test_fraction": 0.4}),
    "backbone": _settings_pair({"weights": NONE}, {"weights": NONE, "alpha": 0.35,
                                                   "backbone": get_backbone("mobilenet_v2")}),
    "alpha (imagenet weights)": _settings_pair({"weights": IMAGENET}, {"weights": IMAGENET,
                                                                       "alpha": 0.5}),
    "alpha (random weights: two widths)": _settings_pair({"weights": NONE},
                                                         {"weights": NONE, "alpha": 0.5}),
    "weights file": _weights_file,
    "random weights": _setting(weights=NONE),
    "imagenet weights": _setting(weights=IMAGENET),
    "pooling": _setting(pooling="max"),
    "image size": _setting(image_size=48),
    "dtype": _setting(dtype="float32"),
    "interpolation": _setting(interpolation="bicubic"),
    "resizer (format 1.2 caches)": _setting(resizer="pillow"),
    "precision": _setting(compute=ComputeOptions(precision="mixed_float16")),
}


@pytest.mark.parametrize("change", CHANGES)
def test_each_input_changes_it(folder: Path, change: str) -> None:
    before, after = CHANGES[change](folder)
    assert len(before) == len(after) == 64
    assert after != before


def test_the_rows_are_distinct_caches(folder: Path, tmp_path: Path) -> None:
    """No two of the settings rows collide with each other either."""
    seen = {make_plan(folder).fingerprint: "reference"}
    for name in ("pooling", "image size", "dtype", "interpolation", "precision", "random weights"):
        _, after = CHANGES[name](folder)
        assert after not in seen, (name, seen.get(after))
        seen[after] = name


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
