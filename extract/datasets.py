"""Datasets: Keras built-ins or image folders, listed into splits of (id, label) samples.

Listing is cheap and happens before any work starts, so an empty class or a missing folder is
reported at once. Each dataset also yields a content digest (file contents, labels, split and
sample ids; never file times) for the cache fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from extract.images import is_image_file
from extract.preprocessing import Preprocessing
from extract.runtime import load_keras
from store.errors import HeadstartError, command
from store.fingerprint import digest_file, unit_fraction
from store.shards import ShardSelection, ShardSpec
from store.store import expand_path

SPLITS = ("train", "test")
SPLIT_SALT = "headstart-test-split:"
DIGEST_CHUNK = 256  # files digested per thread task: one task per file costs more than a small file

CIFAR10_CLASSES = ("airplane automobile bird cat deer dog frog horse ship truck").split()
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy "
    "porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television "
    "tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
FASHION_MNIST_CLASSES = (
    "t-shirt trouser pullover dress coat sandal shirt sneaker bag ankle_boot"
).split()
KERAS_DATASETS: dict[str, tuple[str, ...]] = {
    "cifar10": tuple(CIFAR10_CLASSES),
    "cifar100": tuple(CIFAR100_CLASSES),
    "mnist": tuple(str(digit) for digit in range(10)),
    "fashion_mnist": tuple(FASHION_MNIST_CLASSES),
}


@dataclass
class SplitSamples:
    """The samples of one split, in a fixed order."""

    ids: list[str]
    labels: np.ndarray  # int32 indices into the dataset's class names

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Dataset:
    """A labelled image dataset: class names, splits, and how to load sample i of a split."""

    name: str
    source: dict[str, Any]  # how the dataset was specified, recorded in the cache
    class_names: list[str]
    splits: dict[str, SplitSamples]
    _loader: Callable[[str, int, Preprocessing, bool], np.ndarray] = field(repr=False)
    _digest: Callable[[], str] = field(repr=False)
    #: Set on the part of a dataset one shard extracts (see `sharded`).
    shard: ShardSelection | None = None
    _digest_value: str | None = field(default=None, repr=False)

    def load(self, split: str, index: int, preprocessing: Preprocessing,
             resized: bool = True) -> np.ndarray:
        """Sample `index` of `split` as a uint8 S×S×3 array (raises BadImage for a bad file);
        with `resized` false, as the graph takes it (`Preprocessing.decode_file`)."""
        return self._loader(split, index, preprocessing, resized)

    def content_digest(self) -> str:
        """Digest of the contents, labels, ids and split of every sample (computed once)."""
        if self._digest_value is None:
            self._digest_value = self._digest()
        return self._digest_value

    def sharded(self, spec: ShardSpec) -> "Dataset":
        """Only the samples of shard `spec` (by a hash of each id), in their original order.

        The content digest stays the full dataset's, so a shard's fingerprint is the full
        cache's; the selection records where each sample sits in the full split.
        """
        if self.shard is not None:
            raise HeadstartError("A shard cannot be cut into shards again.")
        selection = ShardSelection.select(spec, {s: v.ids for s, v in self.splits.items()})
        splits = {split: SplitSamples([samples.ids[i] for i in selection.rows[split]],
                                      samples.labels[selection.rows[split]])
                  for split, samples in self.splits.items()}
        full_load = self._loader

        def load(split: str, index: int, preprocessing: Preprocessing, resized: bool) -> np.ndarray:
            return full_load(split, int(selection.rows[split][index]), preprocessing, resized)

        return dataclasses.replace(self, splits=splits, _loader=load, shard=selection)


def open_dataset(spec: str, test_fraction: float = 0.2) -> Dataset:
    """A Keras built-in by name, or an image folder by path."""
    if not 0.0 < test_fraction < 1.0:
        raise HeadstartError(f"--test-fraction must be between 0 and 1; got {test_fraction}.")
    path = expand_path(spec)
    if path.is_dir():
        return folder_dataset(path, test_fraction)
    if spec in KERAS_DATASETS:
        return keras_dataset(spec)
    if path.exists():
        raise HeadstartError(f"Dataset {spec!r} is a file, not a folder of class folders.")
    raise HeadstartError(
        f"Unknown dataset {spec!r}: no such folder, and not one of the Keras built-ins "
        f"({', '.join(KERAS_DATASETS)})."
    )


# --- image folders -------------------------------------------------------------------------


def _image_files(root: Path, class_dir: Path) -> list[tuple[str, Path]]:
    """(sample id, path) of the image files below a class folder, recursively, in path order;
    symlinked folders are not followed."""
    found: list[tuple[str, Path]] = []
    for directory, subdirs, files in os.walk(class_dir, followlinks=False):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        folder = Path(directory)
        prefix = folder.relative_to(root).as_posix() + "/"
        named = [folder / name for name in files if not name.startswith(".")]
        found.extend((prefix + path.name, path) for path in named if is_image_file(path))
    found.sort(key=lambda item: item[0].split("/"))  # as sorted(paths): part by part
    return [(_id_text(relative), path) for relative, path in found]


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_split(root: Path, split_dir: Path, class_names: list[str]
                ) -> tuple[list[Path], list[int], list[str]]:
    """The image paths of a split's class folders, their labels and their sample ids."""
    files: list[Path] = []
    labels: list[int] = []
    ids: list[str] = []
    for class_dir in _class_dirs(split_dir):
        if class_dir.name not in class_names:
            raise HeadstartError(
                f"Class folder {class_dir.relative_to(root)} has no counterpart in the training "
                "split; every class must have training images."
            )
        images = _image_files(root, class_dir)
        if not images:
            raise HeadstartError(f"Class folder {class_dir} holds no image files.")
        ids.extend(sample_id for sample_id, _ in images)
        files.extend(path for _, path in images)
        labels.extend([class_names.index(class_dir.name)] * len(images))
    return files, labels, ids


