"""What a store holds, in one read: the facts `list` shows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from store.cache import FeatureCache
from store.errors import HeadstartError, command
from store.heads import list_heads
from store.shards import shard_sets
from store.store import Store
from store.units import format_size


@dataclass
class Inventory:
    """Finished caches (originals and views), heads, unfinished work and shards of a store."""

    root: Path
    caches: list[FeatureCache]
    heads: list[dict[str, Any]]
    unfinished: list[Path]
    leftovers: list[Path]
    shards: list[dict[str, Any]]
    default: str | None = None  # fingerprint of the cache commands use without --cache
    default_reason: str | None = None  # "pinned" or "newest"

    @property
    def feature_caches(self) -> list[FeatureCache]:
        """Caches of original images (not augmented views), oldest first."""
        return [c for c in self.caches if c.kind == "features"]

    def views_of(self, cache: FeatureCache) -> int:
        """How many augmented-view caches were made from `cache`."""
        return sum(1 for c in self.caches if c.parent == cache.fingerprint)

    CACHE_COLUMNS = ("cache", "id", "backbone", "size", "pooling", "rows (train/test)", "width",
                     "dtype", "disk", "skipped", "views", "from")
    HEAD_COLUMNS = ("head", "kind", "cache", "val acc", "test acc", "fit s")
    SHARD_COLUMNS = ("cache (not merged)", "id", "shards", "finished", "running", "missing")

    def cache_rows(self) -> list[tuple[str, ...]]:
        """One row per cache of original images; the default is marked with why it is."""
        rows = []
        for c in self.feature_caches:
            s = c.summary()
            parent = (c.lineage or {}).get("parent")
            mark = f" * ({self.default_reason})" if c.fingerprint == self.default else ""
            rows.append((c.name + mark, c.short_id, s["backbone"], str(s["image_size"]),
                         s["pooling"], "/".join(str(v) for v in s["rows"].values()),
                         str(s["width"]), s["dtype"], format_size(s["disk_bytes"]),
                         str(s["skipped"]), str(self.views_of(c)),
                         f"finetuned {parent[:12]}" if parent else ""))
        return rows

    def head_rows(self) -> list[tuple[str, ...]]:
        """One row per fitted head (and ensemble)."""
        rows = []
        for h in self.heads:
            m = h.get("metrics", {})
            rows.append((h["name"], str(h.get("kind", "?")), f"{h['cache_name']} ({h['cache'][:12]})",
                         f"{m.get('validation', {}).get('accuracy', float('nan')):.4f}",
                         f"{m.get('test', {}).get('accuracy', float('nan')):.4f}",
                         f"{h.get('fit_seconds', 0):.1f}"))
        return rows

    def shard_rows(self) -> list[tuple[str, ...]]:
        """One row per set of shards not merged yet."""
        def compact(values: list[int]) -> str:
            return ",".join(map(str, values[:12])) + (",..." if len(values) > 12 else "") or "-"

        rows = []
        for s in self.shards:
            odd = (f" (+ shards of {','.join(map(str, s['other_counts']))})"
                   if s["other_counts"] else "")
            rows.append((s["name"], s["fingerprint"][:12], f"{len(s['finished'])}/{s['count']}{odd}",
                         compact(s["finished"]), compact(s["unfinished"]), compact(s["missing"])))
        return rows

    def notes(self) -> list[str]:
        """Sentences about what is missing or left over."""
        notes = []
        if not self.feature_caches:
            notes.append(f"No merged caches yet: run '{command('merge')}'." if self.shards else
                         f"No caches yet: run '{command('extract DATASET')}'.")
        if self.unfinished:
            notes.append(f"{len(self.unfinished)} unfinished extraction(s); rerun their extract "
                         "command to resume.")
        if self.leftovers:
            notes.append(f"{len(self.leftovers)} extraction folder(s) left beside finished caches "
                         "by an interrupted writer; 'verify --fix' removes them.")
        if not self.heads:
            notes.append(f"No heads yet: run '{command('fit --head mlp')}'.")
        return notes

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (what `list --json` prints)."""
        return {"store": str(self.root), "caches": [c.summary() for c in self.caches],
                "default": self.default, "default_reason": self.default_reason,
                "heads": self.heads, "unfinished": [str(p) for p in self.unfinished],
                "leftovers": [str(p) for p in self.leftovers], "shards": self.shards}


def inventory(store: Store) -> Inventory:
    """Everything `store` holds; shard runs are listed with shards, not as unfinished caches."""
    caches = store.caches()
    found = Inventory(
        root=store.root, caches=caches, heads=list_heads(store),
        unfinished=[p for p in store.unfinished() if ".shard-" not in p.name],
        leftovers=store.leftovers(), shards=[s.summary() for s in shard_sets(store)])
    if any(c.kind == "features" for c in caches):
        try:
            cache, reason = store.resolve_cache(None)
            found.default, found.default_reason = cache.fingerprint, reason
        except HeadstartError:
            pass
    return found
