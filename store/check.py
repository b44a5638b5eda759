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
    problems.extend(_blocks_problem(handle[splits[0]], attributes))
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
    why = _mirrored_problem(group, split, attributes)
    if why:
        return why, count
    if not contents:
        return "", count
    for key in ("features", *(("mirrored",) if attributes.tta is not None else ())):
        why = _values_problem(group[key], split, key)
        if why:
            return why, count
    values = np.asarray(labels[...])
    if count and (values.min() < 0 or values.max() >= classes):
        return f"has {split} labels outside 0..{classes - 1}", count
    names = ids.asstr()[...]
    if len(set(names.tolist())) != count:
        return f"has duplicate {split} sample ids", count
    return "", count


def _values_problem(data: h5py.Dataset, split: str, key: str) -> str:
    """Reads every chunk of a features dataset (checking every checksum); a non-finite value
    is a problem."""
    step = data.chunks[0] if data.chunks else 4096
    for start in range(0, data.shape[0], step):
        block = np.asarray(data[start:start + step], dtype=np.float32)
        if not np.isfinite(block).all():
            bad = start + int(np.argwhere(~np.isfinite(block))[0][0])
            what = "feature" if key == "features" else "mirrored feature"
            return f"has a NaN or infinite {what} in {split} row {bad}"
    return ""


def _mirrored_problem(group: h5py.Group, split: str, attributes: CacheAttributes) -> str:
    """`/<split>/mirrored` is there exactly when `tta` is set, stored like the features."""
    if attributes.tta is None:
        return f"has {split}/mirrored without the tta attribute" if "mirrored" in group else ""
    if attributes.tta != "flip":
        return f"has tta {attributes.tta!r}, not 'flip'"
    if "mirrored" not in group:
        return f"has no {split}/mirrored"
    features, mirrored = group["features"], group["mirrored"]
    if mirrored.shape != features.shape or mirrored.dtype != features.dtype:
        return (f"has {split}/mirrored of shape {mirrored.shape} ({mirrored.dtype}) for features "
                f"of shape {features.shape} ({features.dtype})")
    if features.shape[0] and not mirrored.fletcher32:
        return f"stores {split}/mirrored without Fletcher-32 checksums"
    return ""


def _blocks_problem(group: h5py.Group, attributes: CacheAttributes) -> list[str]:
    """The `blocks` attribute, when present, tiles the feature columns in order."""
    if attributes.blocks is None:
        return []
    width = group["features"].shape[1] if group["features"].ndim == 2 else -1
    try:
        ranges = [(int(b["start"]), int(b["stop"])) for b in attributes.blocks
                  if isinstance(b["name"], str)]
    except (KeyError, TypeError, ValueError):
        ranges = []
    edges = [0] + [stop for _, stop in ranges]
    if (not ranges or len(ranges) != len(attributes.blocks) or edges[-1] != width
            or any(start != edges[i] or stop <= start for i, (start, stop) in enumerate(ranges))):
        return [f"has a blocks attribute that does not tile its {width} feature columns"]
    return []


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
