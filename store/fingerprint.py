"""Content digests and the cache fingerprint.

A cache is named by a digest of everything that changes its numbers. Inputs are plain JSON
values; the digest is taken over their canonical JSON form so that key order never matters.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

#: Bumped whenever extraction code changes the features it produces for the same inputs.
EXTRACTION_VERSION = 1

_READ_BLOCK = 1 << 20


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no insignificant whitespace."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest_text(text: str) -> str:
    """SHA-256 hex digest of a string."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def digest_file(path: Path) -> str:
    """SHA-256 hex digest of a file's contents, read in blocks."""
    sha = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:  # whole blocks: a buffer would only copy
        for block in iter(lambda: handle.read(_READ_BLOCK), b""):
            sha.update(block)
    return sha.hexdigest()


def fingerprint(inputs: dict[str, Any]) -> str:
    """The cache fingerprint: SHA-256 of the canonical JSON of its inputs."""
    return digest_text(canonical_json({"extraction_version": EXTRACTION_VERSION, **inputs}))


def unit_fraction(text: str, salt: str = "") -> float:
    """Map a string to a number in [0, 1), stable across runs, machines and Python versions."""
    head = hashlib.sha256(f"{salt}{text}".encode("utf-8")).digest()[:8]
    return int.from_bytes(head, "big") / 2**64
