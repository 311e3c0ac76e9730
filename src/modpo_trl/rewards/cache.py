"""Content-addressed cache for scores that depend only on the data (margin rewards, reference log-probs).

A sweep over weightings re-uses the same dataset, reference model and reward models for every point, so
these scores are computed once and stored under a key derived from everything they depend on. Any change
of input (data, model weights or config, tokenizer, template, max length, a reward function's code) changes the
key, so stale entries are never read; they are simply left behind. docs/cache.md lists every key's inputs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from accelerate.utils import extract_model_from_parallel
from datasets import Dataset
from huggingface_hub import HfApi
from huggingface_hub import constants as hub_constants
from huggingface_hub.file_download import repo_folder_name
from trl.trainer.utils import hash_module

from ..storage import atomic_path, default_cache_dir, fault_point, remove_stale_temporaries, write_atomic

__all__ = [
    "ScoreCache",
    "content_fingerprint",
    "default_cache_dir",
    "file_digest",
    "fingerprint",
    "hub_commit",
    "module_fingerprint",
    "module_settings",
    "path_fingerprint",
]


def _canonical(value: Any) -> Any:
    # A set's order follows per-process string hashing: sorted, it gives every process of a sweep the same key.
    return sorted(map(str, value)) if isinstance(value, set | frozenset) else str(value)


def fingerprint(*parts: Any) -> str:
    """A stable hex digest of JSON-serialisable parts (sets sorted, other non-JSON values hashed by their `str`)."""
    payload = json.dumps(parts, sort_keys=True, default=_canonical).encode()
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


# Files at least this big have their digest remembered on disk: a checkpoint is read once, not at every run.
REMEMBER_DIGESTS_FROM = 16 << 20
# A hub id that resolves to no commit here gets a key no other process shares, so it matches nothing cached.
_UNRESOLVED = uuid.uuid4().hex


@functools.cache
def _read_digest(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """xxh3-128 of a file's content (about 10 GB/s: reading the disk is the cost).

    Digests are remembered by the file's (path, size, modification and change times, inode): in this process for every
    file, and in `<cache dir>/files/` for files of `REMEMBER_DIGESTS_FROM` bytes or more, so that the weights of a
    7B model are read once, at their first fingerprint, and a rewritten file is read again.
    """
    real = os.path.realpath(path)
    st = os.stat(real)
    # The change time cannot be set back by a copy tool or `touch`, unlike the modification time.
    stat = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    if st.st_size < REMEMBER_DIGESTS_FROM:
        return _read_digest(real, *stat)
    memo = default_cache_dir() / "files" / f"{fingerprint(real)}.json"
    try:
        remembered = json.loads(memo.read_text())
        if remembered["stat"] == stat:
            return remembered["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or unreadable: read the file
    digest = _read_digest(real, *stat)
    try:
        write_atomic(memo, json.dumps({"path": real, "stat": stat, "digest": digest}))
    except OSError:
        pass  # a read-only cache only costs a re-read next time
    return digest


def hub_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit a hub model id resolves to: asked of the hub unless `HF_HUB_OFFLINE` is set (what
    `from_pretrained` would download), else the one the local Hugging Face cache holds; None when neither
    knows it (the model could not be loaded either)."""
    revision = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    if not hub_constants.HF_HUB_OFFLINE:
        try:
            return HfApi().model_info(repo_id, revision=revision, timeout=10).sha
        except (
            Exception
        ):  # no network, an unknown id: the local cache decides, as it does for from_pretrained
            pass
    folder = repo_folder_name(repo_id=repo_id, repo_type="model")
    ref = Path(hub_constants.HF_HUB_CACHE) / folder / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def _visible_files(folder: Path) -> list[Path]:
    """Every file under `folder` but hidden ones (e.g. `.cache/` download metadata, which holds timestamps)."""
    files = (p for p in folder.rglob("*") if p.is_file())
    return sorted(p for p in files if not any(part.startswith(".") for part in p.relative_to(folder).parts))


