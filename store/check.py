"""The one checker of a cache file's datasets against the spec (docs/format.md), for `verify`.

`layout_problems` names what a file breaks, first problem first; with `contents` it also reads
every features chunk (so HDF5 checks every Fletcher-32 checksum), every label and every id.
"""

from __future__ import annotations

import h5py
import numpy as np

from store import layout
from store.format import KINDS, CacheAttributes


def layout_problems(handle: h5py.File, attributes: CacheAttributes, classes: int,
                    contents: bool = True) -> tuple[list[str], int]:
    """What the file's datasets break (phrases like "has no train/ids"), and its row count."""
    splits = [s for s in layout.SPLITS if s in handle]
    if not splits:
        return ["holds no split"], 0
    problems = attribute_problems(attributes)
    rows = 0
    for split in splits:
        why, count = split_problem(handle[split], split, classes, attributes, contents)
        rows += count
        if why:
            problems.append(why)
    problems.extend(_skipped_problem(handle, attributes))
    return problems, rows


def attribute_problems(attributes: CacheAttributes) -> list[str]:
    """What the root attributes break beyond the required ones (`from_attrs` checks those)."""
    if attributes.kind not in KINDS:
        return [f"has kind {attributes.kind!r}, not one of {', '.join(KINDS)}"]
    needed = {"views": ("parent", "view", "augmentation"), "shard": ("shard",)}
    missing = [n for n in needed.get(attributes.kind, ()) if getattr(attributes, n) is None]
    return [f"is a {attributes.kind} file without its {', '.join(missing)} attribute"] if missing \
        else []


def split_problem(group: h5py.Group, split: str, classes: int, attributes: CacheAttributes,
                  contents: bool = True) -> tuple[str, int]:
    """The first thing wrong with one split (empty when healthy), and its row count."""
    for key in ("features", "labels", "ids", *_kind_datasets(attributes)):
        if key not in group:
            return f"has no {split}/{key}", 0
    features, labels, ids = group["features"], group["labels"], group["ids"]
    count = int(labels.shape[0])
    if features.ndim != 2 or features.shape[0] != count or ids.shape[0] != count:
        return (f"has {features.shape[0]} {split} feature rows, {count} labels and "
                f"{ids.shape[0]} ids; they must agree"), count
    if count and not features.fletcher32:
        return f"stores {split}/features without Fletcher-32 checksums", count
    for key in _kind_datasets(attributes):
        if group[key].shape != (count,):
            return f"has {group[key].shape[0]} {split}/{key} for {count} rows", count
    if not contents:
        return "", count
    step = features.chunks[0] if features.chunks else 4096
    for start in range(0, count, step):  # reading every chunk checks every checksum
        block = np.asarray(features[start:start + step], dtype=np.float32)
        if not np.isfinite(block).all():
            bad = start + int(np.argwhere(~np.isfinite(block))[0][0])
            return f"has a NaN or infinite feature in {split} row {bad}", count
    values = np.asarray(labels[...])
    if count and (values.min() < 0 or values.max() >= classes):
        return f"has {split} labels outside 0..{classes - 1}", count
    names = ids.asstr()[...]
    if len(set(names.tolist())) != count:
        return f"has duplicate {split} sample ids", count
    return "", count


def _kind_datasets(attributes: CacheAttributes) -> tuple[str, ...]:
    """The per-split datasets this kind of cache adds to features, labels and ids."""
    return {"views": ("views",), "shard": ("rows",)}.get(attributes.kind, ())


def _skipped_problem(handle: h5py.File, attributes: CacheAttributes) -> list[str]:
    columns = ("split", "id", "reason", *(("row",) if attributes.kind == "shard" else ()))
    group = handle.get("skipped")
    if group is None or any(c not in group for c in columns):
        return ["has no complete /skipped group"]
    if len({group[c].shape for c in columns}) != 1:
        return ["has /skipped columns of different lengths"]
    return []
