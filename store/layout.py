"""The on-disk layout of one feature cache (an HDF5 file). See README "HDF5 layout".

Format `headstart.feature-cache`, version 1.3:

    /                       attrs: encoding-type, encoding-version, fingerprint, inputs (JSON),
                                   preprocessing (JSON), dataset, created, libraries (JSON),
                                   weights-path (1.1+: the weights file read, or "")
    /classes                (C,)   UTF-8 strings, the class names; labels index into it
    /<split>/features       (N, D) float16 or float32, chunked by rows, fletcher32 checksums
    /<split>/labels         (N,)   int32
    /<split>/ids            (N,)   UTF-8 strings, unique sample ids
    /skipped/{split,id,reason}     UTF-8 strings, files that could not be used and why

Version 1.1 only adds the optional `weights-path` attribute; 1.0 caches stay readable (prediction
then needs the weights file named explicitly). Version 1.2 adds shard files (see store/shards.py:
attrs `kind` = "shard" and `shard`, datasets `/<split>/rows` and `/skipped/row`) and the optional
`merged` attribute of a cache made from shards; caches are otherwise unchanged. Version 1.3 adds
`resizer` to the preprocessing JSON: "tensorflow" (images resized in the backbone's graph by
tf.image.resize, rounded to uint8); a definition without it (1.2 and older) means "pillow".

Readers MUST refuse a different major version and MAY read any minor version of their own.
"""

from __future__ import annotations

import numpy as np

ENCODING_TYPE = "headstart.feature-cache"
ENCODING_VERSION = "1.3"
SPLITS = ("train", "test")
FEATURE_DTYPES = ("float16", "float32")
#: Target size of one features chunk. 64 KiB measured best (bench/results, "Storage choices"):
#: random 128-row batches 2-3x faster than 1 MiB chunks, full scans and writes no slower.
CHUNK_BYTES = 1 << 16
#: Rows read at a time when a split is read block by block: about this many bytes.
BLOCK_BYTES = 1 << 20


def rows_per_chunk(width: int, itemsize: int, rows: int) -> int:
    """Rows per features chunk: about CHUNK_BYTES per chunk, never more rows than exist."""
    return max(1, min(rows, CHUNK_BYTES // max(1, width * itemsize)))


#: float16 bit pattern -> float32 value, for all 65,536 patterns (exactly numpy's conversion).
_HALF_TO_SINGLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def as_float32(values: np.ndarray) -> np.ndarray:
    """Features as float32. float16 goes through a lookup table: the same values as
    `astype(np.float32)`, about twice as fast on CPUs where numpy converts half floats slowly."""
    if values.dtype == np.float16:
        return np.take(_HALF_TO_SINGLE, values.view(np.uint16))
    return np.asarray(values, dtype=np.float32)


def major(version: str) -> int:
    """The major part of a "major.minor" version string."""
    return int(str(version).split(".", 1)[0])
