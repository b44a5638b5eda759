"""The dataset content digest (extract/datasets.py), worked out by hand over real CIFAR JPEGs.

The expected digest is hashlib over the lines the format promises ("split TAB id TAB label TAB
sha256 of the file's bytes", train then test, then the class names), never the module's output.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

import extract.datasets as datasets
from extract.datasets import _safe_digest, _safe_digests, array_dataset, folder_dataset
from tests.helpers import make_folder


def _by_hand(root: Path, dataset: datasets.Dataset) -> str:
    sha = hashlib.sha256()
    for split in ("train", "test"):
        samples = dataset.splits[split]
        for sample_id, label in zip(samples.ids, samples.labels.tolist()):
            file_sha = hashlib.sha256((root / sample_id).read_bytes()).hexdigest()
            sha.update(f"{split}\t{sample_id}\t{label}\t{file_sha}\n".encode())
    sha.update("\n".join(dataset.class_names).encode())
    return sha.hexdigest()


@pytest.fixture()
def split_folder(tmp_path: Path) -> Path:
    root = tmp_path / "pets"
    make_folder(root, {"cat": 3, "dog": 2}, split="train")
    make_folder(root, {"cat": 1, "dog": 2}, split="test")
    return root


@pytest.mark.parametrize("chunk", [256, 1, 2])  # one thread task, one per file, a partial last
def test_folder_digest_by_hand(split_folder: Path, monkeypatch: pytest.MonkeyPatch,
                               chunk: int) -> None:
    monkeypatch.setattr(datasets, "DIGEST_CHUNK", chunk)
    dataset = folder_dataset(split_folder)
    assert dataset.content_digest() == _by_hand(split_folder, dataset)


def _one_byte_changed(root: Path) -> None:
    path = sorted((root / "test" / "dog").iterdir())[-1]
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))


def _class_renamed(root: Path) -> None:
    for split in ("train", "test"):
        (root / split / "dog").rename(root / split / "wolf")


def _file_renamed(root: Path) -> None:
    path = sorted((root / "train" / "cat").iterdir())[0]
    path.rename(path.with_name("renamed.jpg"))


def _files_swapped(root: Path) -> None:  # same bytes overall, another file under each name
    first, second = sorted((root / "train" / "cat").iterdir())[:2]
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)


def _moved_across_splits(root: Path) -> None:
    path = sorted((root / "train" / "dog").iterdir())[0]
    path.rename(root / "test" / "dog" / path.name)


CHANGES = {"one byte of a test file": _one_byte_changed, "a class name": _class_renamed,
           "a file name": _file_renamed, "two files' contents swapped": _files_swapped,
           "a file moved from train to test": _moved_across_splits}


@pytest.mark.parametrize("change", CHANGES)
def test_what_changes_the_digest(split_folder: Path, change: str) -> None:
    before = folder_dataset(split_folder).content_digest()
    CHANGES[change](split_folder)
    dataset = folder_dataset(split_folder)
    assert dataset.content_digest() != before
    assert dataset.content_digest() == _by_hand(split_folder, dataset)


def test_file_times_and_the_folder_path_do_not_change_it(split_folder: Path, tmp_path: Path) -> None:
    before = folder_dataset(split_folder).content_digest()
    for path in split_folder.rglob("*.jpg"):
        os.utime(path, (1_000_000, 1_000_000))
    moved = split_folder.rename(tmp_path / "elsewhere")
    assert folder_dataset(moved).content_digest() == before


def test_the_digest_is_computed_once(split_folder: Path) -> None:
    dataset = folder_dataset(split_folder)
    first = dataset.content_digest()
    _one_byte_changed(split_folder)
    assert dataset.content_digest() == first  # the value of the listing, kept


def test_unreadable_and_special_files_get_markers(tmp_path: Path) -> None:
    regular = tmp_path / "a.jpg"
    regular.write_bytes(b"\xff\xd8 not really")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    dangling = tmp_path / "gone.jpg"
    dangling.symlink_to(tmp_path / "missing.jpg")
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    expected = [hashlib.sha256(b"\xff\xd8 not really").hexdigest(), "not-a-regular-file",
                "unreadable:FileNotFoundError", "not-a-regular-file"]
    assert [_safe_digest(p) for p in (regular, fifo, dangling, folder)] == expected
    assert _safe_digests([regular, fifo, dangling, folder]) == expected
    assert _safe_digests([]) == []


def _array_by_hand(arrays: dict, class_names: list[str]) -> str:
    sha = hashlib.sha256()
    for split in ("train", "test"):
        images, labels = arrays[split]
        sha.update(f"{split}:{images.shape}:{images.dtype}".encode())
        sha.update(images.tobytes())
        sha.update(np.asarray(labels, dtype=np.int32).reshape(-1).tobytes())
    sha.update("\n".join(class_names).encode())
    return sha.hexdigest()


def test_array_digest_by_hand() -> None:
    rng = np.random.default_rng(3)
    arrays = {"train": (rng.integers(0, 256, (4, 5, 5), dtype=np.uint8), np.array([[0], [1], [1], [0]])),
              "test": (rng.integers(0, 256, (2, 5, 5), dtype=np.uint8), np.array([1, 0]))}
    names = ["zero", "one"]
    digest = array_dataset("toy", names, arrays, {"kind": "arrays"}).content_digest()
    assert digest == _array_by_hand(arrays, names)
    reshaped = {**arrays, "test": (arrays["test"][0].reshape(2, 25, 1), arrays["test"][1])}
    assert array_dataset("toy", names, reshaped, {}).content_digest() != digest  # shape counts
