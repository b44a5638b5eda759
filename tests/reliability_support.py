"""Helpers shared by the reliability tests: hashing a store, holding a cache's write lock."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

from tests.conftest import ROOT


def tree_digest(root: Path, skip: Callable[[Path], bool] = lambda p: p.suffix == ".lock") -> dict:
    """relative path -> SHA-256 of every file under root (lock files skipped by default)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not skip(p)}


@contextlib.contextmanager
def lock_held_elsewhere(store: Path, fingerprint: str) -> Iterator[None]:
    """Another process holds the write lock of cache `fingerprint` while the block runs."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from store.store import Store\n"
         "lock = Store(sys.argv[1]).writing(sys.argv[2]); lock.__enter__()\n"
         "print('held', flush=True); time.sleep(120)", str(store), fingerprint],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()