def folder_dataset(root: Path, test_fraction: float = 0.2) -> Dataset:
    """`root/train/<class>/*` with `root/test|val/<class>/*`, or `root/<class>/*` split by hash."""
    given, root = root, root.resolve()  # messages name the folder as the user typed it
    train_dir = root / "train" if (root / "train").is_dir() else root
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if train_dir == root:
        test_dir = None
    class_dirs = _class_dirs(train_dir)
    if not class_dirs:
        raise HeadstartError(f"Dataset folder {given} holds no class folders (expected "
                             "DIR/<class>/*).")
    class_names = [d.name for d in class_dirs]
    train = _list_split(root, train_dir, class_names)
    if test_dir is not None:
        split_files = {"train": train, "test": _list_split(root, test_dir, class_names)}
        source = {"kind": "folder", "layout": "split-folders", "test_folder": test_dir.name}
    else:
        is_test = [unit_fraction(sample_id, SPLIT_SALT) < test_fraction for sample_id in train[2]]
        split_files = {
            name: tuple([item for item, t in zip(column, is_test) if t == want] for column in train)
            for name, want in (("train", False), ("test", True))
        }
        source = {"kind": "folder", "layout": "hash-split", "test_fraction": test_fraction}
    for split, (files, _, _) in split_files.items():
        if not files:
            raise HeadstartError(f"The {split} split of {given} is empty.")
    if len(class_names) < 2:
        raise HeadstartError(f"Dataset folder {given} holds one class folder "
                             f"({class_names[0]}); a classifier needs at least two classes.")
    paths = {split: files for split, (files, _, _) in split_files.items()}
    splits = {
        split: SplitSamples(ids, np.asarray(labels, dtype=np.int32))
        for split, (_, labels, ids) in split_files.items()
    }

    def load(split: str, index: int, preprocessing: Preprocessing, resized: bool) -> np.ndarray:
        path = paths[split][index]
        return preprocessing.load_file(path) if resized else preprocessing.decode_file(path)

    def digest() -> str:
        return _folder_digest(paths, splits, class_names)

    return Dataset(_dataset_name(root), {**source, "path": str(root)}, class_names, splits,
                   load, digest)


