"""Files written so that a reader (or a crash) never sees half of one, and where the package keeps its cache.

Every file the package writes for later use (manifests, cache entries, plots, reports, rejection-sampling
data) goes through `atomic_path`: it is written under a temporary name in the same folder and renamed over the
target, so the target holds the old content or the new one, never a part. A process killed while writing leaves
its temporary file behind; `remove_stale_temporaries` removes those of dead processes.

`MODPO_TRL_FAULT=<point>[#<n>]` kills the process at a named point (`fault_point`): the fault-injection tests use
it to check that a kill at any step of writing or finishing loses nothing (docs/recipes.md lists the points).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CACHE_ENV = "MODPO_TRL_CACHE"
FAULT_ENV = "MODPO_TRL_FAULT"
_fault_hits: Counter[str] = Counter()
# `.<name>.<pid>@<host>.<8 hex>.tmp` (older versions: no `@<host>`); the group is the pid, then the host.
_TEMPORARY = re.compile(r"\..+\.(\d+)(?:@(.+))?\.[0-9a-f]{8}\.tmp")
# A temporary of another machine (a shared file system) whose process cannot be asked: stale after this long.
FOREIGN_TEMPORARY_AGE = 24 * 3600


def fault_point(name: str) -> None:
    """Kills this process (SIGKILL: no clean-up runs) the n-th time it reaches `name` when `$MODPO_TRL_FAULT` is
    `name#n` (`name`: the first time). For fault-injection tests; nothing happens without the variable."""
    point, _, nth = os.environ.get(FAULT_ENV, "").partition("#")
    if point == name:
        _fault_hits[name] += 1
        if _fault_hits[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


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
    tmp = path.parent / f".{path.name}.{os.getpid()}@{socket.gethostname()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Removes the temporary files `atomic_path` left in `folder` (not below it) whose process is dead: a process
    of this machine that no longer runs, or one of another machine after `FOREIGN_TEMPORARY_AGE` seconds.
    Returns what was removed."""
    folder, host, removed = Path(folder), socket.gethostname(), []
    for path in folder.glob(".*.tmp") if folder.is_dir() else []:
        match = _TEMPORARY.fullmatch(path.name)
        if match is None or not path.is_file():
            continue
        pid, where = int(match.group(1)), match.group(2) or host
        try:
            stale = (
                not is_alive(pid)
                if where == host
                else time.time() - path.stat().st_mtime > FOREIGN_TEMPORARY_AGE
            )
            if stale:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # its writer renamed it meanwhile
            pass
    return removed


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
