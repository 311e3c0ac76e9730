"""Files written so that a reader (or a crash) never sees half of one, and where the package keeps its cache.

Every file the package writes for later use (manifests, cache entries, plots, reports, rejection-sampling
data) goes through `atomic_path`: it is written under a temporary name in the same folder and renamed over the
target, so the target holds the old content or the new one, never a part.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CACHE_ENV = "MODPO_TRL_CACHE"


def default_cache_dir() -> Path:
    """`$MODPO_TRL_CACHE`, else `~/.cache/modpo_trl`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "modpo_trl")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `path`; when the block ends without an error, the file written there
    replaces `path` in one rename, otherwise it is removed. The temporary name is unique per process and call
    (concurrent writers never share one) and starts with a dot."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes `data` (text or bytes) to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """One JSON object per line, written atomically."""
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
