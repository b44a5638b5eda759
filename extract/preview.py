"""A PNG grid of training images beside their augmented views, for checking augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from extract.augment import AUGMENT_CHUNK, Augmentation
from extract.datasets import Dataset
from extract.images import BadImage
from extract.preprocessing import Preprocessing
from store.atomic import atomic_path
from store.errors import HeadstartError

CELL_MIN = 96  # cells are scaled up to at least this many pixels, nearest-neighbour
GAP = 4


def augmentation_grid(dataset: Dataset, preprocessing: Preprocessing, augmentation: Augmentation,
                      count: int = 8, views: int = 4) -> Image.Image:
    """Rows: the first `count` usable training images; columns: original, then views 0..views-1.

    The views are made exactly as extraction makes them for the first images of the split.
    """
    if not 1 <= count <= AUGMENT_CHUNK or not 1 <= views <= 16:
        raise HeadstartError(f"show-augment takes 1-{AUGMENT_CHUNK} images and 1-16 views.")
    originals: list[np.ndarray] = []
    rows: list[int] = []
    split = dataset.splits["train"]
    for row in range(min(len(split), AUGMENT_CHUNK)):
        try:
            originals.append(dataset.load("train", row, preprocessing))
            rows.append(row)
        except BadImage:
            continue
    if not originals:
        raise HeadstartError("No usable training image to show.")
    images = np.stack(originals)
    columns = [images] + [augmentation.apply(images, np.asarray(rows), view, "train")
                          for view in range(views)]
    size = preprocessing.image_size
    cell = max(size, CELL_MIN)
    shown = min(count, len(images))
    grid = Image.new("RGB", ((cell + GAP) * len(columns) + GAP, (cell + GAP) * shown + GAP),
                     (255, 255, 255))
    for r in range(shown):
        for c, column in enumerate(columns):
            tile = Image.fromarray(column[r]).resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (GAP + c * (cell + GAP), GAP + r * (cell + GAP)))
    return grid


def save_png(image: Image.Image, path: Path) -> Path:
    """Write a PNG atomically; returns the path."""
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")
    return path


def write_augmentation_grid(dataset: str, backbone: str, image_size: int,
                            augmentation: Augmentation, count: int, views: int, path: Path,
                            test_fraction: float = 0.2) -> Path:
    """Open `dataset`, draw the grid with `backbone`'s preprocessing at `image_size`, save it."""
    from extract.backbones import get_backbone
    from extract.datasets import open_dataset

    preprocessing = get_backbone(backbone).preprocessing(image_size)
    grid = augmentation_grid(open_dataset(dataset, test_fraction), preprocessing, augmentation,
                             count, views)
    return save_png(grid, path)
