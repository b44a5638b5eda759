"""Fitted heads on disk: a model file and a JSON sidecar per head, beside their cache's id.

    STORE/heads/<fingerprint[:16]>/<name>.json              the sidecar (written last)
    STORE/heads/<fingerprint[:16]>/<name>.<sha[:12]><ext>   the model file it names

The sidecar records the cache fingerprint and the model file's SHA-256. Model files are named
by their digest and the sidecar is replaced last, so a head on disk is always complete or
absent, and a file that does not match its sidecar is refused before it is loaded.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from store.atomic import atomic_path, write_text
from store.cache import FeatureCache
from store.errors import HeadstartError
from store.fingerprint import digest_file
from store.store import Store

HEAD_FORMAT = "headstart.head"
HEAD_VERSION = "1.0"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_head_name(name: str) -> str:
    """Head names become file names: letters, digits, '_', '.', '-' only."""
    if not NAME_PATTERN.fullmatch(name):
        raise HeadstartError(
            f"Head name {name!r} is not allowed; use up to 64 letters, digits, '_', '.' or '-'."
        )
    return name


def save_head(
    store: Store, cache: FeatureCache, name: str, record: dict[str, Any],
    write_model: Callable[[Path], None], suffix: str,
) -> Path:
    """Write the model file, then the sidecar; returns the sidecar's path."""
    directory = store.head_dir(cache)
    staging = directory / f"{check_head_name(name)}.staging{suffix}"
    with atomic_path(staging) as temporary:
        write_model(temporary)
    digest = digest_file(staging)
    model_path = directory / f"{name}.{digest[:12]}{suffix}"
    staging.replace(model_path)
    sidecar = directory / f"{name}.json"
    previous = _read_json(sidecar) if sidecar.is_file() else None
    full = {
        "format": HEAD_FORMAT, "version": HEAD_VERSION, "name": name,
        "cache": cache.fingerprint, "cache_name": cache.name, "dataset": cache.dataset,
        "file": model_path.name, "sha256": digest, **record,
    }
    write_text(sidecar, json.dumps(full, indent=2))
    if previous and previous.get("file") not in (None, model_path.name):
        (directory / previous["file"]).unlink(missing_ok=True)
    return sidecar


@contextlib.contextmanager
def claiming_head(store: Store, cache: FeatureCache, name: str, replace: bool = False
                  ) -> Iterator[None]:
    """Hold head `name` of `cache` for a whole fit: a second process fitting the same name gets
    a sentence at once, and a name already fitted is refused unless `replace`."""
    directory = store.head_dir(cache)
    made = [d for d in (directory, store.heads_dir) if not d.is_dir()]
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with store.locked(directory / f".{check_head_name(name)}.lock",
                          f"Another headstart process is fitting head {name!r} of cache "
                          f"{cache.name} right now; wait for it, or choose another --name."):
            if not replace and (directory / f"{name}.json").is_file():
                raise HeadstartError(
                    f"A head named {name!r} is already fitted on cache {cache.name}; give "
                    "--replace to replace it, or choose another --name.")
            yield
    finally:
        for folder in made:  # a fit that saved nothing leaves no empty folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()


def load_head_record(store: Store, cache: FeatureCache, name: str) -> tuple[dict[str, Any], Path]:
    """The sidecar of head `name` on `cache` and its verified model file."""
    sidecar = store.head_dir(cache) / f"{check_head_name(name)}.json"
    if not sidecar.is_file():
        known = ", ".join(r["name"] for r in list_heads(store, cache)) or "none yet"
        raise HeadstartError(
            f"No head named {name!r} is fitted on cache {cache.name} ({cache.short_id}); "
            f"heads of that cache: {known}."
        )
    record = _read_json(sidecar)
    if record.get("format") != HEAD_FORMAT or str(record.get("version", "")).split(".")[0] != "1":
        raise HeadstartError(f"{sidecar} is not a head sidecar this headstart can read.")
    if record.get("cache") != cache.fingerprint:
        raise HeadstartError(
            f"Head {name!r} was fitted on cache {str(record.get('cache'))[:12]}, not on "
            f"{cache.short_id}; its features would not match. Fit it again on this cache."
        )
    model_path = sidecar.parent / Path(str(record["file"])).name  # never outside this folder
    if model_path.is_symlink():
        raise HeadstartError(
            f"The model file of head {name!r} is a symbolic link; headstart loads model files "
            "only from its own store, so it refuses it. Fit the head again."
        )
    if not model_path.is_file() or digest_file(model_path) != record.get("sha256"):
        raise HeadstartError(
            f"The model file of head {name!r} is missing or does not match its recorded SHA-256; "
            "refusing to load it. Fit the head again."
        )
    return record, model_path


def list_heads(store: Store, cache: FeatureCache | None = None) -> list[dict[str, Any]]:
    """Sidecars of every fitted head (of one cache, or of all), sorted by name."""
    directories = [store.head_dir(cache)] if cache else sorted(store.heads_dir.glob("*"))
    records = []
    for directory in directories:
        for sidecar in sorted(directory.glob("*.json")):
            try:
                record = _read_json(sidecar)
            except HeadstartError:
                continue
            if record.get("format") == HEAD_FORMAT:
                records.append(record)
    return records


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise HeadstartError(f"Cannot read {path}: {error}.") from None