def _folder_digest(paths: dict[str, list[Path]], splits: dict[str, SplitSamples],
                   class_names: list[str]) -> str:
    """An image folder's content digest: split, id, label and file digest of every sample, then
    the class names (a module function, not a closure, so mutation testing can reach it)."""
    sha = hashlib.sha256()
    with ThreadPoolExecutor(max_workers=8) as pool:
        for split in SPLITS:
            chunks = [paths[split][start:start + DIGEST_CHUNK]
                      for start in range(0, len(paths[split]), DIGEST_CHUNK)]
            file_digests = (d for chunk in pool.map(_safe_digests, chunks) for d in chunk)
            for sample_id, label, file_digest in zip(
                splits[split].ids, splits[split].labels.tolist(), file_digests
            ):
                sha.update(f"{split}\t{sample_id}\t{label}\t{file_digest}\n".encode())
    sha.update("\n".join(class_names).encode())
    return sha.hexdigest()


def _id_text(relative: str) -> str:
    """The sample id of a path relative to the dataset folder, as valid UTF-8 text.

    A name that is not UTF-8 (bytes Python keeps as surrogates) gets its bad bytes written as
    \\xNN, so it can be stored, printed and hashed; the file itself is still read by its path.
    """
    return os.fsencode(relative).decode("utf-8", "backslashreplace")


def _safe_digest(path: Path) -> str:
    """A file's digest, or a marker for an unreadable file (it is skipped at extraction)."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # never read a FIFO or a device
            return "not-a-regular-file"
        return digest_file(path)
    except OSError as error:
        return f"unreadable:{type(error).__name__}"


def _safe_digests(paths: list[Path]) -> list[str]:
    """`_safe_digest` of each file: one thread task for many small files."""
    return [_safe_digest(path) for path in paths]


def _dataset_name(root: Path) -> str:
    if root.name.lower() in ("train", "images", "data") and root.parent.name:
        return f"{root.parent.name}-{root.name}"
    return root.name


# --- Keras built-ins ------------------------------------------------------------------------


def keras_dataset(name: str) -> Dataset:
    """A `keras.datasets` dataset, downloaded and cached by Keras's own code."""
    keras = load_keras()

    loader = getattr(keras.datasets, name)
    try:
        (x_train, y_train), (x_test, y_test) = loader.load_data()
    except Exception as error:  # keras raises plain Exception on a failed download
        raise HeadstartError(
            f"Could not download the {name} dataset ({str(error).splitlines()[0] if str(error) else type(error).__name__}); "
            f"offline, extract an image folder instead ({command('extract DIR')}) and use "
            "--weights PATH for local backbone weights."
        ) from None
    arrays = {"train": (x_train, y_train), "test": (x_test, y_test)}
    return array_dataset(name, list(KERAS_DATASETS[name]), arrays, {"kind": "keras", "name": name})


def array_dataset(
    name: str,
    class_names: list[str],
    arrays: dict[str, tuple[np.ndarray, np.ndarray]],
    source: dict[str, Any],
) -> Dataset:
    """A dataset held in memory as uint8 image arrays (N×H×W or N×H×W×C) and integer labels."""
    splits = {
        split: SplitSamples(
            [f"{split}/{i:06d}" for i in range(len(images))],
            np.asarray(labels, dtype=np.int32).reshape(-1),
        )
        for split, (images, labels) in arrays.items()
    }

    def load(split: str, index: int, preprocessing: Preprocessing, resized: bool) -> np.ndarray:
        pixels = arrays[split][0][index]
        return preprocessing.load_array(pixels) if resized else preprocessing.decode_array(pixels)

    def digest() -> str:
        return _array_digest(arrays, splits, class_names)

    return Dataset(name, source, class_names, splits, load, digest)


def _array_digest(arrays: dict[str, tuple[np.ndarray, np.ndarray]],
                  splits: dict[str, SplitSamples], class_names: list[str]) -> str:
    """An in-memory dataset's content digest: each split's shape, dtype, pixels and labels,
    then the class names."""
    sha = hashlib.sha256()
    for split in SPLITS:
        images, _ = arrays[split]
        sha.update(f"{split}:{images.shape}:{images.dtype}".encode())
        sha.update(np.ascontiguousarray(images).tobytes())
        sha.update(splits[split].labels.tobytes())
    sha.update("\n".join(class_names).encode())
    return sha.hexdigest()
