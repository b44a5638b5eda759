"""The root attributes of a cache file as one typed record (the spec: docs/format.md).

Every writer builds a `CacheAttributes` and stores `to_attrs()`; `FeatureCache` reads the file
through `from_attrs()`. Names and encodings live here only: JSON values are stored as JSON text,
optional attributes are left out when they are None.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from store import layout

#: field name -> attribute name; the spec's table lists exactly these attributes.
ATTRIBUTE_NAMES = {
    "encoding_type": "encoding-type", "encoding_version": "encoding-version",
    "fingerprint": "fingerprint", "inputs": "inputs", "preprocessing": "preprocessing",
    "dataset": "dataset", "source": "source", "created": "created", "libraries": "libraries",
    "weights_path": "weights-path", "kind": "kind", "parent": "parent", "view": "view",
    "augmentation": "augmentation", "lineage": "lineage", "shard": "shard", "merged": "merged",
    "blocks": "blocks", "tta": "tta",
}
#: Attributes stored as JSON text.
JSON_FIELDS = frozenset({"inputs", "preprocessing", "source", "libraries", "augmentation",
                         "lineage", "shard", "merged", "blocks"})
#: Attributes a reader may find missing (older files, or another kind of cache).
OPTIONAL_FIELDS = frozenset({"source", "weights_path", "kind", "parent", "view", "augmentation",
                             "lineage", "shard", "merged", "blocks", "tta"})
KINDS = ("features", "views", "shard")


def utc_now(timespec: str = "seconds") -> str:
    """The `created` timestamp: UTC, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec=timespec)


@dataclass(frozen=True)
class CacheAttributes:
    """Every root attribute of one cache file (see docs/format.md for each one's meaning)."""

    fingerprint: str
    inputs: dict[str, Any]  # every fingerprint input
    preprocessing: dict[str, Any]
    dataset: str
    created: str
    libraries: dict[str, str]
    source: dict[str, Any] = field(default_factory=dict)
    encoding_type: str = layout.ENCODING_TYPE
    encoding_version: str = layout.ENCODING_VERSION
    weights_path: str | None = None  # 1.1: the weights file read at extraction
    kind: str = "features"  # "features", "views" or "shard"
    parent: str | None = None  # views: the fingerprint of the cache they augment
    view: int | None = None  # views: which view
    augmentation: dict[str, Any] | None = None  # views: the augmentation's definition
    lineage: dict[str, Any] | None = None  # e.g. the parent cache of a fine-tuned backbone
    shard: dict[str, Any] | None = None  # 1.2, shard files: index, count, totals, ids digest
    merged: dict[str, Any] | None = None  # 1.2, a cache made by merge: how many shards
    #: 1.4: each block's columns, bottom to top ({"name", "start", "stop"}); None: one block
    blocks: list[dict[str, Any]] | None = None
    tta: str | None = None  # 1.4: "flip" when every split also holds /<split>/mirrored
    #: Attributes this version does not know (a newer minor version's), kept when rewritten.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def image_size(self) -> int:
        """The input image size (the fingerprint inputs' copy; preprocessing repeats it)."""
        return int(self.inputs["image_size"])

    def to_attrs(self) -> dict[str, Any]:
        """The HDF5 root attributes."""
        attrs = dict(self.extra)
        for name, attr in ATTRIBUTE_NAMES.items():
            value = getattr(self, name)
            if value is None:
                continue
            attrs[attr] = json.dumps(value) if name in JSON_FIELDS else value
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "CacheAttributes":
        """The record of a file's attributes; a missing required one raises KeyError."""
        values: dict[str, Any] = {}
        for name, attr in ATTRIBUTE_NAMES.items():
            if attr not in attrs:
                if name not in OPTIONAL_FIELDS:
                    raise KeyError(attr)
                continue
            raw = attrs[attr]
            values[name] = (json.loads(raw) if name in JSON_FIELDS
                            else int(raw) if name == "view" else str(raw))
        if values.get("weights_path") == "":  # 1.1 writers stored "" for "no file"
            values["weights_path"] = None
        known = set(ATTRIBUTE_NAMES.values())
        return cls(**values, extra={k: v for k, v in attrs.items() if k not in known})

    def replace(self, **changes: Any) -> "CacheAttributes":
        """A copy with some attributes changed."""
        return dataclasses.replace(self, **changes)
