"""Sizes in bytes as people write and read them (decimal units; binary ones are read too)."""

from __future__ import annotations

import re

from store.errors import HeadstartError

_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3,
          "GB": 1000**3, "T": 1000**4, "TB": 1000**4, "KIB": 1024, "MIB": 1024**2,
          "GIB": 1024**3, "TIB": 1024**4}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str) -> int:
    """'256MB', '2GB', '1.5GiB', '500000' → bytes; anything else is a one-sentence error."""
    match = _SIZE.fullmatch(str(text))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _UNITS:
        raise HeadstartError(
            f"Memory size {text!r} is not understood; write a number with a unit, e.g. 256MB or 2GB.")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise HeadstartError(f"Memory size {text!r} must be more than zero.")
    return size


def format_size(size: float) -> str:
    """Bytes as a short human figure (decimal units, like parse_size reads)."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