def path_fingerprint(path: str | os.PathLike, revision: str | None = None) -> str:
    """What a model, tokenizer or adapter path holds.

    A local file or folder: the relative name and content digest (`file_digest`) of every file in it, not its
    location nor modification times, so a copy has the same key and a rewritten file another one; a LoRA adapter
    folder adds its base model (`base_model_name_or_path` of its `adapter_config.json`). A hub id: its resolved
    commit (`hub_commit`), at `revision`.
    """
    local = Path(path).expanduser()
    if not local.exists():
        commit = hub_commit(str(path), revision)
        return fingerprint("hub", str(path), revision, commit or _UNRESOLVED)
    if local.is_file():
        return fingerprint("file", file_digest(local))
    base = None
    if (local / "adapter_config.json").is_file():
        adapter = json.loads((local / "adapter_config.json").read_text())
        if adapter.get("base_model_name_or_path"):
            base = path_fingerprint(adapter["base_model_name_or_path"], adapter.get("revision"))
    files = [(p.relative_to(local).as_posix(), file_digest(p)) for p in _visible_files(local)]
    return fingerprint("folder", files, base)


def module_settings(model: torch.nn.Module) -> str:
    """What decides an in-memory model's outputs besides its weights: class, config (but its name or path and
    library version: a copy is the same model), PEFT adapters' configs and the active adapter. Read through
    distributed wrappers, and cheap (no weights), so it can be taken after a model was sharded."""
    model = extract_model_from_parallel(model)
    config = getattr(model, "config", None)
    settings = config.to_dict() if hasattr(config, "to_dict") else None
    for key in ("_name_or_path", "transformers_version", "_commit_hash"):
        (settings or {}).pop(key, None)
    adapters = {name: c.to_dict() for name, c in (getattr(model, "peft_config", None) or {}).items()}
    active = getattr(model, "active_adapter", None) if adapters else None
    return fingerprint("module", type(model).__qualname__, settings, adapters, active)


def module_fingerprint(model: torch.nn.Module) -> str:
    """An in-memory model: its weights (TRL's `hash_module`) and `module_settings`."""
    return fingerprint(module_settings(model), hash_module(model))


class ScoreCache:
    """Arrays stored as `<directory>/<kind>/<key>.npz`, written atomically and checked when read: an entry that
    cannot be read (truncated, not a zip, a flipped byte: each array's CRC-32 is checked), lacks an array, has
    the wrong number of rows or holds values it may not (infinities; NaN unless `allow_nan`) is removed with a
    warning naming it, and read as a miss, so its scores are computed again."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def path(self, kind: str, key: str) -> Path:
        return self.directory / kind / f"{key}.npz"

    def load(
        self, kind: str, key: str, names: Sequence[str], rows: int, allow_nan: bool = False
    ) -> dict[str, np.ndarray] | None:
        """The arrays `names`, each with `rows` rows, of the entry `kind/key`; None when there is none (or it was
        bad, see the class)."""
        path = self.path(kind, key)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
            problem = _entry_problem(arrays, names, rows, allow_nan)
        except Exception as e:  # whatever a damaged file makes numpy or zipfile raise
            problem = f"unreadable ({type(e).__name__}: {e})"
        if problem is None:
            return {name: arrays[name] for name in names}
        warnings.warn(
            f"score cache entry {path} is {problem}; removed, its scores are computed again", stacklevel=2
        )
        path.unlink(missing_ok=True)
        return None

    def save(self, kind: str, key: str, arrays: dict[str, np.ndarray]) -> Path:
        path = self.path(kind, key)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            fault_point("write:cache")
        remove_stale_temporaries(path.parent)
        return path


def _entry_problem(
    arrays: dict[str, np.ndarray], names: Sequence[str], rows: int, allow_nan: bool
) -> str | None:
    """What is wrong with a cache entry's arrays, or None."""
    for name in names:
        if name not in arrays:
            return f"missing the array {name!r} (it has {sorted(arrays)})"
        array = arrays[name]
        if array.ndim == 0 or len(array) != rows:
            return f"of the wrong length ({name!r} has shape {array.shape}; {rows} rows expected)"
        if not np.issubdtype(array.dtype, np.number):
            return f"not numeric ({name!r} has dtype {array.dtype})"
        bad = np.isinf(array) if allow_nan else ~np.isfinite(array)
        if bad.any():
            return f"holding non-finite values ({int(bad.sum())} in {name!r})"
    return None
