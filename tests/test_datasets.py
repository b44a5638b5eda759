"""Listing datasets: split layouts, the hash split, and refusals before any work."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import MINI
from extract.datasets import folder_dataset, open_dataset
from tests.helpers import make_folder, mini_files
from store.errors import HeadstartError


def test_split_folders_layout() -> None:
    dataset = open_dataset(str(MINI))
    assert dataset.source["layout"] == "split-folders"
    assert len(dataset.splits["train"]) == 400 and len(dataset.splits["test"]) == 200
    assert all(i.startswith("train/") for i in dataset.splits["train"].ids)


def test_val_folder_is_the_test_split(tmp_path: Path) -> None:
    make_folder(tmp_path / "d", {"cat": 3, "dog": 3}, split="train")
    make_folder(tmp_path / "d", {"cat": 2, "dog": 2}, split="test")
    (tmp_path / "d" / "test").rename(tmp_path / "d" / "val")
    dataset = open_dataset(str(tmp_path / "d"))
    assert dataset.source["test_folder"] == "val"
    assert dataset.splits["test"].ids[0].startswith("val/")
    assert len(dataset.splits["test"]) == 4


def _assignment(root: Path, fraction: float = 0.2) -> dict[str, str]:
    dataset = folder_dataset(root, fraction)
    return {i: split for split, samples in dataset.splits.items() for i in samples.ids}


@pytest.fixture()
def flat(tmp_path: Path) -> Path:
    """DIR/<class>/* with 40 images of each of three classes."""
    return make_folder(tmp_path / "flat", {"cat": 40, "dog": 40, "ship": 40})


def test_hash_split_is_deterministic_and_honours_the_fraction(flat: Path, tmp_path: Path) -> None:
    first = _assignment(flat)
    assert _assignment(flat) == first
    assert _assignment(shutil.copytree(flat, tmp_path / "copy")) == first  # by relative path only
    test_share = sum(s == "test" for s in first.values()) / len(first)
    assert 0.1 <= test_share <= 0.3
    half = _assignment(flat, 0.5)
    assert 0.38 <= sum(s == "test" for s in half.values()) / len(half) <= 0.62
    # a larger fraction only moves files into test, never out of it
    assert all(half[i] == "test" for i, s in first.items() if s == "test")


def test_hash_split_labels_follow_class_folders(flat: Path) -> None:
    dataset = folder_dataset(flat)
    assert dataset.class_names == ["cat", "dog", "ship"]
    for samples in dataset.splits.values():
        names = [dataset.class_names[label] for label in samples.labels]
        assert names == [i.split("/")[0] for i in samples.ids]


def test_adding_files_moves_no_other_file(flat: Path) -> None:
    before = _assignment(flat)
    for k, path in enumerate(mini_files("test", "cat", 15)):
        shutil.copy(path, flat / "cat" / f"new-{k}.jpg")
    (flat / "horse").mkdir()
    for path in mini_files("train", "horse", 10):
        shutil.copy(path, flat / "horse" / path.name)
    after = _assignment(flat)
    assert len(after) == len(before) + 25
    assert {i: after[i] for i in before} == before
    # labels of existing files still point at the same class names
    dataset = folder_dataset(flat)
    assert dataset.class_names == ["cat", "dog", "horse", "ship"]


def test_only_image_files_are_listed(flat: Path) -> None:
    (flat / "cat" / "notes.txt").write_text("not an image")
    (flat / "cat" / ".hidden.jpg").write_bytes(b"")
    (flat / "cat" / "nested").mkdir()
    shutil.copy(mini_files("train", "cat", 1)[0], flat / "cat" / "nested" / "deep.JPEG")
    ids = _assignment(flat)
    assert "cat/nested/deep.JPEG" in ids
    assert not any(i.endswith(("notes.txt", ".hidden.jpg")) for i in ids)


def test_content_digest_ignores_names_of_the_root(flat: Path, tmp_path: Path) -> None:
    digest = folder_dataset(flat).content_digest()
    assert folder_dataset(shutil.copytree(flat, tmp_path / "other")).content_digest() == digest


@pytest.mark.parametrize("case, fragment", [
    ("missing", "no such folder"),
    ("a file", "is a file"),
    ("empty dataset", "holds no class folders"),
    ("empty class", "holds no image files"),
    ("class only in test", "no counterpart in the training split"),
    ("empty split", "split"),
])
def test_bad_layouts_are_refused_before_any_work(tmp_path: Path, case: str, fragment: str) -> None:
    root = tmp_path / "data"
    if case == "a file":
        root.write_text("x")
    elif case == "empty dataset":
        root.mkdir()
    elif case == "empty class":
        make_folder(root, {"cat": 3})
        (root / "dog").mkdir()
    elif case == "class only in test":
        make_folder(root, {"cat": 3}, split="train")
        make_folder(root, {"cat": 2, "dog": 2}, split="test")
    elif case == "empty split":
        make_folder(root, {"cat": 1})
    with pytest.raises(HeadstartError, match=fragment):
        open_dataset(str(root), 0.2 if case != "empty split" else 0.01)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_test_fraction_out_of_range(flat: Path, fraction: float) -> None:
    with pytest.raises(HeadstartError, match="--test-fraction"):
        open_dataset(str(flat), fraction)


def test_keras_arrays_become_rgb_inputs() -> None:
    """Grey Keras datasets (mnist) are turned into three equal channels."""
    from extract.datasets import array_dataset
    from extract.preprocessing import Preprocessing

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    labels = np.array([[0], [1], [0], [1]])
    dataset = array_dataset("toy", ["a", "b"], {"train": (grey, labels), "test": (grey, labels)},
                            {"kind": "keras", "name": "toy"})
    assert dataset.splits["train"].labels.tolist() == [0, 1, 0, 1]
    image = dataset.load("train", 2, Preprocessing(28, "x.y"))
    assert image.shape == (28, 28, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], grey[2])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
