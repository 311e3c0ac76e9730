"""Content-addressed cache for scores that depend only on the data (margin rewards, reference log-probs).

A sweep over weightings re-uses the same dataset, reference model and reward models for every point, so
these scores are computed once and stored under a key derived from everything they depend on. Any change
of input (data, model weights, tokenizer, template, max length) changes the key, so stale entries are
never read; they are simply left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from ..storage import atomic_path, default_cache_dir

__all__ = ["ScoreCache", "content_fingerprint", "default_cache_dir", "fingerprint", "path_fingerprint"]


def fingerprint(*parts: Any) -> str:
    """A stable hex digest of JSON-serialisable parts (non-JSON values are hashed by their `str`)."""
    payload = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:32]


def content_fingerprint(dataset: Dataset, columns: list[str], batch_size: int = 1000) -> str:
    """Digest of the *values* of `columns`, independent of how the dataset was built or cached.

    `datasets`' own fingerprints are random for in-memory datasets, which would defeat a cache shared
    between the processes of a sweep.
    """
    digest = hashlib.sha256(json.dumps([columns, len(dataset)]).encode())
    for batch in dataset.select_columns(columns).iter(batch_size=batch_size):
        digest.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def path_fingerprint(path: str | os.PathLike) -> str:
    """Digest of a local file or folder by name, size and modification time of every file in it.

    Cheap even for 7B checkpoints and changes whenever a file is rewritten. Hub ids (no local path) are
    fingerprinted by name.
    """
    path = Path(path)
    if not path.exists():
        return fingerprint("hub", str(path))
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stats = [(str(p.relative_to(path.parent)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return fingerprint(str(path.resolve()), stats)


class ScoreCache:
    """Arrays stored as `<directory>/<kind>/<key>.npz`, written atomically."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def path(self, kind: str, key: str) -> Path:
        return self.directory / kind / f"{key}.npz"

    def load(self, kind: str, key: str) -> dict[str, np.ndarray] | None:
        path = self.path(kind, key)
        if not path.exists():
            return None
        with np.load(path) as data:
            return {name: data[name] for name in data.files}

    def save(self, kind: str, key: str, arrays: dict[str, np.ndarray]) -> Path:
        path = self.path(kind, key)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        return path
