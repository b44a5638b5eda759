"""Constants and numeric helpers of the cache layout; the format itself is docs/format.md.

Format `headstart.feature-cache`, version 1.4. Readers MUST refuse a different major version
and MAY read any minor version of their own.
"""

from __future__ import annotations

import numpy as np

ENCODING_TYPE = "headstart.feature-cache"
ENCODING_VERSION = "1.4"
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
