"""The one rule by which a user names a cache (or a shard set, or a cache file): its readable
name, else a prefix of its fingerprint (4 to 64 hex digits)."""

from __future__ import annotations

import re
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
HEX_PREFIX = re.compile(r"[0-9a-fA-F]{4,64}")


def matching(items: Sequence[T], selector: str, name_of: Callable[[T], str],
             fingerprint_of: Callable[[T], str]) -> list[T]:
    """The items named `selector`, else those whose fingerprint starts with it (in order)."""
    named = [item for item in items if name_of(item) == selector]
    if named or not HEX_PREFIX.fullmatch(selector):
        return named
    return [item for item in items if fingerprint_of(item).startswith(selector.lower())]
