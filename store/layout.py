"""The on-disk layout of one feature cache (an HDF5 file). See README "HDF5 layout".

Format `headstart.feature-cache`, version 1.2:

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
`merged` attribute of a cache made from shards; caches are otherwise unchanged.

Readers MUST refuse a different major version and MAY read any minor version of their own.
"""

from __future__ import annotations

ENCODING_TYPE = "headstart.feature-cache"
ENCODING_VERSION = "1.2"
SPLITS = ("train", "test")
FEATURE_DTYPES = ("float16", "float32")
CHUNK_BYTES = 1 << 20  # target size of one features chunk


def rows_per_chunk(width: int, itemsize: int, rows: int) -> int:
    """Rows per features chunk: about CHUNK_BYTES per chunk, never more rows than exist."""
    return max(1, min(rows, CHUNK_BYTES // max(1, width * itemsize)))


def major(version: str) -> int:
    """The major part of a "major.minor" version string."""
    return int(str(version).split(".", 1)[0])
