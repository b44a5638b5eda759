"""A PNG grid of training images beside their augmented views, for checking augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

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
    """Rows: `count` training images taken across the classes in turn; columns: the original,
    then views 0..views-1, under a header, each row named by its class.

    The views are exactly what extraction caches for those images: each image is augmented with
    the rest of its augmentation chunk, as the extraction pass does.
    """
    if not 1 <= count <= AUGMENT_CHUNK or not 1 <= views <= 16:
        raise HeadstartError(f"show-augment takes 1-{AUGMENT_CHUNK} images and 1-16 views.")
    split = dataset.splits["train"]
    chosen = _across_classes(np.asarray(split.labels), count)
    shown: dict[int, list[np.ndarray]] = {}
    for chunk in sorted({row // AUGMENT_CHUNK for row in chosen}):
        rows, images = _decoded_chunk(dataset, preprocessing, chunk, len(split))
        if not rows:
            continue
        columns = [images] + [augmentation.apply(images, np.asarray(rows), view, "train")
                              for view in range(views)]
        for position, row in enumerate(rows):
            if row in chosen:
                shown[row] = [column[position] for column in columns]
    if not shown:
        raise HeadstartError("No usable training image to show.")
    order = [row for row in chosen if row in shown]
    names = [dataset.class_names[int(split.labels[row])] for row in order]
    return _draw([shown[row] for row in order], names,
                 ["original"] + [f"view {v}" for v in range(views)], preprocessing.image_size)


def _across_classes(labels: np.ndarray, count: int) -> list[int]:
    """Rows of the first image of each class, then the second of each, ... (`count` rows)."""
    per_class = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    chosen: list[int] = []
    for rank in range(max((len(rows) for rows in per_class), default=0)):
        chosen += [int(rows[rank]) for rows in per_class if rank < len(rows)]
        if len(chosen) >= count:
            break
    return chosen[:count]


def _decoded_chunk(dataset: Dataset, preprocessing: Preprocessing, chunk: int, size: int
                   ) -> tuple[list[int], np.ndarray]:
    """The rows of one augmentation chunk that decode, and their resized pixels."""
    rows, pixels = [], []
    for row in range(chunk * AUGMENT_CHUNK, min(size, (chunk + 1) * AUGMENT_CHUNK)):
        try:
            pixels.append(dataset.load("train", row, preprocessing))
            rows.append(row)
        except BadImage:
            continue
    return rows, np.stack(pixels) if pixels else np.zeros((0,))


def _draw(tiles: list[list[np.ndarray]], row_names: list[str], column_names: list[str],
          size: int) -> Image.Image:
    """The grid of tiles with a header row of column names and each row's name on its left."""
    cell = max(size, CELL_MIN)
    label_width, header = 88, 18
    grid = Image.new("RGB", (label_width + (cell + GAP) * len(column_names) + GAP,
                             header + (cell + GAP) * len(tiles) + GAP), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(column_names):
        draw.text((label_width + GAP + c * (cell + GAP), 3), name, fill=(0, 0, 0))
    for r, (row, name) in enumerate(zip(tiles, row_names)):
        top = header + GAP + r * (cell + GAP)
        draw.text((GAP, top + cell // 2 - 6), name[:14], fill=(0, 0, 0))
        for c, tile in enumerate(row):
            image = Image.fromarray(tile).resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(image, (label_width + GAP + c * (cell + GAP), top))
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
